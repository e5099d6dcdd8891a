"""The convserve HTTP service: one BentoML service class, several models, adaptive batching.

Lifecycle:
  deploy   (`on_deployment`, once, before workers start) every model is verified; a failure
           stops `bentoml serve` with its message and exit status 1.
  load     (`__init__`, per worker) sessions opened on the configured providers, self-tested.
  warm up  (startup hook) full-size batch and batcher latency model; then /readyz says 200.
  serve    /classify (multipart or JSON), /classify/tensor, /models.
  drain    on SIGTERM the server stops accepting, in-flight requests finish, exit 0.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import logging
from typing import Annotated

import anyio.to_thread
import bentoml
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from service import kserve
from service.admission import AdmissionLimits, AdmissionMiddleware
from service.errors import (
    ApiError,
    ErrorResponse,
    handle_api_error,
    handle_http_error,
    handle_unexpected,
    handle_validation_error,
)
from service.imaging import ImageLimits, preprocess
from service.metrics import service_metrics
from service.pool import ModelPool, ServedModel, StartupError, preflight
from service.runtime import top_k
from service.schemas import (
    ClassifyJsonRequest,
    ClassifyResponse,
    EncodedImage,
    ImageResult,
    ModelsResponse,
    ModelVersion,
    Prediction,
    ServedModelInfo,
)
from service.settings import ServiceSettings
from service.tensors import parse_dtype, parse_shape, read_npy, read_raw, to_model_input

log = logging.getLogger("convserve")
# BentoML leaves the root logger at WARNING; the service's own lifecycle lines are INFO.
log.setLevel(logging.INFO)

app = FastAPI(
    title="convserve",
    description="CNN image classification on ONNX Runtime with adaptive batching. "
    'Every error is JSON: {"error": {"code": ..., "message": ...}}.',
    docs_url="/api/docs",
    openapi_url="/api/openapi.json",
    redoc_url=None,
)
app.add_middleware(AdmissionMiddleware)
app.add_exception_handler(ApiError, handle_api_error)
app.add_exception_handler(RequestValidationError, handle_validation_error)
app.add_exception_handler(StarletteHTTPException, handle_http_error)
app.add_exception_handler(Exception, handle_unexpected)


def _errors(*statuses: int) -> dict:
    text = {
        400: "an image is empty, truncated or corrupt; a malformed body",
        404: "unknown model or version",
        413: "the body is over the size limit, or an image has too many pixels",
        415: "an image is not PNG, JPEG, WebP or GIF; an unsupported body type",
        422: "invalid parameters, images too small or too elongated, too many images, "
        "bad base64, a tensor of the wrong shape or dtype or with NaN/infinity",
        503: "busy, queue full or overloaded: retry after Retry-After seconds",
        504: "inference missed the request deadline",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


INFERENCE_ERRORS = _errors(400, 404, 413, 415, 422, 503, 504)

MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "one or more image files (repeat the part)",
        }
    },
}


def _image_limits(settings: ServiceSettings) -> ImageLimits:
    return ImageLimits(
        max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side,
        max_aspect_ratio=settings.max_aspect_ratio,
    )


def _decode_base64(item: EncodedImage, index: int) -> bytes:
    text = item.data.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(422, "invalid_base64", f"images[{index}]: data URL is not base64")
    if "://" in text[:16]:
        raise ApiError(
            422,
            "invalid_base64",
            f"images[{index}] looks like a URL; send the image's bytes (URLs are never fetched)",
        )
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            422, "invalid_base64", f"images[{index}] is not valid base64-encoded data"
        ) from None


def _same_or_conflict(name: str, query: object, body: object) -> object:
    if query is not None and body is not None and query != body:
        raise ApiError(
            422,
            "conflicting_parameters",
            f"{name} is {query!r} in the query but {body!r} in the body",
        )
    return query if query is not None else body


def _access_log() -> bool:
    try:
        return ServiceSettings().access_log
    except ValueError:
        return False


@bentoml.service(
    name="convserve",
    workers=1,
    traffic={"timeout": 60},
    # Read when the service is defined; invalid settings are reported by verify_models.
    logging={"access": {"enabled": _access_log()}},
)
@bentoml.asgi_app(app, path="/")
class Classifier:
    @bentoml.on_deployment
    def verify_models() -> None:
        """Runs once in the serving process before workers start: fail fast, exit non-zero."""
        try:
            preflight(ServiceSettings())
        except (StartupError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            raise SystemExit(f"convserve cannot start: {exc}") from None

    def __init__(self) -> None:
        self.settings = ServiceSettings()
        self.metrics = service_metrics()
        try:
            self.pool = ModelPool.load(self.settings, self.metrics)
        except StartupError as exc:
            raise SystemExit(f"convserve cannot start: {exc}") from None
        self.limits = _image_limits(self.settings)
        app.state.admission = AdmissionLimits(
            max_body_bytes=self.settings.max_body_bytes,
            max_in_flight=self.settings.max_in_flight,
            on_reject=lambda code: self.metrics.rejected.labels(code=code).inc(),
        )
        app.state.on_error = app.state.admission.on_reject
        for served in self.pool.models:
            log.info(
                "serving %s (%s) on %s",
                served.stored.tag,
                served.spec.architecture,
                served.classifier.provider,
            )

    @bentoml.on_startup
    async def warm_up(self) -> None:
        await self.pool.warm_up(self.settings)
        log.info("warm-up done; ready")

    def __is_ready__(self) -> bool:
        return self.pool.ready

    @bentoml.on_shutdown
    def stop_batchers(self) -> None:
        self.pool.shutdown()

    # --- inference -------------------------------------------------------------------------

    async def _classify(
        self, served: ServedModel, batch: np.ndarray, k: int, names: list[str | None]
    ) -> ClassifyResponse:
        """batch: N x C x H x W float32, preprocessed for `served`."""
        probabilities = await served.batcher.submit(batch)
        indices, probs = top_k(probabilities, k)
        labels = served.spec.labels
        return ClassifyResponse(
            model=served.stored.tag,
            results=[
                ImageResult(
                    filename=name,
                    predictions=[
                        Prediction(label=labels[int(j)], index=int(j), probability=float(p))
                        for j, p in zip(row_i, row_p, strict=True)
                    ],
                )
                for name, row_i, row_p in zip(names, indices, probs, strict=True)
            ],
        )

    def _resolve(
        self, model: str | None, version: str | None, k: int | None
    ) -> tuple[ServedModel, int]:
        served = self.pool.get(model, version)
        k = self.settings.default_top_k if k is None else k
        if k > served.spec.num_classes:
            raise ApiError(
                422,
                "invalid_top_k",
                f"top_k must be at most {served.spec.num_classes} for {served.stored.tag}",
            )
        return served, min(k, served.spec.num_classes)

    def _check_count(self, n: int) -> None:
        if n > self.settings.max_images_per_request:
            raise ApiError(
                422,
                "too_many_images",
                f"{n} images sent; at most {self.settings.max_images_per_request} per request",
            )
        if n == 0:
            raise ApiError(422, "invalid_request", "images: at least one image is required")

    async def _images_from_form(self, request: Request) -> list[tuple[str | None, bytes]]:
        try:
            form = await request.form(max_files=self.settings.max_images_per_request + 1)
        except MultiPartException as exc:
            if "Too many files" in str(exc):
                raise ApiError(
                    422,
                    "too_many_images",
                    f"at most {self.settings.max_images_per_request} images per request",
                ) from None
            raise ApiError(
                400, "malformed_body", "the multipart body could not be parsed"
            ) from None
        try:
            parts = form.getlist("images")
            if any(not isinstance(p, UploadFile) for p in parts):
                raise ApiError(
                    422,
                    "invalid_request",
                    "images: must be an uploaded file (text and URLs are not accepted)",
                )
            self._check_count(len(parts))
            return [(p.filename, await p.read()) for p in parts]  # type: ignore[union-attr]
        finally:
            await form.close()

    async def _preprocess(
        self, served: ServedModel, images: list[tuple[str | None, bytes]]
    ) -> np.ndarray:
        def run() -> np.ndarray:
            arrays = []
            for i, (filename, data) in enumerate(images):
                name = f"image {i + 1}" + (f" ({filename})" if filename else "")
                arrays.append(preprocess(data, served.spec.input, self.limits, name=name))
            return np.stack(arrays)  # N x C x H x W

        # Decoding is CPU work; off the event loop so probes and other requests keep flowing.
        # (Decoding small images inline instead was measured: no gain within run-to-run noise.)
        return await anyio.to_thread.run_sync(run)

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=INFERENCE_ERRORS,
        summary="Classify images: multipart upload or JSON with base64",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                    "application/json": {
                        "schema": ClassifyJsonRequest.model_json_schema(
                            ref_template="#/components/schemas/{model}"
                        )
                    },
                },
            }
        },
    )
    async def classify(
        self,
        request: Request,
        top_k_: Annotated[
            int | None,
            Query(alias="top_k", ge=1, description="predictions per image (default 5)"),
        ] = None,
        model: Annotated[
            str | None, Query(description="model name (default model if absent)")
        ] = None,
        version: Annotated[str | None, Query(description="model version, or 'latest'")] = None,
    ) -> ClassifyResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            served, k = self._resolve(model, version, top_k_)
            images = await self._images_from_form(request)
        elif content_type == "application/json":
            try:
                body = ClassifyJsonRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                raise RequestValidationError(exc.errors(include_input=False)) from None
            served, k = self._resolve(
                _same_or_conflict("model", model, body.model),  # type: ignore[arg-type]
                _same_or_conflict("version", version, body.version),  # type: ignore[arg-type]
                _same_or_conflict("top_k", top_k_, body.top_k),  # type: ignore[arg-type]
            )
            self._check_count(len(body.images))
            items = [EncodedImage(data=i) if isinstance(i, str) else i for i in body.images]
            images = [(item.filename, _decode_base64(item, n)) for n, item in enumerate(items)]
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                "send multipart/form-data with `images` parts, or application/json",
            )
        batch = await self._preprocess(served, images)
        return await self._classify(served, batch, k, [name for name, _ in images])

    @app.post(
        "/classify/tensor",
        response_model=ClassifyResponse,
        responses=INFERENCE_ERRORS,
        summary="Classify preprocessed tensors (N x C x H x W): .npy, or raw bytes + shape/dtype",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def classify_tensor(
        self,
        request: Request,
        top_k_: Annotated[int | None, Query(alias="top_k", ge=1)] = None,
        model: Annotated[str | None, Query()] = None,
        version: Annotated[str | None, Query()] = None,
        shape: Annotated[
            str | None, Query(description="raw bytes only: e.g. 4,1,28,28", examples=["4,1,28,28"])
        ] = None,
        dtype: Annotated[
            str | None, Query(description="raw bytes only: float32 (normalized) or uint8 (pixels)")
        ] = None,
    ) -> ClassifyResponse:
        served, k = self._resolve(model, version, top_k_)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        data = await request.body()
        if content_type == "application/x-npy":
            if shape is not None or dtype is not None:
                raise ApiError(
                    422, "conflicting_parameters", "shape and dtype come from the .npy header"
                )
            array = read_npy(data)
        elif content_type == "application/octet-stream":
            if shape is None or dtype is None:
                raise ApiError(
                    422, "invalid_tensor", "raw tensors need the shape and dtype query parameters"
                )
            array = read_raw(data, parse_shape(shape), parse_dtype(dtype))
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                "send application/x-npy, or application/octet-stream with shape and dtype",
            )
        batch = to_model_input(array, served.spec.input, self.settings.max_images_per_request)
        return await self._classify(served, batch, k, [None] * len(batch))

    @app.get("/models", response_model=ModelsResponse, summary="Served models and versions")
    async def list_models(self) -> ModelsResponse:
        infos: dict[str, list[ModelVersion]] = {}
        for served in self.pool.models:
            stored = served.stored
            first_of_name = self.pool.get(stored.name) is served
            infos.setdefault(stored.name, []).append(
                ModelVersion(
                    version=stored.version,
                    tag=stored.tag,
                    default=first_of_name,
                    created=stored.created,
                    architecture=served.spec.architecture,
                    precision=stored.precision,
                    input=served.spec.input,
                    labels=list(served.spec.labels),
                    provider=served.classifier.provider,
                    sha256=stored.sha256,
                    metrics=served.spec.metrics,
                )
            )
        return ModelsResponse(
            default=self.pool.default.stored.tag,
            models=[ServedModelInfo(name=n, versions=v) for n, v in infos.items()],
        )

    # --- Open Inference Protocol (KServe v2) -----------------------------------------------

    @app.get("/v2", summary="Open Inference Protocol: server metadata", tags=["v2"])
    async def v2_server_metadata(self) -> dict:
        return {"name": "convserve", "version": _version(), "extensions": kserve.EXTENSIONS}

    @app.get("/v2/health/live", summary="Open Inference Protocol: liveness", tags=["v2"])
    async def v2_live(self) -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Open Inference Protocol: readiness", tags=["v2"])
    async def v2_ready(self) -> JSONResponse:
        ready = self.pool.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def _v2_model(self, name: str, version: str | None) -> ServedModel:
        return self.pool.get(name, version)

    def _v2_metadata(self, name: str, version: str | None) -> dict:
        served = self._v2_model(name, version)
        spec = served.spec
        versions = [m.stored.version for m in self.pool.models if m.stored.name == name]
        return {
            "name": name,
            "versions": versions if version is None else [served.stored.version],
            "platform": kserve.PLATFORM,
            "inputs": [
                {
                    "name": served.classifier.input_name,
                    "datatype": "FP32",
                    "shape": [-1, *spec.input.shape(1)[1:]],
                }
            ],
            "outputs": [
                {"name": kserve.OUTPUT_NAME, "datatype": "FP32", "shape": [-1, spec.num_classes]}
            ],
        }

    @app.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata", tags=["v2"])
    async def v2_model_metadata(self, name: str) -> dict:
        return self._v2_metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"])
    async def v2_model_version_metadata(self, name: str, version: str) -> dict:
        return self._v2_metadata(name, version)

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    async def v2_model_ready(self, name: str) -> JSONResponse:
        return self._v2_model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    async def v2_model_version_ready(self, name: str, version: str) -> JSONResponse:
        return self._v2_model_ready(name, version)

    def _v2_model_ready(self, name: str, version: str | None) -> JSONResponse:
        self._v2_model(name, version)
        ready = self.pool.ready
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    @app.get("/v2/models/{name}/config", tags=["v2"], summary="Triton-style model configuration")
    async def v2_model_config(self, name: str) -> dict:
        served = self._v2_model(name, None)
        spec = served.spec
        return {
            "name": name,
            "platform": kserve.PLATFORM,
            "max_batch_size": self.settings.max_images_per_request,
            "input": [
                {
                    "name": served.classifier.input_name,
                    "data_type": "TYPE_FP32",
                    "dims": list(spec.input.shape(1)[1:]),
                }
            ],
            "output": [
                {
                    "name": kserve.OUTPUT_NAME,
                    "data_type": "TYPE_FP32",
                    "dims": [spec.num_classes],
                    "label_filename": "",
                }
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": self.settings.max_latency_ms * 1000
            },
        }

    @app.post(
        "/v2/models/{name}/infer",
        tags=["v2"],
        summary="Open Inference Protocol: inference (JSON or binary tensor data)",
        responses=_errors(400, 404, 413, 503, 504),
    )
    async def v2_infer(self, name: str, request: Request) -> Response:
        return await self._v2_infer(name, None, request)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["v2"],
        responses=_errors(400, 404, 413, 503, 504),
    )
    async def v2_infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self._v2_infer(name, version, request)

    async def _v2_infer(self, name: str, version: str | None, request: Request) -> Response:
        served = self._v2_model(name, version)
        parsed = kserve.parse_infer_request(
            await request.body(), request.headers.get(kserve.HEADER_LENGTH)
        )
        input_name = served.classifier.input_name
        if len(parsed.inputs) != 1 or parsed.inputs[0].name != input_name:
            raise kserve.bad_request(
                f"the model takes one input named {input_name!r}; "
                f"got {[i.name for i in parsed.inputs]}"
            )
        (tensor,) = parsed.inputs
        if tensor.datatype == "BYTES":
            if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
                raise kserve.bad_request(
                    f"BYTES input shape must be [N] or [N, 1]; got {list(tensor.shape)}"
                )
            self._check_count(len(tensor.value))
            batch = await self._preprocess(served, [(None, data) for data in tensor.value])
        else:
            batch = to_model_input(
                np.asarray(tensor.value), served.spec.input, self.settings.max_images_per_request
            )
        probabilities = await served.batcher.submit(batch)
        body, header_length = kserve.build_response(
            model_name=name,
            model_version=served.stored.version,
            request=parsed,
            probabilities=probabilities,
            labels=served.spec.labels,
        )
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(
            body,
            media_type="application/octet-stream",
            headers={kserve.HEADER_LENGTH: str(header_length)},
        )


def _version() -> str:
    try:
        return importlib.metadata.version("convserve")
    except importlib.metadata.PackageNotFoundError:
        return "0"
