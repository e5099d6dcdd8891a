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
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import Response

from convserve.preprocess import Placement
from convserve.runtime import OnnxModel
from convserve.service import rest
from convserve.service.inference import Inference, current
from convserve.service.pool import ServedModel
from convserve.service.schemas import DetectJsonRequest, DetectResponse, json_body_schema
from convserve.service.task import Answer, OutputInfo, Request, Rows, Task
from convserve.spec import ModelSpec
from convserve.tasks.detect import Detections, select

DEFAULTS = {"score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 100}
MAX_DETECTIONS = 1000


def detections_payload(
    served: ServedModel,
    found: list[Detections],
    placements: list[Placement],
    names: list[str | None],
) -> bytes:
    labels = served.spec.labels
    results = []
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


def thresholds(params: dict[str, str], body: DetectJsonRequest | None) -> dict[str, Any]:
    """The three thresholds from the query or the JSON body (not both, unless equal), each
    within its range: 422 `invalid_request` otherwise."""
    query = {
        "score_threshold": rest.number(params, "score_threshold", float, 0.0, 1.0),
        "iou_threshold": rest.number(params, "iou_threshold", float, 0.0, 1.0),
        "max_detections": rest.number(params, "max_detections", int, 1, MAX_DETECTIONS),
    }
    out: dict[str, Any] = {}
    for name, value in query.items():
        given = getattr(body, name) if body is not None else None
        chosen = rest.same_or_conflict(name, value, given)
        out[name] = DEFAULTS[name] if chosen is None else chosen
    return out


class DetectTask(Task):
    name = "detect"
    routes = {"/detect": "detect"}

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[OutputInfo]:
        return [
            OutputInfo("boxes", "FP32", [-1, -1, 4]),
            OutputInfo("scores", "FP32", [-1, -1, spec.num_classes]),
        ]

    def oip_values(self, spec: ModelSpec, model: OnnxModel, outputs: Rows) -> dict[str, Any]:
        assert isinstance(outputs, tuple)
        boxes, scores = outputs
        return {"boxes": boxes, "scores": scores}

    async def detect(self, inference: Inference, request: Request) -> Answer:
        params = rest.query(request.query_string)

        def resolve(body: DetectJsonRequest | None) -> tuple[ServedModel, dict[str, Any]]:
            model = rest.same_or_conflict("model", params.get("model"), body and body.model)
            version = rest.same_or_conflict("version", params.get("version"), body and body.version)
            chosen = thresholds(params, body)
            return inference.resolve(model, version, self.name), chosen  # type: ignore[arg-type]

        (served, chosen), images = await rest.read_images(
            inference, request.content_type, request.body, DetectJsonRequest, resolve
        )
        batch = await inference.decode(served, images)
        boxes, scores = await inference.run(served, batch.x)  # N x M x 4, N x M x C
        found = [select(b, s, **chosen) for b, s in zip(boxes, scores, strict=True)]
        names = [name for name, _ in images]
        return Answer(detections_payload(served, found, batch.placements, names))

    def router(self) -> APIRouter:
        router = APIRouter()
        params = [
            {
                "name": "score_threshold",
                "in": "query",
                "required": False,
                "description": "drop detections scoring under this (default 0.25)",
                "schema": {"type": "number", "minimum": 0, "maximum": 1},
            },
            {
                "name": "iou_threshold",
                "in": "query",
                "required": False,
                "description": "non-max suppression's overlap limit, per class (default 0.45)",
                "schema": {"type": "number", "minimum": 0, "maximum": 1},
            },
            {
                "name": "max_detections",
                "in": "query",
                "required": False,
                "description": "most detections per image, best first (default 100)",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_DETECTIONS},
            },
            *rest.MODEL_PARAMETERS,
        ]

        @router.post(
            "/detect",
            response_model=None,
            responses={
                200: {"model": DetectResponse, "description": "one result per image"},
                **rest.INFERENCE_ERRORS,
            },
            summary="Detect objects: boxes in the upload's own pixels, label and score each",
            openapi_extra={
                "parameters": params,
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": rest.multipart_schema("images")},
                        **rest.IMAGE_BODIES,
                        "application/json": {"schema": json_body_schema(DetectJsonRequest)},
                    },
                },
            },
        )
        async def detect_route(request: HttpRequest) -> Response:
            """Served by the raw ASGI path (`hotpath.py`) in the running service."""
            answer = await self.detect(current(request), await rest.plain(request))
            return Response(answer.body, media_type=answer.media_type.decode())

        return router
