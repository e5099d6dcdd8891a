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

from typing import TYPE_CHECKING

import numpy as np
from pydantic import ConfigDict, Field

from convserve.runtime import OnnxModel
from convserve.service.batching import Infer, Rows
from convserve.service.messages import Answer
from convserve.service.schemas import (
    PNG_8X8_BASE64,
    STYLE_PATTERN,
    Base64Text,
    EncodedImage,
    ImagesBody,
)
from convserve.service.tasks.base import (
    ImageParts,
    ImagesCall,
    ModelParams,
    Route,
    Task,
    TensorInfo,
)
from convserve.spec import ModelSpec, TaskName
from convserve.tasks.stylize import style_weights, to_png

if TYPE_CHECKING:
    from convserve.service.loading import ServedModel

SCALED = "X-Convserve-Scaled"
WARM_UP_SIDE = 256  # warm-up runs at this size: the largest allowed would cost seconds


class StylizeParams(ModelParams):
    style: str | None = Field(
        default=None,
        pattern=STYLE_PATTERN,
        description="a style index (0-25 for the 26-style network), or a blend of "
        "weighted indices such as 3:0.5,12:0.5 (default 0)",
    )


class StylizeJsonRequest(StylizeParams, ImagesBody):
    """JSON variant of /stylize: one image, and the style."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": [PNG_8X8_BASE64], "style": "3:0.5,12:0.5"}]},
    )

    images: list[EncodedImage | Base64Text] = Field(
        min_length=1, max_length=1, description="the image to stylize"
    )


class StylizeTask(Task):
    name = TaskName.STYLIZE

    def runner(self, model: OnnxModel, spec: ModelSpec) -> Infer:
        """(images 1 x 3 x H x W, style weights 1 x styles) -> stylized 1 x 3 x H x W."""
        assert spec.stylize is not None
        style_input = spec.stylize.style_input

        def run(inputs: Rows) -> Rows:
            assert isinstance(inputs, tuple)
            images, weights = inputs
            return model.run(images, {style_input: weights[0]})[0]

        return run

    def max_batch(self, spec: ModelSpec) -> int:
        return 1  # one image of its own size per call

    def warm_up_input(self, spec: ModelSpec, n: int) -> Rows:
        assert spec.stylize is not None
        weights = np.zeros((n, spec.stylize.styles), dtype=np.float32)
        weights[:, 0] = 1.0
        return np.zeros((n, 3, WARM_UP_SIDE, WARM_UP_SIDE), dtype=np.float32), weights

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[TensorInfo]:
        assert spec.stylize is not None
        return [TensorInfo(spec.stylize.output, "FP32", [-1, 3, -1, -1])]

    def oip_inputs(self, spec: ModelSpec) -> list[TensorInfo]:
        assert spec.stylize is not None  # one row of style weights per image, summing to 1
        return [TensorInfo(spec.stylize.style_input, "FP32", [-1, spec.stylize.styles])]

    async def stylize(self, served: ServedModel, call: ImagesCall[StylizeParams]) -> Answer:
        assert served.spec.stylize is not None
        weights = style_weights(call.params.style or "0", served.spec.stylize.styles)
        batch = await self.decoder.decode(served.spec.input, call.uploads)
        place = batch.placements[0]
        stylized = await served.batcher.submit((batch.x, weights[None]))  # 1 x 3 x H' x W'
        width, height = round(place.width * place.scale_x), round(place.height * place.scale_y)
        headers: dict[str, str] = {}
        if (width, height) != (place.width, place.height):
            headers[SCALED] = f"{place.width}x{place.height}->{width}x{height}"
        png = to_png(np.asarray(stylized)[0], width, height)  # the padding cropped off
        return Answer(png, b"image/png", headers)

    routes = (
        Route(
            "/stylize",
            StylizeParams,
            ImageParts(most=1),
            stylize,
            "Stylize one image with a style (or a blend): PNG of the same size",
            json_body=StylizeJsonRequest,
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
            },
        ),
    )
