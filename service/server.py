"""The server: one object per worker that owns its models, admission, clock, metrics and the
protocols, and the one ASGI front door through which every request enters.

    request -> FrontDoor (request id, metrics, access line)
            -> Routes.match (path -> operation of a protocol)
            -> Server.serve: admission (body within limits, an in-flight place)
                             -> operation.read (the protocol takes the request apart)
                             -> Models.get (the model it names, resolved here for every route)
                             -> operation.run (the task's stages: decode, batch, encode)
                             -> the answer, or the error in the operation's protocol

Everything that is not an operation (the page, the OpenAPI document, /metrics, BentoML's probes)
passes to BentoML's app unchanged, with its request id and metrics taken here too.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import bentoml
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convserve.errors import ConvserveError, ErrorCode, InvalidInput, NotServed
from convserve.service.admission import CLOSE, Admission, BodyRefused, ClientGone
from convserve.service.clock import Clock
from convserve.service.control import Control, shared_state
from convserve.service.decoding import INLINE_BYTES, Decoder
from convserve.service.drain import Drain
from convserve.service.grpc_door import GrpcDoor
from convserve.service.loading import ServedModel, load_models, warm_up
from convserve.service.messages import Request
from convserve.service.metrics import ServiceMetrics, refused, service_metrics
from convserve.service.protocols.base import INTERNAL, Access, Operation, WireProtocol
from convserve.service.protocols.oip.grpc import GrpcOip, Rpc
from convserve.service.protocols.oip.http import Oip
from convserve.service.protocols.oip.model import Inference
from convserve.service.protocols.oip.types import HEADER_LENGTH
from convserve.service.protocols.rest import Rest
from convserve.service.requests_log import SANE_ID, current, log_access, new_request_id
from convserve.service.settings import ServiceSettings
from convserve.service.tasks import TASKS
from convserve.service.tasks.base import Task
from convserve.spec import TaskName

log = logging.getLogger("convserve.server")
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()


# --- tokens ------------------------------------------------------------------------------------
# Two scopes, two tokens (docs/security.md), read when the worker builds its server, never at
# import: CONVSERVE_API_TOKEN for inference, metadata, the model listing and the page's API;
# CONVSERVE_ADMIN_TOKEN for model control only (not an inference token). Probes stay open.
# Compared in constant time; never logged or echoed.

BEARER = b"bearer "


@dataclass(frozen=True, slots=True, repr=False)
class Tokens:
    inference: bytes | None = None
    admin: bytes | None = None

    def __repr__(self) -> str:  # whether each is set, never its value: a repr may reach a log
        def state(token: bytes | None) -> str:
            return "set" if token else "unset"

        return f"Tokens(inference={state(self.inference)}, admin={state(self.admin)})"

    @classmethod
    def of(cls, inference: str | None, admin: str | None) -> Tokens:
        return cls(inference.encode() if inference else None, admin.encode() if admin else None)

    def check(self, access: Access, authorization: bytes | None) -> None:
        """Nothing when a request of `access` with this Authorization header may proceed;
        `ConvserveError` (401 or 403) when it may not."""
        if access is Access.OPEN:
            return
        if access is Access.ADMIN and self.admin is None:
            raise ConvserveError(
                ErrorCode.FORBIDDEN,
                "model control is off: start the server with CONVSERVE_ADMIN_TOKEN set to "
                "enable the repository API",
            )
        expected = self.admin if access is Access.ADMIN else self.inference
        if expected is None:
            return
        sent = _bearer(authorization)
        if sent is None:
            raise ConvserveError(
                ErrorCode.UNAUTHENTICATED, f"this route needs the {access} token: send "
                "`Authorization: Bearer <token>`"
            )  # fmt: skip
        if not hmac.compare_digest(sent, expected):
            raise ConvserveError(ErrorCode.UNAUTHENTICATED, f"not the {access} token")


def _bearer(authorization: bytes | None) -> bytes | None:
    if authorization is None or authorization[:7].lower() != BEARER:
        return None
    return authorization[7:].strip() or None


# --- the models -------------------------------------------------------------------------------


@dataclass
class Models:
    """The served models: lookup by name, version and task. The first configured model is the
    default, and the first of each task that task's default. Changed only by swapping in a new
    list (`_set`), so a lookup never sees half a change."""

    all: list[ServedModel]
    ready: bool = False  # True once warmed up
    _by_name: dict[str, list[ServedModel]] = field(default_factory=dict[str, list[ServedModel]])

    def __post_init__(self) -> None:
        self._set(self.all)

    def _set(self, served: list[ServedModel]) -> None:
        by_name: dict[str, list[ServedModel]] = {}
        for one in served:
            by_name.setdefault(one.stored.name, []).append(one)
        self.all, self._by_name = served, by_name

    @property
    def default(self) -> ServedModel:
        return self.all[0]

    def versions(self, name: str) -> list[str]:
        return [m.stored.version for m in self._by_name.get(name, [])]

    def get(
        self, name: str | None = None, version: str | None = None, task: TaskName | None = None
    ) -> ServedModel:
        """The model a request asked for; `NotServed` when it is not served. Without a name,
        the default model (the first served model of `task`, when a task is given)."""
        if name is None:
            if task is not None:
                default = next((m for m in self.all if m.spec.task == task), None)
                if default is None:
                    raise NotServed(
                        ErrorCode.MODEL_NOT_FOUND,
                        f"no {task} model is served; GET /models lists the served ones",
                    )
                name = default.stored.name
                if version is None:
                    return default
            elif version is None:
                return self.default
            else:
                name = self.default.stored.name
        served = self._named(name, version)
        if task is not None and served.spec.task != task:
            raise InvalidInput(
                ErrorCode.WRONG_TASK,
                f"model {name!r} is a {served.spec.task} model, not a {task} one; "
                "GET /models lists each model's task",
            )
        return served

    def _named(self, name: str, version: str | None) -> ServedModel:
        candidates = self._by_name.get(name)
        if not candidates:
            raise NotServed(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {name!r} is not served; GET /models lists the served ones",
            )
        if version is None:
            return candidates[0]
        if version == "latest":
            return max(candidates, key=lambda m: m.stored.created)
        for served in candidates:
            if served.stored.version == version:
                return served
        raise NotServed(
            ErrorCode.VERSION_NOT_FOUND,
            f"version {version!r} of model {name!r} is not served; GET /models lists them",
        )

    def replace(self, served: ServedModel) -> list[ServedModel]:
        """`served` in place of every served version of its name (where the first of them
        was, or last); the versions it replaced."""
        name = served.stored.name
        old = self._by_name.get(name, [])
        models = [m for m in self.all if m.stored.name != name]
        at = self.all.index(old[0]) if old else len(self.all)
        models.insert(min(at, len(models)), served)
        self._set(models)
        return old

    def remove(self, name: str) -> list[ServedModel]:
        old = self._by_name.get(name, [])
        if not old:
            raise NotServed(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not served")
        if len(old) == len(self.all):
            raise InvalidInput(
                ErrorCode.INVALID_REQUEST,
                f"{name!r} is the only model served; load another before unloading it",
            )
        self._set([m for m in self.all if m.stored.name != name])
        return old


@dataclass(frozen=True, slots=True)
class Found:
    """A request's route: its metrics label, the operations of its path, its path parameters."""

    template: str
    methods: Mapping[str, Operation]
    params: Mapping[str, str]
    protocol: type[WireProtocol]


