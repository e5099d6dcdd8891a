"""Triton's model repository extension over HTTP, so that tritonclient's
`get_model_repository_index`, `load_model` and `unload_model` work unchanged:

    POST /v2/repository/index                 every model in the store: name, version, state
    POST /v2/repository/models/{name}/load    load, or reload, its latest version (or the one
                                              `parameters.version` names)
    POST /v2/repository/models/{name}/unload  stop serving it

Admin token only (`server.Tokens`). The repository is the local model store: nothing is fetched
from a URL or uploaded through the API (a `config` or `file:` parameter is refused); what
enters the store enters through `convserve export` or `convserve import` on the machine. The
loading itself (verify, warm up, swap, drain) is the server's (`ModelControl`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from convserve.errors import ErrorCode, InvalidInput
from convserve.service.messages import Answer, Request, json_answer
from convserve.service.protocols.base import Access, Named, Operation, WireProtocol
from convserve.service.protocols.oip.types import bad_request

PREFIX = "/v2/repository"


class ModelControl(Protocol):
    """What the server does for the repository API."""

    def index(self) -> list[dict[str, str]]: ...

    async def load(self, name: str, version: str | None) -> None: ...

    async def unload(self, name: str) -> None: ...


class _Control(BaseModel):
    model_config = ConfigDict(extra="allow")

    parameters: dict[str, Any] = Field(default_factory=dict[str, Any])


REFUSED_HINT = (
    "models are loaded from the local store only; add them with `convserve export` or "
    "`convserve import` on the machine"
)


def refused_keys(parameters: Iterable[str]) -> list[str]:
    """The load parameters that would bring a model from outside the store (Triton's
    `config` and `file:<path>` overrides): refused."""
    return sorted(k for k in parameters if k == "config" or k.startswith("file:"))


def read_control(request: Request) -> Named:
    """The model a load or unload names, and for a load the version its parameters name."""
    name = request.path_params.get("name")
    if not request.body.strip():
        return Named(name, None)
    try:
        parameters = _Control.model_validate_json(request.body).parameters
    except ValidationError:
        raise bad_request('the body is not a repository request: {"parameters": {...}}') from None
    refused = refused_keys(parameters)
    if refused:
        raise InvalidInput(ErrorCode.INVALID_REQUEST, f"{', '.join(refused)}: {REFUSED_HINT}")
    version = parameters.get("version")
    if version is not None and (not isinstance(version, str) or not version):
        raise bad_request("parameters.version must be a version string")
    return Named(name, version)


def read_nothing(request: Request) -> Named:
    return Named(None, None)


class Repository:
    """The repository operations, for the Open Inference Protocol's routes."""

    def __init__(self, control: ModelControl) -> None:
        self.control = control

    def operations(self, protocol: WireProtocol) -> list[tuple[str, Operation]]:
        def admin(read: Any, run: Any) -> Operation:
            return Operation("POST", protocol, read, run, resolves=False, access=Access.ADMIN)

        return [
            (PREFIX + "/index", admin(read_nothing, self.index)),
            (PREFIX + "/models/{name}/load", admin(read_control, self.load)),
            (PREFIX + "/models/{name}/unload", admin(read_control, self.unload)),
        ]

    async def index(self, served: None, call: Named) -> Answer:
        return Answer(json.dumps(self.control.index()).encode())

    async def load(self, served: None, call: Named) -> Answer:
        assert call.model is not None
        await self.control.load(call.model, call.version)
        return json_answer({})

    async def unload(self, served: None, call: Named) -> Answer:
        assert call.model is not None
        await self.control.unload(call.model)
        return json_answer({})


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY (served) or UNAVAILABLE (in the store, not served)")
    reason: str = ""


def documentation(errors: dict[int | str, Any]) -> APIRouter:
    router = APIRouter(tags=["v2 repository"])
    never = "answered by the server's front door"

    @router.post(
        PREFIX + "/index",
        summary="Model repository: every model in the store and its state (admin token)",
        responses=errors,
    )
    async def repository_index() -> list[RepositoryModel]:
        raise AssertionError(never)

    @router.post(
        PREFIX + "/models/{name}/load",
        summary="Load or reload a model's latest version, or parameters.version (admin token)",
        responses=errors,
    )
    async def repository_load(name: str) -> dict[str, Any]:
        raise AssertionError(never)

    @router.post(
        PREFIX + "/models/{name}/unload",
        summary="Stop serving a model, after its requests in flight (admin token)",
        responses=errors,
    )
    async def repository_unload(name: str) -> dict[str, Any]:
        raise AssertionError(never)

    return router
