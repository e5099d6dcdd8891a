"""Detection: `POST /detect`, images in as `/classify` takes them, boxes out.

The graph decodes its grid (boxes in input pixels, per-class scores); here, per request and
per image, the candidates under `score_threshold` are dropped, non-max suppression runs per
class at `iou_threshold`, the best `max_detections` remain, and every box is mapped back to
the upload's own pixels (the recipe letterboxes: the whole image scaled to fit, centred).
Answers, in upload order, sorted by score:

    {"model": ..., "results": [{"filename": ..., "width": W, "height": H, "detections":
      [{"label": ..., "index": ..., "score": ..., "box": {"x1", "y1", "x2", "y2"}}]}]}
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field

from convserve.preprocess import Placement
from convserve.runtime import OnnxModel
from convserve.service.messages import Answer
from convserve.service.schemas import PNG_8X8_BASE64, DetectResponse, ImagesBody
from convserve.service.tasks.base import (
    ImageParts,
    ImagesCall,
    ModelParams,
    Route,
    Task,
    TensorInfo,
)
from convserve.spec import ModelSpec, TaskName
from convserve.tasks.detect import Detections, select

if TYPE_CHECKING:
    from convserve.service.loading import ServedModel

MAX_DETECTIONS = 1000


class DetectParams(ModelParams):
    score_threshold: float = Field(
        default=0.25,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="drop detections scoring under this (default 0.25)",
    )
    iou_threshold: float = Field(
        default=0.45,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="non-max suppression's overlap limit, per class (default 0.45)",
    )
    max_detections: int = Field(
        default=100, ge=1, le=MAX_DETECTIONS,
        description="most detections per image, best first (default 100)",
    )  # fmt: skip


class DetectJsonRequest(DetectParams, ImagesBody):
    """JSON variant of /detect; the thresholds may be given here or in the query string."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"images": [{"data": PNG_8X8_BASE64}], "score_threshold": 0.25}]
        },
    )


def detections_payload(
    served: ServedModel,
    found: list[Detections],
    placements: list[Placement],
    names: list[str | None],
) -> bytes:

    labels = served.spec.labels
    results: list[dict[str, Any]] = []
    for dets, place, name in zip(found, placements, names, strict=True):
        boxes = place.to_upload(dets.boxes).round(2).tolist()
        results.append(
            {
                "filename": name,
                "width": place.width,
                "height": place.height,
                "detections": [
                    {
                        "label": labels[c],
                        "index": c,
                        "score": s,
                        "box": {"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]},
                    }
                    for b, s, c in zip(
                        boxes, dets.scores.tolist(), dets.classes.tolist(), strict=True
                    )
                ],
            }
        )
    return json.dumps({"model": served.stored.tag, "results": results}).encode()


class DetectTask(Task):
    name = TaskName.DETECT

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[TensorInfo]:
        return [
            TensorInfo("boxes", "FP32", [-1, -1, 4]),
            TensorInfo("scores", "FP32", [-1, -1, spec.num_classes]),
        ]

    async def detect(self, served: ServedModel, call: ImagesCall[DetectParams]) -> Answer:
        p = call.params
        batch = await self.decoder.decode(served.spec.input, call.uploads)
        boxes, scores = await served.batcher.submit(batch.x)  # N x M x 4, N x M x C
        found = [
            select(b, s, score_threshold=p.score_threshold, iou_threshold=p.iou_threshold,
                   max_detections=p.max_detections)
            for b, s in zip(boxes, scores, strict=True)
        ]  # fmt: skip
        names = [name for name, _ in call.uploads]
        return Answer(detections_payload(served, found, batch.placements, names))

    routes = (
        Route(
            "/detect",
            DetectParams,
            ImageParts(),
            detect,
            "Detect objects: boxes in the upload's own pixels, label and score each",
            DetectResponse,
            DetectJsonRequest,
        ),
    )
