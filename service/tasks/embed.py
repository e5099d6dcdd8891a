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
from typing import TYPE_CHECKING, cast

import numpy as np
from pydantic import ConfigDict, Field

from convserve.runtime import OnnxModel
from convserve.service.batching import Infer
from convserve.service.messages import Answer
from convserve.service.schemas import (
    PNG_8X8_BASE64,
    Base64Text,
    EmbedResponse,
    EncodedImage,
    ImagesBody,
    VerifyResponse,
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
from convserve.tasks.embed import squared_distance, unit

if TYPE_CHECKING:
    from convserve.service.loading import ServedModel


class EmbedJsonRequest(ModelParams, ImagesBody):
    """JSON variant of /embed."""

    model_config = ConfigDict(extra="forbid")


class VerifyJsonRequest(ModelParams, ImagesBody):
    """JSON variant of /verify: exactly two images, A then B."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": [PNG_8X8_BASE64, PNG_8X8_BASE64]}]},
    )

    images: list[EncodedImage | Base64Text] = Field(
        min_length=2, max_length=2, description="the two images to compare"
    )


class EmbedTask(Task):
    name = TaskName.EMBED

    def runner(self, model: OnnxModel, spec: ModelSpec) -> Infer:
        # Unit length whatever the graph gives (an imported model may not normalize).
        return lambda x: unit(model.run(cast(np.ndarray, x))[0])  # one input: an array

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[TensorInfo]:
        assert spec.embed is not None
        return [TensorInfo(spec.embed.output, "FP32", [-1, spec.embed.dim])]

    async def embed(self, served: ServedModel, call: ImagesCall[ModelParams]) -> Answer:
        batch = await self.decoder.decode(served.spec.input, call.uploads)
        vectors = await served.batcher.submit(batch.x)  # N x dim, unit length
        results = [
            {"filename": name, "embedding": row}
            for (name, _), row in zip(call.uploads, cast(np.ndarray, vectors).tolist(), strict=True)
        ]
        return Answer(json.dumps({"model": served.stored.tag, "results": results}).encode())

    async def verify(self, served: ServedModel, call: ImagesCall[ModelParams]) -> Answer:
        batch = await self.decoder.decode(served.spec.input, call.uploads)  # A, then B
        a, b = await served.batcher.submit(batch.x)
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

    routes = (
        Route(
            "/embed",
            ModelParams,
            ImageParts(),
            embed,
            "Embed images: a unit-length vector each",
            EmbedResponse,
            EmbedJsonRequest,
            answer="one embedding per image",
        ),
        Route(
            "/verify",
            ModelParams,
            ImageParts(fields=("a", "b"), one_each=True, raw_body=False),
            verify,
            "Verify: are two images the same identity? (squared distance <= threshold)",
            VerifyResponse,
            VerifyJsonRequest,
            answer="the two images compared",
        ),
    )