def _pattern(template: str) -> re.Pattern[str]:
    """`/v2/models/{name}/infer` -> a pattern whose group `name` is one path segment."""
    parts = [
        f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") else re.escape(part)
        for part in template.split("/")
    ]
    return re.compile("^" + "/".join(parts) + "$")


class Routes:
    """Every protocol's operations by path: exact paths in a dict, templates (`{name}`, one
    path segment each) tried in order after them."""

    def __init__(self, protocols: list[WireProtocol]) -> None:
        exact: dict[str, dict[str, Operation]] = {}
        templates: dict[str, dict[str, Operation]] = {}
        owner: dict[str, type[WireProtocol]] = {}
        for protocol in protocols:
            for path, operation in protocol.operations():
                table = templates if "{" in path else exact
                table.setdefault(path, {})[operation.method] = operation
                owner[path] = type(protocol)
        self.exact = {p: Found(p, ops, {}, owner[p]) for p, ops in exact.items()}
        self.templates = [
            (_pattern(p), Found(p, ops, {}, owner[p])) for p, ops in templates.items()
        ]

    def match(self, path: str) -> Found | None:
        found = self.exact.get(path)
        if found is not None:
            return found
        for pattern, template in self.templates:
            m = pattern.match(path)
            if m is not None:
                return Found(template.template, template.methods, m.groupdict(), template.protocol)
        return None


