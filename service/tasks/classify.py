"""Classification: `POST /classify` (images), `POST /classify/tensor` (preprocessed tensors).

Each image gets its top-k `{label, index, probability}`, most likely first, in the order sent.
The runner gives probabilities (a softmax over the logits, unless the graph already ends in
one); the Open Inference Protocol shows them as `probabilities`, and its classification
extension turns them into top-k strings.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, cast

import numpy as np
from pydantic import ConfigDict, Field

from convserve.errors import ErrorCode, InvalidInput
from convserve.runtime import OnnxClassifier, OnnxModel
from convserve.service.batching import Infer
from convserve.service.messages import Answer
from convserve.service.schemas import PNG_8X8_BASE64, ClassifyResponse, ImagesBody
from convserve.service.tasks.base import (
    TENSOR,
    ImageParts,
    ImagesCall,
    ModelParams,
    Route,
    Task,
    TensorCall,
    TensorInfo,
)
from convserve.service.tensors import to_model_input
from convserve.spec import ModelSpec, TaskName

if TYPE_CHECKING:
    from convserve.service.loading import ServedModel

OUTPUT_NAME = "probabilities"


class ClassifyParams(ModelParams):
    top_k: int | None = Field(
        default=None, ge=1, description="predictions per image (default 5, at most the classes)"
    )


class ClassifyJsonRequest(ClassifyParams, ImagesBody):
    """JSON variant of /classify. `top_k`, `model` and `version` may be given here or in the
    query string, not both with different values."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"images": [{"data": PNG_8X8_BASE64, "filename": "black.png"}]}]
        },
    )


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and probabilities of the k most likely classes per row, most likely first.

    Ties are broken by the lower class index, so answers are deterministic.
    """
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(order))[:, None]  # indexing, not take_along_axis: a third the cost
    return order, probabilities[rows, order]


def top_k_lists(probabilities: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """`top_k` as Python lists, for an answer's JSON. A few small rows (one image of ten
    classes, the common request) are sorted in Python, which beats numpy's cost per call;
    Python's sort is stable with reverse=True too, so ties still go to the lower index."""
    if probabilities.size > 512:
        indices, values = top_k(probabilities, k)
        return indices.tolist(), values.tolist()
    rows = probabilities.tolist()
    order = [sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k] for row in rows]
    return order, [[row[j] for j in o] for row, o in zip(rows, order, strict=True)]


def classify_payload(
    served: ServedModel, probabilities: np.ndarray, k: int, names: list[str | None]
) -> bytes:
    """probabilities: N x classes -> the ClassifyResponse JSON: each image's top-k, most likely
    first, in the order sent. Built as plain data and serialized once."""
    indices, probs = top_k_lists(probabilities, k)
    labels = served.spec.labels
    results = [
        {
            "filename": name,
            "predictions": [
                {"label": labels[j], "index": j, "probability": p}
                for j, p in zip(row_i, row_p, strict=True)
            ],
        }
        for name, row_i, row_p in zip(names, indices, probs, strict=True)
    ]
    return json.dumps({"model": served.stored.tag, "results": results}).encode()


class ClassifyTask(Task):
    name = TaskName.CLASSIFY

    def runner(self, model: OnnxModel, spec: ModelSpec) -> Infer:
        assert isinstance(model, OnnxClassifier)
        return cast(Infer, model.probabilities)  # one input, one output: arrays

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[TensorInfo]:
        return [TensorInfo(OUTPUT_NAME, "FP32", [-1, spec.num_classes])]

    def top_k(self, served: ServedModel, k: int | None) -> int:
        """The top-k a request asked of `served` (the default when absent)."""
        if k is None:  # the default asks for at most what the model has: a 3-class model gives 3
            return min(self.settings.default_top_k, served.spec.num_classes)
        if k > served.spec.num_classes:
            raise InvalidInput(
                ErrorCode.INVALID_TOP_K,
                f"top_k must be at most {served.spec.num_classes} for {served.stored.tag}",
            )
        return k

    async def classify(self, served: ServedModel, call: ImagesCall[ClassifyParams]) -> Answer:
        k = self.top_k(served, call.params.top_k)
        batch = await self.decoder.decode(served.spec.input, call.uploads)
        probabilities = await served.batcher.submit(batch.x)  # N x classes
        names = [name for name, _ in call.uploads]
        return Answer(classify_payload(served, cast(np.ndarray, probabilities), k, names))

    async def classify_tensor(
        self, served: ServedModel, call: TensorCall[ClassifyParams]
    ) -> Answer:
        k = self.top_k(served, call.params.top_k)
        limit = self.settings.max_images_per_request
        batch = to_model_input(call.array, served.spec.input, limit)
        probabilities = await served.batcher.submit(batch)
        names: list[str | None] = [None] * len(batch)
        return Answer(classify_payload(served, cast(np.ndarray, probabilities), k, names))

    routes = (
        Route(
            "/classify",
            ClassifyParams,
            ImageParts(),
            classify,
            "Classify images: multipart upload, the image as the body, or JSON with base64",
            ClassifyResponse,
            ClassifyJsonRequest,
        ),
        Route(
            "/classify/tensor",
            ClassifyParams,
            TENSOR,
            classify_tensor,
            "Classify preprocessed tensors (N x C x H x W): .npy, or raw bytes + shape/dtype",
            ClassifyResponse,
        ),
    )
