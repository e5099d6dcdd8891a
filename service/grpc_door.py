"""The gRPC front door: a `grpc.aio` server on the worker's event loop, beside BentoML's HTTP
server, on the same models, batchers, admission, tokens and metrics.

    call -> GrpcDoor (request id, metrics, access line)
         -> tokens (`authorization: Bearer <token>` metadata, as over HTTP)
         -> admission (the message's bytes held and an in-flight place, as an HTTP body's)
         -> Rpc.operation.read (oip/grpc.py: the message taken apart)
         -> Server.handle (the model resolved, the operation run)
         -> the answer message, or the error as a gRPC status (oip/grpc.py's STATUS)

Several workers share the port: each binds it with SO_REUSEPORT (gRPC's default on Linux) and
the kernel spreads new connections across them. A gRPC connection is long-lived and carries
many calls, so spreading is per connection: a client that wants every worker opens several
channels (perf_analyzer's concurrency does; so do Kubernetes' clients behind a Service).

A message over `max_body_bytes` is refused by gRPC itself (RESOURCE_EXHAUSTED) before a byte
reaches convserve. A client that cancels, or whose deadline passes, cancels its call: its
images are dropped wherever they were, as for an HTTP client that hangs up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from convserve.errors import ConvserveError
from convserve.service.loading import StartupError
from convserve.service.metrics import refused, service_metrics
from convserve.service.protocols.base import INTERNAL, Operation
from convserve.service.protocols.oip.grpc import SERVICE, STATUS, Rpc, error_metadata
from convserve.service.requests_log import SANE_ID, current, log_access, new_request_id

if TYPE_CHECKING:
    from convserve.service.server import Server

log = logging.getLogger("convserve.grpc")
Context = grpc.aio.ServicerContext[Any, Any]
STOP_GRACE_S = 5.0  # calls in flight at shutdown get this long to finish


def _request_id(metadata: Any) -> tuple[str, bytes | None]:
    """The client's sane `x-request-id` (else a new one) and its `authorization`, in one pass."""
    request_id: str | None = None
    authorization: bytes | None = None
    for key, value in metadata or ():
        if key == "x-request-id" and request_id is None:
            text = value if isinstance(value, str) else ""
            request_id = text if SANE_ID.fullmatch(text.encode()) else ""
        elif key == "authorization" and authorization is None:
            authorization = value.encode() if isinstance(value, str) else value
    return request_id or new_request_id(), authorization


@functools.lru_cache(maxsize=256)  # methods and codes are fixed sets; the cache spares lookups
def _children(method: str, status: grpc.StatusCode) -> tuple[Any, Any]:
    metrics = service_metrics()
    return metrics.grpc_requests.labels(method, status.name), metrics.grpc_duration.labels(method)


class GrpcUnavailable(StartupError):
    """The gRPC port cannot be opened; the message says which and what to set."""


def _unavailable(address: str) -> GrpcUnavailable:
    return GrpcUnavailable(
        f"cannot listen for gRPC on {address}: the port is taken or the address is not this "
        "machine's; set CONVSERVE_GRPC_PORT (0 turns gRPC off) or CONVSERVE_GRPC_HOST"
    )


def check_port(host: str, port: int) -> None:
    """Before the workers start (the serving process's pre-flight): the port can be bound
    as the workers will bind it (SO_REUSEPORT), else `GrpcUnavailable`, so a taken port stops
    start-up at once instead of failing every worker the process manager restarts."""
    if not port:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(infos[0][4])
    except OSError:
        raise _unavailable(f"{host}:{port}") from None