@dataclass
class Server:
    """A worker's server: built once, in the BentoML service's `__init__`."""

    settings: ServiceSettings
    tasks: dict[TaskName, Task]
    models: Models
    control: Control
    tokens: Tokens
    admission: Admission
    clock: Clock
    metrics: ServiceMetrics
    decoder: Decoder
    routes: Routes
    rpcs: list[Rpc]  # the gRPC service's methods (grpc_door.py)
    drain: Drain
    grpc_port: int | None = None  # the port gRPC listens on, once started
    _follower: asyncio.Task[None] | None = field(default=None, repr=False)
    _grpc: GrpcDoor | None = field(default=None, repr=False)

    @classmethod
    def start(cls, settings: ServiceSettings) -> Server:
        """Every served model loaded and verified (`StartupError` if one cannot be), and the
        parts that serve them."""
        metrics = service_metrics()
        # One clock per worker: body deadlines, hang-up watches, inference deadlines, gauges.
        clock = Clock()
        decoder = Decoder.create(settings)
        tasks = {task.name: task(decoder, settings) for task in TASKS}
        models = Models(load_models(settings, metrics, tasks, clock))
        control = Control(settings, models, tasks, clock, metrics, shared_state())
        admission = Admission(
            max_body_bytes=settings.max_body_bytes,
            max_in_flight=settings.max_in_flight,
            max_held_bytes=settings.max_held_bytes,
            max_pending_bodies=settings.max_pending_bodies,
            body_timeout_s=settings.body_timeout_s,
            clock=clock,
        )
        inference = Inference(decoder, settings)
        protocols: list[WireProtocol] = [
            Oip(inference, settings, models, control),
            Rest(list(tasks.values()), settings, models),
        ]
        drain = Drain(settings.drain_s)
        grpc = GrpcOip(settings, models, control, inference, lambda: server.ready)
        tokens = Tokens.of(settings.api_token, settings.admin_token)
        server = cls(
            settings, tasks, models, control, tokens, admission, clock, metrics, decoder,
            Routes(protocols), grpc.rpcs(), drain,
        )  # fmt: skip
        clock.on_tick = server._sample_gauges
        return server

    @property
    def ready(self) -> bool:
        """Warmed up and not draining: what /readyz and the protocols' readiness answer."""
        return self.models.ready and not self.drain.draining

    async def warm_up(self) -> None:
        await warm_up(self.models.all, self.settings)
        self.models.ready = True
        # Another worker's model control, followed (control.py).
        self._follower = asyncio.get_running_loop().create_task(self.control.follow())
        if self.settings.grpc_port:
            self._grpc = GrpcDoor(self, self.rpcs, self.settings.access_log)
            self.grpc_port = await self._grpc.start(
                self.settings.grpc_host, self.settings.grpc_port
            )

    async def stop_grpc(self) -> None:
        """Stop taking gRPC calls; those in flight get grpc_door.STOP_GRACE_S to finish."""
        if self._grpc is not None:
            await self._grpc.stop()

    def shutdown(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        self.clock.stop()
        for served in self.models.all:
            served.batcher.shutdown()
        self.decoder.shutdown()

    def _sample_gauges(self) -> None:
        """Ten times a second (the request clock's tick), not on every request."""
        self.metrics.in_flight.set(self.admission.in_flight)
        for served in self.models.all:
            name, version = served.stored.tag.split(":", 1)
            self.metrics.queued.labels(name, version).set(served.batcher.queued_images)

    async def handle(self, operation: Operation, call: Any) -> Any:
        """A call read by its protocol, whatever the transport: the model it names resolved
        (when the operation resolves one) and the operation run on it."""
        if not operation.resolves:
            return await operation.run(None, call)
        served = self.models.get(call.model, call.version, operation.task)
        served.active += 1  # counted, so that a reload or an unload waits for it (control.py)
        try:
            return await operation.run(served, call)
        finally:
            served.active -= 1

    async def serve(self, found: Found, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one request of a route: admitted, read, resolved, run; its answer or its error
        (in the operation's protocol) sent."""
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        operation = found.methods.get(method)
        if operation is None:
            allow = ", ".join(
                sorted({*found.methods, *(["HEAD"] if "GET" in found.methods else [])})
            )
            error = ConvserveError(ErrorCode.METHOD_NOT_ALLOWED, "Method Not Allowed")
            await _send_error(found.protocol, send, error, {"Allow": allow})
            return
        protocol = found.protocol
        content_type, header_length, authorization = _headers(scope)
        try:  # before a byte of the body is read
            self.tokens.check(operation.access, authorization)
        except ConvserveError as error:
            await _send_error(protocol, send, error)
            return
        body = b""
        if operation.admitted:
            try:
                body = await self.admission.admit(scope, receive)
            except ClientGone:  # while it was still sending its body: nothing to answer
                self.metrics.client_gone.inc()
                return
            except BodyRefused as refusal:
                await _send_error(protocol, send, refusal.error, CLOSE if refusal.close else None)
                return
            except ConvserveError as error:
                await _send_error(protocol, send, error)
                return
        # From a tick on, a hang-up cancels this task (clock.py); cleared once the answer is
        # ready, so from there a disconnect changes nothing.
        watch = self.clock.watch(receive) if operation.admitted else None
        try:
            request = Request(
                scope["query_string"], content_type, body, header_length, found.params
            )
            if len(body) <= INLINE_BYTES:
                call = operation.read(request)
            else:  # taking a large body apart would hold the loop (decoding.INLINE_BYTES)
                loop = asyncio.get_running_loop()
                call = await loop.run_in_executor(self.decoder.threads, operation.read, request)
            answer = await self.handle(operation, call)
            self.clock.clear(watch)
            await send_bytes(send, answer.status, answer.body, answer.headers, answer.media_type)
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                raise
            # The client left: its images were dropped wherever they were (decode result
            # discarded, batcher job skipped); nobody is left to answer.
            current = asyncio.current_task()
            assert current is not None  # a request is a task
            current.uncancel()
            self.metrics.client_gone.inc()
        except ConvserveError as error:
            self.clock.clear(watch)
            await _send_error(protocol, send, error)
        except Exception:
            self.clock.clear(watch)
            log.exception("unhandled error in %s", scope["path"])
            await _send_error(protocol, send, INTERNAL)
        finally:
            self.clock.clear(watch)
            if operation.admitted:
                self.admission.leave(body)


def _headers(scope: Scope) -> tuple[str | None, str | None, bytes | None]:
    """Content-Type, Inference-Header-Content-Length and Authorization, in one pass over the
    headers."""
    content_type = header_length = None
    authorization = None
    for key, value in scope["headers"]:
        if key == b"content-type":
            content_type = value.decode("latin-1")
        elif key == _HEADER_LENGTH:
            header_length = value.decode("latin-1")
        elif key == b"authorization" and authorization is None:  # the first, as sent
            authorization = value
    return content_type, header_length, authorization


async def _send_error(
    protocol: type[WireProtocol] | WireProtocol,
    send: Send,
    error: ConvserveError,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Every error answer of an operation: counted, logged, rendered by its protocol."""
    refused(error.code)
    wire = protocol.render_error(error, current.get())
    await send_bytes(send, wire.status, wire.body, {**wire.headers, **(headers or {})})


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None,
    media_type: bytes = b"application/json",
) -> None:  # fmt: skip
    raw_headers = [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


# X-Request-ID: the client's when it is sane (requests_log.SANE_ID), else a new one; echoed in
# the response header, in every error body (`request_id`) and in every log line written while
# the request is handled.
HEADER = b"x-request-id"


def request_id_of(scope: Scope) -> str:
    """The client's sane X-Request-ID, or a new one."""
    return _incoming(scope) or new_request_id()


def _incoming(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == HEADER:
            return value.decode("ascii") if SANE_ID.fullmatch(value) else None
    return None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def record(scope: Scope, route: str, status: int, seconds: float, access_log: bool) -> None:
    """One answered request: counted by route template, method and status, and timed; with
    `access_log`, its access line."""
    method = scope["method"] if scope["method"] in METHODS else "other"
    count, duration = _children(route, method, status)
    count.inc()
    duration.observe(seconds)
    if access_log:
        log_access(scope["method"], scope["path"], status, seconds)


@functools.lru_cache(maxsize=1024)  # labels come from bounded sets; the cache spares lookups
def _children(route: str, method: str, status: int) -> tuple[Any, Any]:
    metrics = service_metrics()
    return metrics.requests.labels(route, method, str(status)), metrics.duration.labels(route)


def route_template(scope: Scope) -> str:
    """The metrics label of a request routed by BentoML and Starlette: its route's template."""
    route: Any = scope.get("route")
    if route is None or isinstance(route, Mount):  # BentoML's mount of the app, no route of ours
        return "unmatched"
    return getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"


class FrontDoor:
    """ASGI, in BentoML's own middleware stack (`add_asgi_middleware`, its public API), ahead
    of its router, its context middleware and the mount of convserve's documentation app.

    Every HTTP request gets its request id, metrics and access line here. The operations of
    the protocols (`Server.routes`) are answered here, which spares them BentoML's routing
    (Starlette's router, the mount's matching and BentoML's request context cost about 50 µs
    of CPU a request, docs/benchmarks.md). A path holding a control character goes to the
    documentation app directly: BentoML mounts it with a regular expression whose `.` stops at
    a line break, so such a path would get the router's plain-text 404 instead of convserve's
    JSON answer. Everything else, BentoML's probes included, passes on unchanged.

    The worker's `Server` is taken from the service BentoML has just started, once, when the
    lifespan's start-up completes; until then (no request is served before it) every request
    passes on."""

    def __init__(self, app: ASGIApp, *, docs: ASGIApp, access_log: bool = False) -> None:
        self.app, self.docs, self.access_log = app, docs, access_log
        self.server: Server | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.app(scope, receive, self._binding(send))
        else:
            await self.app(scope, receive, send)

    def _binding(self, send: Send) -> Send:
        async def bind(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.server = cast(Server, bentoml.get_current_service().server)
            elif message["type"] == "lifespan.shutdown.complete":
                self.server = None
            await send(message)

        return bind

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = request_id_of(scope)
        header = (HEADER, request_id.encode())
        status = 499  # nginx's "client closed request": the client left before any answer
        found = self.server.routes.match(scope["path"]) if self.server is not None else None

        async def answering(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = current.set(request_id)
        try:
            if found is not None:
                assert self.server is not None
                await self.server.serve(found, scope, receive, answering)
            elif _CONTROL.search(scope["path"]):
                await self.docs(scope, receive, answering)
            else:
                await self.app(scope, receive, answering)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            template = found.template if found is not None else route_template(scope)
            record(scope, template, status, time.perf_counter() - started, self.access_log)
            current.reset(token)
