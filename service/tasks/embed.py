"""Embeddings and one-shot verification: `POST /embed` and `POST /verify`.

    /embed   images as /classify takes them -> {"model", "results": [{"filename",
             "embedding": [unit-length floats]}]}, in upload order
    /verify  exactly two images (multipart parts `a` and `b`, or JSON {"images": [A, B]}) ->
             {"model", "distance": squared L2 between the embeddings, "threshold": tau (chosen at
             export, in the spec), "same": distance <= tau}

Both go through the model's batcher: a /verify is one request of two images.
"""

from __future__ import annotations

import json
from typing import Any, cast

import numpy as np
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import Response

from convserve.errors import InvalidInput
from convserve.runtime import OnnxModel
from convserve.service import rest
from convserve.service.inference import Inference, Upload, current
from convserve.service.pool import ServedModel
from convserve.service.schemas import (
    EmbedResponse,
    ImagesRequest,
    VerifyJsonRequest,
    VerifyResponse,
    json_body_schema,
)
from convserve.service.task import Answer, OutputInfo, Request, Rows, Task
from convserve.service.wire import decode_base64, media_type
from convserve.spec import ModelSpec
from convserve.tasks.embed import squared_distance, unit

TWO = 'send exactly two images: multipart parts `a` and `b`, or JSON {"images": [A, B]}'


def _two_from_form(inference: Inference, request: Request) -> list[Upload]:
    found = rest.form_files(request.body, request.content_type or "", inference, ("a", "b"))
    if len(found["a"]) != 1 or len(found["b"]) != 1:
        raise InvalidInput(
            "invalid_request", f"{TWO}; got {len(found['a'])} a and {len(found['b'])} b"
        )
    return [found["a"][0], found["b"][0]]


class EmbedTask(Task):
    name = "embed"
    routes = {"/embed": "embed", "/verify": "verify"}

    def runner(self, model: OnnxModel, spec: ModelSpec):  # noqa: ANN201 - an Infer
        # Unit length whatever the graph gives (an imported model may not normalize).
        return lambda x: unit(model.run(x)[0])  # type: ignore[arg-type]

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[OutputInfo]:
        assert spec.embed is not None
        return [OutputInfo(spec.embed.output, "FP32", [-1, spec.embed.dim])]

    def oip_values(self, spec: ModelSpec, model: OnnxModel, outputs: Rows) -> dict[str, Any]:
        assert spec.embed is not None
        return {spec.embed.output: outputs}

    def _served(self, inference: Inference, params: dict[str, str], body: Any) -> ServedModel:
        model = rest.same_or_conflict("model", params.get("model"), body and body.model)
        version = rest.same_or_conflict("version", params.get("version"), body and body.version)
        return inference.resolve(model, version, self.name)  # type: ignore[arg-type]

    async def embed(self, inference: Inference, request: Request) -> Answer:
        params = rest.query(request.query_string)
        served, images = await rest.read_images(
            inference,
            request.content_type,
            request.body,
            ImagesRequest,
            lambda body: self._served(inference, params, body),
        )
        batch = await inference.decode(served, images)
        vectors = await inference.run(served, batch.x)  # N x dim, unit length
        results = [
            {"filename": name, "embedding": row}
            for (name, _), row in zip(images, cast(np.ndarray, vectors).tolist(), strict=True)
        ]
        return Answer(json.dumps({"model": served.stored.tag, "results": results}).encode())

    async def verify(self, inference: Inference, request: Request) -> Answer:
        params = rest.query(request.query_string)
        kind = media_type(request.content_type)
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            served = self._served(inference, params, None)
            images: list[Upload] = _two_from_form(inference, request)
        elif kind == "application/json":
            body = rest.parse_json(request.body, VerifyJsonRequest)
            served = self._served(inference, params, body)
            if len(body.images) != 2:
                raise InvalidInput("invalid_request", f"{TWO}; got {len(body.images)} images")
            images = [
                (None, decode_base64(it if isinstance(it, str) else it.data, f"images[{n}]"))
                for n, it in enumerate(body.images)
            ]
        else:
            raise InvalidInput("unsupported_media_type", TWO)
        batch = await inference.decode(served, images)
        a, b = await inference.run(served, batch.x)  # type: ignore[misc]
        spec = served.spec.embed
        assert spec is not None
        distance = float(squared_distance(a[None], b[None])[0])
        answer = {
            "model": served.stored.tag,
            "distance": distance,
            "threshold": spec.threshold,
            "same": distance <= spec.threshold,
        }
        return Answer(json.dumps(answer).encode())

    def router(self) -> APIRouter:
        router = APIRouter()
        task = self

        @router.post(
            "/embed",
            response_model=None,
            responses={
                200: {"model": EmbedResponse, "description": "one embedding per image"},
                **rest.INFERENCE_ERRORS,
            },
            summary="Embed images: a unit-length vector each",
            openapi_extra={
                "parameters": rest.MODEL_PARAMETERS,
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": rest.multipart_schema("images")},
                        **rest.IMAGE_BODIES,
                        "application/json": {"schema": json_body_schema(ImagesRequest)},
                    },
                },
            },
        )
        async def embed_route(request: HttpRequest) -> Response:
            """Served by the raw ASGI path (`hotpath.py`) in the running service."""
            answer = await task.embed(current(request), await rest.plain(request))
            return Response(answer.body, media_type=answer.media_type.decode())

        @router.post(
            "/verify",
            response_model=None,
            responses={
                200: {"model": VerifyResponse, "description": "the two images compared"},
                **rest.INFERENCE_ERRORS,
            },
            summary="Verify: are two images the same identity? (squared distance <= threshold)",
            openapi_extra={
                "parameters": rest.MODEL_PARAMETERS,
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": rest.multipart_schema("a", "b", many=False)
                        },
                        "application/json": {"schema": json_body_schema(VerifyJsonRequest)},
                    },
                },
            },
        )
        async def verify_route(request: HttpRequest) -> Response:
            answer = await task.verify(current(request), await rest.plain(request))
            return Response(answer.body, media_type=answer.media_type.decode())

        return router