class GrpcDoor:
    def __init__(self, server: Server, rpcs: list[Rpc], access_log: bool = False) -> None:
        self.server, self.rpcs, self.access_log = server, rpcs, access_log
        self._grpc: grpc.aio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listening on host:port (the port it bound)."""
        settings = self.server.settings
        grpc_server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
            ]
        )
        handlers = {rpc.name: self._handler(rpc) for rpc in self.rpcs}
        grpc_server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = grpc_server.add_insecure_port(address)
        except RuntimeError:  # in use by a process that does not share it, or not an address
            raise _unavailable(address) from None
        await grpc_server.start()
        self._grpc = grpc_server
        log.info("gRPC (%s) on %s", SERVICE, address)
        return bound

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(STOP_GRACE_S)
            self._grpc = None

    def _handler(self, rpc: Rpc) -> grpc.RpcMethodHandler[Any, Any]:
        parse: Callable[[bytes], Any] = rpc.request.FromString

        def deserialize(data: bytes) -> tuple[int, Any]:  # the size, for admission
            return len(data), parse(data)

        if rpc.streaming:

            async def stream(requests: AsyncIterator[tuple[int, Any]], context: Context) -> None:
                await self.serve_stream(rpc, requests, context)

            return grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=deserialize,
                response_serializer=rpc.response.SerializeToString,
            )

        async def call(request: tuple[int, Any], context: Context) -> Any:
            return await self.serve(rpc, request[0], request[1], context)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=deserialize,
            response_serializer=rpc.response.SerializeToString,
        )

    async def _answer(self, operation: Operation, size: int, message: Any) -> Any:
        """A message's answer: admitted, read, resolved, run; domain errors raised."""
        admission = self.server.admission
        if operation.admitted:
            admission.admit_message(size)
        try:
            return await self.server.handle(operation, operation.read(message))
        finally:
            if operation.admitted:
                admission.leave_message(size)

    async def serve(self, rpc: Rpc, size: int, message: Any, context: Context) -> Any:
        """One unary call: its answer, or its error as the call's status."""
        server, operation = self.server, rpc.operation
        started = time.perf_counter()
        request_id, authorization = _request_id(context.invocation_metadata())
        token = current.set(request_id)
        status = grpc.StatusCode.OK
        try:
            try:
                server.tokens.check(operation.access, authorization)
                answer = await self._answer(operation, size, message)
                context.set_trailing_metadata((("x-request-id", request_id),))
                return answer
            except asyncio.CancelledError:
                # The client cancelled, or its deadline passed: nobody is left to answer.
                status = grpc.StatusCode.CANCELLED
                server.metrics.client_gone.inc()
                raise
            except Exception as raised:  # noqa: BLE001 (every error gets a status, below)
                error = _domain(raised, rpc.name)
            status = STATUS[error.code]
            refused(error.code)
            await context.abort(status, error.message, error_metadata(error, request_id))
        finally:
            self._record(rpc.name, status, time.perf_counter() - started)
            current.reset(token)

    async def serve_stream(
        self, rpc: Rpc, requests: AsyncIterator[tuple[int, Any]], context: Context
    ) -> None:
        """ModelStreamInfer: each request on the stream answered as it completes (in any
        order: a response carries its request's `id`), several at once, each admitted as a
        call of its own. A request's error is its response's `error_message`; the stream goes
        on. The token is checked once, from the stream's metadata."""
        server, operation = self.server, rpc.operation
        request_id, authorization = _request_id(context.invocation_metadata())
        token = current.set(request_id)  # the stream's, in every request's task
        try:
            server.tokens.check(operation.access, authorization)
        except ConvserveError as error:
            refused(error.code)
            current.reset(token)
            await context.abort(STATUS[error.code], error.message,
                                error_metadata(error, request_id))  # fmt: skip
        writing = asyncio.Lock()
        running: set[asyncio.Task[None]] = set()

        async def one(size: int, message: Any) -> None:
            started = time.perf_counter()
            status = grpc.StatusCode.OK
            try:
                response = await self._answer(operation, size, message)
            except Exception as raised:  # noqa: BLE001 (every error gets an answer)
                error = _domain(raised, rpc.name)
                status = STATUS[error.code]
                refused(error.code)
                response = rpc.response(error_message=error.message)
                response.infer_response.id = message.id
            async with writing:
                await context.write(response)
            self._record(rpc.name, status, time.perf_counter() - started)

        try:
            async for size, message in requests:
                task = asyncio.get_running_loop().create_task(one(size, message))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            for task in running:  # the client went: what it asked is dropped
                task.cancel()
            current.reset(token)

    def _record(self, method: str, status: grpc.StatusCode, seconds: float) -> None:
        count, duration = _children(method, status)
        count.inc()
        duration.observe(seconds)
        if self.access_log:
            log_access("gRPC", method, status.value[0], seconds)


def _domain(raised: Exception, method: str) -> ConvserveError:
    """The error a client is told: a domain error as it is; anything else, logged, as an
    internal error without its details."""
    if isinstance(raised, ConvserveError):
        return raised
    log.error("unhandled error in %s", method, exc_info=raised)
    return INTERNAL
