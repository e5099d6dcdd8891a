"""The inference routes as raw ASGI, in front of the FastAPI app.

    POST /classify
    POST /v2/models/{name}/infer, POST /v2/models/{name}/versions/{version}/infer

These are what clients call thousands of times a second; everything else (/models, the tensor
route, OIP metadata, the OpenAPI document) goes to FastAPI unchanged. Here a request costs no
routing table, no dependency solving, no request object, no response model: the body is read
within the admission limits, handed as bytes to the same `rest.classify` / `oip.infer` the
documented FastAPI routes call, and the JSON those return is sent as it is.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from convserve.errors import ConvserveError
from convserve.service import oip, rest
from convserve.service.admission import Admission, send_bytes, send_error
from convserve.service.errors import INTERNAL
from convserve.service.inference import Inference

log = logging.getLogger("convserve.hotpath")

OIP_MODELS = "/v2/models/"
INFER = "/infer"
HEADER_LENGTH = oip.HEADER_LENGTH.lower().encode()


def route_of(path: str) -> tuple[str, str | None, str | None] | None:
    """('classify', None, None), ('infer', name, version or None), or None: not ours."""
    if path == "/classify":
        return "classify", None, None
    if path.startswith(OIP_MODELS) and path.endswith(INFER):
        parts = path[len(OIP_MODELS) : -len(INFER)].split("/")
        if len(parts) == 1 and parts[0]:
            return "infer", parts[0], None
        if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
            return "infer", parts[0], parts[2]
    return None


def template_of(scope: Scope) -> str | None:
    """The metrics label of a request this path answers (None: not one of them)."""
    route = route_of(scope["path"]) if scope.get("method") == "POST" else None
    if route is None:
        return None
    kind, _, version = route
    if kind == "classify":
        return "/classify"
    return "/v2/models/{name}/versions/{version}/infer" if version else "/v2/models/{name}/infer"


def _headers(scope: Scope) -> tuple[str | None, str | None]:
    """Content-Type and Inference-Header-Content-Length, in one pass over the headers."""
    content_type = header_length = None
    for key, value in scope["headers"]:
        if key == b"content-type":
            content_type = value.decode("latin-1")
        elif key == HEADER_LENGTH:
            header_length = value.decode("latin-1")
    return content_type, header_length


class HotPath:
    """ASGI: the inference routes answered here, every other request passed to `app`. Until
    the service has put its Inference and Admission on `app.state`, everything passes."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = route_of(scope["path"])
            inference: Inference | None = getattr(self.state, "inference", None)
            if route is not None and inference is not None:
                await self._serve(route, inference, self.state.admission, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        route: tuple[str, str | None, str | None],
        inference: Inference,
        admission: Admission,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        body = await admission.admit(scope, receive, send)
        if body is None:
            return
        # From a tick on, a hang-up cancels this task (clock.py); cleared once the answer is
        # ready, so from there a disconnect changes nothing.
        clock = admission.clock
        watch = clock.watch(receive)
        try:
            content_type, header_length = _headers(scope)
            kind, name, version = route
            if kind == "classify":
                payload = await rest.classify(inference, scope["query_string"], content_type, body)
                clock.clear(watch)
                await send_bytes(send, 200, payload)
            else:
                assert name is not None
                payload, json_length = await oip.infer(
                    inference, name, version, header_length, body
                )
                clock.clear(watch)
                if json_length is None:
                    await send_bytes(send, 200, payload)
                else:
                    headers = {oip.HEADER_LENGTH: str(json_length)}
                    await send_bytes(send, 200, payload, headers, b"application/octet-stream")
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            # The client left: its images were dropped wherever they were (decode result
            # discarded, batcher job skipped); nobody is left to answer.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if hook := getattr(self.state, "on_client_gone", None):
                hook()
        except ConvserveError as error:
            clock.clear(watch)
            if hook := getattr(self.state, "on_error", None):
                hook(error.code)
            await send_error(scope, send, error)
        except Exception:
            clock.clear(watch)
            log.exception("unhandled error in %s", scope["path"])
            await send_error(scope, send, INTERNAL)
        finally:
            clock.clear(watch)
            admission.leave(body)
