"""The inference routes as raw ASGI, in front of the FastAPI app.

    POST /classify, /detect, /embed, /verify, /stylize     (each task's REST routes)
    POST /v2/models/{name}/infer, POST /v2/models/{name}/versions/{version}/infer

These are what clients call thousands of times a second; everything else (/models, the tensor
route, OIP metadata, the OpenAPI document) goes to FastAPI unchanged. Here a request costs no
routing table, no dependency solving, no request object, no response model: the body is read
within the admission limits, handed as bytes to the same handler the documented FastAPI route
calls, and the answer it returns is sent as it is.

The routes come from the objects that own them: each task names its REST routes
(`Task.routes`), the Open Inference Protocol matches its own (`oip.match_infer`), and errors
are rendered by the protocol each path belongs to (`errors.protocol_of`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from convserve.errors import ConvserveError
from convserve.service import oip
from convserve.service.admission import Admission, send_bytes, send_error
from convserve.service.errors import INTERNAL
from convserve.service.inference import Inference
from convserve.service.rest import HEADER_LENGTH
from convserve.service.task import Answer, Request, Task

log = logging.getLogger("convserve.hotpath")

_HEADER_LENGTH = HEADER_LENGTH.lower().encode()


@dataclass(frozen=True, slots=True)
class Route:
    template: str  # the metrics label: the path, or the protocol's template
    handler: Callable[[Inference, Request], Awaitable[Answer]]


class Routes:
    """The inference routes the raw path answers: every task's REST routes (exact paths) and
    the Open Inference Protocol's inference routes."""

    def __init__(self, tasks: Iterable[Task]) -> None:
        handlers = {path: h for task in tasks for path, h in task.handlers().items()}
        self.exact = {path: Route(path, handler) for path, handler in handlers.items()}

    def match(self, path: str) -> Route | None:
        route = self.exact.get(path)
        if route is not None:
            return route
        found = oip.match_infer(path)
        if found is None:
            return None
        template, params = found
        return Route(template, functools.partial(oip.handle_infer, **params))

    def template_of(self, scope: Scope) -> str | None:
        """The metrics label of a request the raw path answers (None: not one of them)."""
        if scope.get("method") != "POST":
            return None
        route = self.match(scope["path"])
        return None if route is None else route.template


def _headers(scope: Scope) -> tuple[str | None, str | None]:
    """Content-Type and Inference-Header-Content-Length, in one pass over the headers."""
    content_type = header_length = None
    for key, value in scope["headers"]:
        if key == b"content-type":
            content_type = value.decode("latin-1")
        elif key == _HEADER_LENGTH:
            header_length = value.decode("latin-1")
    return content_type, header_length


class HotPath:
    """ASGI: the inference routes answered here, every other request passed to `app`. Until
    the service has put its Inference and Admission on `app.state`, everything passes."""

    def __init__(self, app: FastAPI, routes: Routes) -> None:
        self.app = app
        self.state = app.state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.match(scope["path"])
            inference: Inference | None = getattr(self.state, "inference", None)
            if route is not None and inference is not None:
                await self._serve(route, inference, self.state.admission, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        route: Route,
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
            request = Request(scope["query_string"], content_type, body, header_length)
            answer = await route.handler(inference, request)
            clock.clear(watch)
            await send_bytes(send, 200, answer.body, answer.headers, answer.media_type)
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
            self._count(error.code)
            await send_error(scope, send, error)
        except Exception:
            clock.clear(watch)
            log.exception("unhandled error in %s", scope["path"])
            self._count(INTERNAL.code)  # counted and logged as on the FastAPI path
            await send_error(scope, send, INTERNAL)
        finally:
            clock.clear(watch)
            admission.leave(body)

    def _count(self, code: str) -> None:
        if hook := getattr(self.state, "on_error", None):
            hook(code)
