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
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convserve.errors import ConvserveError
from convserve.service import oip
from convserve.service.admission import Admission, send_bytes, send_error
from convserve.service.errors import INTERNAL
from convserve.service.inference import Inference
from convserve.service.metrics import record
from convserve.service.requests_log import HEADER, current, request_id_of
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
                await self.serve(route, inference, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def serve(
        self, route: Route, inference: Inference, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answer one request of `route`: admitted, handled, its answer or error sent."""
        admission: Admission = self.state.admission
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


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class FrontDoor:
    """ASGI, in BentoML's own middleware stack (`add_asgi_middleware`, its public API), ahead
    of its router, its context middleware and the mount of convserve's app.

    Each inference request is answered here, its request id, metrics and access line in this
    one layer (one `send` wrapper where the mounted path has two), which spares it BentoML's
    routing: Starlette's router, the mount's matching and BentoML's request context cost about
    50 µs of CPU a request (docs/benchmarks.md). A path holding a control character goes to
    convserve's app as well: BentoML mounts it with a regular expression whose `.` stops at a
    line break, so such a path would get the router's plain-text 404 instead of convserve's
    JSON answer. Everything else, BentoML's probes included, passes on unchanged."""

    def __init__(
        self, app: ASGIApp, *, hot: HotPath, target: ASGIApp, access_log: bool = False
    ) -> None:
        self.app, self.hot, self.target, self.access_log = app, hot, target, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST":
                route = self.hot.routes.match(scope["path"])
                inference: Inference | None = getattr(self.hot.state, "inference", None)
                if route is not None and inference is not None:
                    await self._answer(route, inference, scope, receive, send)
                    return
            if _CONTROL.search(scope["path"]):
                await self.target(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(
        self, route: Route, inference: Inference, scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = time.perf_counter()
        request_id = request_id_of(scope)
        header = (HEADER, request_id.encode())
        status = 499  # nginx's "client closed request": the client left before any answer

        async def answering(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = current.set(request_id)
        try:
            await self.hot.serve(route, inference, scope, receive, answering)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            record(scope, route.template, status, time.perf_counter() - started, self.access_log)
            current.reset(token)
