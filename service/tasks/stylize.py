"""Style transfer: `POST /stylize?style=K` (K an index, or a blend such as `3:0.5,12:0.5`).

One image in (multipart `images`, the image as the body, or JSON with one base64 image), a PNG
out of the upload's width and height. An upload larger than the recipe's largest side is scaled
down to fit first; the answer then says so in `X-Convserve-Scaled: WxH->W'xH'` and has the
scaled size. A feed-forward network stylizes in one pass; its sides are padded (reflected) to a
multiple of 4 for it, and the padding is cropped from the answer.

The multi-style network's batch dimension is fixed at 1 and every upload has its own size, so
requests run one by one through the model's batcher (which still queues, sheds and drops a
request whose client has gone). Same image and style, same bytes: ONNX Runtime on the CPU is
deterministic and the PNG encoder is too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import Response

from convserve.errors import InvalidInput
from convserve.runtime import OnnxModel
from convserve.service import rest
from convserve.service.inference import Inference, current
from convserve.service.pool import ServedModel
from convserve.service.schemas import STYLE_PATTERN, StylizeJsonRequest, json_body_schema
from convserve.service.settings import ServiceSettings
from convserve.service.task import Answer, Infer, OutputInfo, Request, Rows, Task
from convserve.spec import ModelSpec
from convserve.tasks.stylize import style_weights, to_png

SCALED = "X-Convserve-Scaled"
WARM_UP_SIDE = 256  # warm-up runs at this size: the largest allowed would cost seconds


class StylizeTask(Task):
    name = "stylize"
    routes = {"/stylize": "stylize"}

    def runner(self, model: OnnxModel, spec: ModelSpec) -> Infer:
        """(images 1 x 3 x H x W, style weights 1 x styles) -> stylized 1 x 3 x H x W."""
        assert spec.stylize is not None
        style_input = spec.stylize.style_input

        def run(inputs: Rows) -> Rows:
            assert isinstance(inputs, tuple)
            images, weights = inputs
            return model.run(images, {style_input: weights[0]})[0]

        return run

    def max_batch(self, spec: ModelSpec, settings: ServiceSettings) -> int:
        return 1  # one image of its own size per call

    def warm_up_input(self, spec: ModelSpec, n: int) -> Rows:
        assert spec.stylize is not None
        weights = np.zeros((n, spec.stylize.styles), dtype=np.float32)
        weights[:, 0] = 1.0
        return np.zeros((n, 3, WARM_UP_SIDE, WARM_UP_SIDE), dtype=np.float32), weights

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[OutputInfo]:
        assert spec.stylize is not None
        return [OutputInfo(spec.stylize.output, "FP32", [-1, 3, -1, -1])]

    def oip_values(self, spec: ModelSpec, model: OnnxModel, outputs: Rows) -> dict[str, Any]:
        raise AssertionError("a stylizer takes two inputs: OIP refuses it before running")

    async def stylize(self, inference: Inference, request: Request) -> Answer:
        params = rest.query(request.query_string)

        def resolve(body: StylizeJsonRequest | None) -> tuple[ServedModel, np.ndarray]:
            model = rest.same_or_conflict("model", params.get("model"), body and body.model)
            version = rest.same_or_conflict("version", params.get("version"), body and body.version)
            style = rest.same_or_conflict("style", params.get("style"), body and body.style)
            served = inference.resolve(model, version, self.name)  # type: ignore[arg-type]
            assert served.spec.stylize is not None
            return served, style_weights(
                str(style) if style is not None else "0", served.spec.stylize.styles
            )

        (served, weights), images = await rest.read_images(
            inference, request.content_type, request.body, StylizeJsonRequest, resolve
        )
        if len(images) != 1:
            raise InvalidInput("invalid_request", f"send one image to stylize; got {len(images)}")
        batch = await inference.decode(served, images)
        place = batch.placements[0]
        stylized = await inference.run(served, (batch.x, weights[None]))  # 1 x 3 x H' x W'
        width, height = round(place.width * place.scale_x), round(place.height * place.scale_y)
        headers = {}
        if (width, height) != (place.width, place.height):
            headers[SCALED] = f"{place.width}x{place.height}->{width}x{height}"
        png = to_png(np.asarray(stylized)[0], width, height)  # the padding cropped off
        return Answer(png, b"image/png", headers)

    def router(self) -> APIRouter:
        router = APIRouter()
        task = self
        params = [
            {
                "name": "style",
                "in": "query",
                "required": False,
                "description": "a style index (0-25 for the 26-style network), or a blend of "
                "weighted indices such as 3:0.5,12:0.5 (default 0)",
                "schema": {"type": "string", "pattern": STYLE_PATTERN},
            },
            *rest.MODEL_PARAMETERS,
        ]

        @router.post(
            "/stylize",
            response_model=None,
            responses={
                200: {
                    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                    "description": "the stylized image, as PNG; X-Convserve-Scaled when the "
                    "upload was scaled down first",
                    "headers": {
                        SCALED: {
                            "schema": {"type": "string"},
                            "description": "WxH->W'xH' when scaled down",
                        }
                    },
                },
                **rest.INFERENCE_ERRORS,
            },
            summary="Stylize one image with a style (or a blend): PNG of the same size",
            openapi_extra={
                "parameters": params,
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": rest.multipart_schema("images", most=1)},
                        **rest.IMAGE_BODIES,
                        "application/json": {"schema": json_body_schema(StylizeJsonRequest)},
                    },
                },
            },
        )
        async def stylize_route(request: HttpRequest) -> Response:
            """Served by the raw ASGI path (`hotpath.py`) in the running service."""
            answer = await task.stylize(current(request), await rest.plain(request))
            return Response(
                answer.body, media_type=answer.media_type.decode(), headers=answer.headers
            )

        return router
