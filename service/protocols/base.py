"""What every protocol shares: a request as operations see it, an answer, an error on the wire,
and the protocol object itself.

Contract of an operation: `read` (synchronous: it only takes bytes apart) makes the request's
call (its parameters, the model it names, its payload) or raises a domain error; the server
resolves the model the call names (once, for every route) and hands both to `run`, which
returns the answer or raises a domain error. The operation's protocol renders that error.
Nothing here knows the server.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar
from typing import Protocol as Structural

from convserve.errors import ConvserveError, DeadlineExceeded, ErrorCode, Overloaded
from convserve.spec import TaskName


@dataclass(frozen=True, slots=True)
class WireError:
    status: int
    body: bytes  # JSON
    headers: Mapping[str, str]


class Call(Structural):
    """What `read` made of a request: at least the model and version it names (None: the
    default)."""

    @property
    def model(self) -> str | None: ...
    @property
    def version(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Named:
    """A call that is only its names (metadata, readiness)."""

    model: str | None
    version: str | None


# Reading is plain CPU work on the request's bytes: the server runs it inline, or on a decode
# thread when the body is large.
class Access(StrEnum):
    """Whose token an operation needs (the server checks it)."""

    OPEN = "open"  # probes
    INFERENCE = "inference"
    ADMIN = "admin"  # model control


# Over HTTP an operation reads a `Request` and answers an `Answer`; over gRPC it reads the
# call's message and answers the response message.
Read = Callable[[Any], Any]
Run = Callable[[Any, Any], Awaitable[Any]]  # (the served model or None, the call) -> answer


class Protocol:
    """A protocol whose operations the server runs (over HTTP, `WireProtocol`; over gRPC,
    `oip.grpc.GrpcOip`)."""

    name: ClassVar[str]


@dataclass(frozen=True)
class Operation:
    """One route's handler, for every path it is registered under (the path, or its template,
    is the request's metrics label)."""

    method: str
    protocol: Protocol
    read: Read
    run: Run
    resolves: bool = True  # the server resolves the call's model before `run`
    task: TaskName | None = None  # a model of this task (None: any)
    admitted: bool = True  # the body is read within the admission limits and takes a place
    access: Access = Access.INFERENCE  # whose token it needs (server.Tokens)


def retry_headers(error: ConvserveError) -> dict[str, str]:
    """The headers an error's answer carries: when to retry, or how to authenticate."""
    if isinstance(error, Overloaded | DeadlineExceeded):
        return {"Retry-After": str(error.retry_after_s)}
    if error.code is ErrorCode.UNAUTHENTICATED:
        return {"WWW-Authenticate": 'Bearer realm="convserve"'}
    return {}


class WireProtocol(Protocol, ABC):
    """A protocol over HTTP: the paths it owns, how it renders an error, and its operations."""

    prefix: ClassVar[str]  # it owns this path and everything under it ("/": every path)

    @classmethod
    def owns(cls, path: str) -> bool:
        return path == cls.prefix or path.startswith(cls.prefix.rstrip("/") + "/")

    @classmethod
    @abstractmethod
    def render_error(cls, error: ConvserveError, request_id: str | None) -> WireError: ...

    @abstractmethod
    def operations(self) -> list[tuple[str, Operation]]:
        """(path or path template, operation), each template with `{name}` parameters."""


INTERNAL = ConvserveError(ErrorCode.INTERNAL_ERROR, "internal error; the server log has details")
