"""The convserve HTTP service: one BentoML service class, one model, adaptive batching.

Lifecycle: __init__ resolves the model in the store and opens its ONNX Runtime session; the
startup hook runs warm-up inference through the batcher; only then does /readyz answer 200.
"""

from __future__ import annotations

import logging
from typing import Annotated

import anyio.to_thread
import bentoml
import numpy as np
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError

from export.store import load_model
from service.batching import Batcher
from service.errors import (
    ApiError,
    ErrorResponse,
    handle_api_error,
    handle_unexpected,
    handle_validation_error,
)
from service.imaging import preprocess
from service.runtime import OnnxClassifier, SessionConfig, top_k
from service.schemas import ClassifyResponse, ImageResult, Prediction
from service.settings import ServiceSettings

log = logging.getLogger("convserve")
# BentoML leaves the root logger at WARNING; the service's own lifecycle lines are INFO.
log.setLevel(logging.INFO)

app = FastAPI(
    title="convserve",
    description="CNN image classification on ONNX Runtime with adaptive batching.",
    docs_url="/api/docs",
    openapi_url="/api/openapi.json",
    redoc_url=None,
)
app.add_exception_handler(ApiError, handle_api_error)
app.add_exception_handler(RequestValidationError, handle_validation_error)
app.add_exception_handler(Exception, handle_unexpected)

ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "an image is empty, truncated or corrupt",
        413: "an image has too many pixels",
        415: "a part is not a PNG or JPEG image",
        422: "invalid parameters (top_k, too many images)",
        503: "overloaded or not ready; retry after Retry-After seconds",
    }.items()
}


@bentoml.service(name="convserve", workers=1, traffic={"timeout": 60})
@bentoml.asgi_app(app, path="/")
class Classifier:
    def __init__(self) -> None:
        self.settings = ServiceSettings()
        try:
            stored = load_model(self.settings.model)
        except bentoml.exceptions.NotFound:
            raise SystemExit(
                f"model {self.settings.model!r} is not in the model store; "
                "train and export one first (`convserve train` then `convserve export`)"
            ) from None
        self.model = OnnxClassifier(
            stored,
            SessionConfig(
                intra_op_threads=self.settings.intra_op_threads,
                inter_op_threads=self.settings.inter_op_threads,
            ),
        )
        self.batcher = Batcher(
            self.model.probabilities,
            max_batch_size=self.settings.max_batch_size,
            max_latency_ms=self.settings.max_latency_ms,
        )
        self._ready = False
        log.info("serving %s (%s)", stored.tag, self.model.spec.architecture)

    @bentoml.on_startup
    async def warm_up(self) -> None:
        spec = self.model.spec.input
        # A full-size batch first, so ORT's arena holds the largest buffers before traffic.
        full = np.zeros(spec.shape(self.settings.max_batch_size), dtype=np.float32)
        await anyio.to_thread.run_sync(self.model.probabilities, full)
        await self.batcher.warm_up(full[:1], self.settings.warmup_requests)
        self._ready = True
        log.info("warm-up done; ready")

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.on_shutdown
    def stop_batcher(self) -> None:
        self.batcher.shutdown()

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=ERROR_RESPONSES,
        summary="Classify one or more images (PNG or JPEG, any size or colour mode)",
    )
    async def classify(
        self,
        images: Annotated[list[UploadFile], File(description="one or more image files")],
        top_k_: Annotated[
            int | None,
            Query(alias="top_k", ge=1, description="predictions per image (default 5)"),
        ] = None,
    ) -> ClassifyResponse:
        settings = self.settings
        k = settings.default_top_k if top_k_ is None else top_k_
        if k > self.model.spec.num_classes:
            raise ApiError(
                422,
                "invalid_top_k",
                f"top_k must be at most {self.model.spec.num_classes} for this model",
            )
        if len(images) > settings.max_images_per_request:
            raise ApiError(
                422,
                "too_many_images",
                f"{len(images)} images sent; at most {settings.max_images_per_request} per request",
            )
        arrays = []
        for i, upload in enumerate(images):
            data = await upload.read()
            name = f"image {i + 1}" + (f" ({upload.filename})" if upload.filename else "")
            arrays.append(
                await anyio.to_thread.run_sync(
                    lambda d=data, n=name: preprocess(
                        d, self.model.spec.input, max_pixels=settings.max_image_pixels, name=n
                    )
                )
            )
        probabilities = await self.batcher.submit(np.stack(arrays))
        indices, probs = top_k(probabilities, k)
        labels = self.model.spec.labels
        return ClassifyResponse(
            model=self.model.stored.tag,
            results=[
                ImageResult(
                    filename=upload.filename,
                    predictions=[
                        Prediction(label=labels[int(j)], index=int(j), probability=float(p))
                        for j, p in zip(row_i, row_p, strict=True)
                    ],
                )
                for upload, row_i, row_p in zip(images, indices, probs, strict=True)
            ],
        )
