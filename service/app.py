"""The convserve BentoML service: lifecycle and mounting. Protocols live in their own modules.

    bentoml serve convserve.service.app:Classifier

Lifecycle:
  deploy   (`on_deployment`, once, before workers start) every model is verified; a failure
           stops `bentoml serve` with its message and exit status 1.
  load     (`__init__`, per worker) the worker's `Server` (`server.py`): sessions opened on the
           configured providers and self-tested, admission, clock, metrics, protocols.
  warm up  (startup hook) full-size batch and batcher latency model; then /readyz says 200.
  serve    the server's front door answers every operation of the protocols (REST with each
           task's routes, the Open Inference Protocol); the FastAPI app below serves the page,
           the OpenAPI document (written from the same route declarations) and /metrics.
  drain    on SIGTERM /readyz turns 503 and requests are served for CONVSERVE_DRAIN_S more;
           then the server stops accepting, in-flight requests finish, exit 0 (`drain.py`).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from convserve import __version__
from convserve.service import errors, heads, heap
from convserve.service.grpc_door import GrpcUnavailable, check_port
from convserve.service.loading import StartupError, preflight
from convserve.service.metrics import exposition
from convserve.service.protocols import rest
from convserve.service.protocols.oip import http as oip
from convserve.service.requests_log import configure
from convserve.service.server import FrontDoor, Server
from convserve.service.settings import ServiceSettings
from convserve.service.tasks import TASKS

log = logging.getLogger("convserve")
# BentoML leaves the root logger at WARNING; the service's own lifecycle lines are INFO.
log.setLevel(logging.INFO)

# BentoML takes the ASGI app it mounts when the service class is defined, so this one is built
# at import: it holds no worker state (that is the `Server`'s), only the page, the documents
# and /metrics.
app = FastAPI(
    title="convserve",
    description="CNN image models on ONNX Runtime with adaptive batching: classification, "
    "detection, embeddings and verification, style transfer. "
    'Every error is JSON: {"error": {"code": ..., "message": ..., "request_id": ...}}.',
    docs_url=None,  # served below, from local assets
    openapi_url="/api/openapi.json",
    redoc_url=None,
)
errors.install(app)
# The protocols' operations, for the document only: the front door answers them.
DOCUMENTED = [*rest.documentation(list(TASKS)).routes, *oip.documentation().routes]


def openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = get_openapi(
            title=app.title,
            version=__version__,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=[*DOCUMENTED, *app.routes],
        )
    return app.openapi_schema


app.openapi = openapi


async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
    """The app as BentoML mounts it: a plain ASGI callable, given every path BentoML does not
    route itself (a Starlette app is given only paths its routes match, so an unknown path
    would get BentoML's plain-text 404 instead of convserve's JSON answer)."""
    await app(scope, receive, send)


STATIC = Path(__file__).resolve().parent / "static"
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.get("/", include_in_schema=False)
def demo_page() -> FileResponse:
    """A page to drop images on: one self-contained file, no external URL."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@app.get("/api/docs", include_in_schema=False)
def api_docs() -> HTMLResponse:
    """Swagger UI from the assets shipped with the service, so it works offline."""
    return get_swagger_ui_html(
        openapi_url="/api/openapi.json",
        title="convserve API",
        swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger-ui/swagger-ui.css",
        swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # no call to validator.swagger.io
    )


@app.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """Prometheus: convserve's metrics (BentoML's request metrics are off, see below)."""
    body, media_type = exposition()
    return Response(body, media_type=media_type)


def _definition_settings() -> ServiceSettings:
    """Settings read when the service is defined (BentoML takes its configuration then).
    Invalid ones fall back to defaults here; verify_models reports them and stops start-up."""
    try:
        return ServiceSettings()
    except ValueError:
        return ServiceSettings.model_construct()


_defined = _definition_settings()
# Slow request heads are closed by the worker's HTTP protocol, which uvicorn loads after this.
heads.install(_defined.header_timeout_s, _defined.max_pending_heads)


@bentoml.service(
    name="convserve",
    workers=_defined.workers,
    # BentoML's per-request deadline, past convserve's own (body, then inference): those answer
    # first, with their own codes.
    traffic={"timeout": _defined.traffic_timeout_s},
    # BentoML's request metrics label by raw path (unbounded on junk URLs) and cost a
    # middleware per request; convserve keeps its own, bounded ones (metrics.py).
    metrics={"enabled": False},
    # OpenTelemetry's middleware costs about a quarter of a millisecond per request even when it
    # samples nothing, so requests skip it unless the operator asks for traces.
    tracing={"sample_rate": _defined.trace_sample_rate}
    if _defined.trace_sample_rate > 0
    else {"excluded_urls": [".*"]},
    # convserve writes its own access lines (with the request id), when CONVSERVE_ACCESS_LOG.
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(mounted, path="/")
class Classifier:
    @bentoml.on_deployment
    def verify_models() -> None:
        """Runs once in the serving process before workers start: fail fast, exit non-zero."""
        configure(_defined.log_format)
        try:
            settings = ServiceSettings()
            check_port(settings.grpc_host, settings.grpc_port)
            preflight(settings)
        except (StartupError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            raise SystemExit(f"convserve cannot start: {exc}") from None

    def __init__(self) -> None:
        settings = ServiceSettings()
        configure(settings.log_format)
        try:
            self.server = Server.start(settings)
        except StartupError as exc:
            raise SystemExit(f"convserve cannot start: {exc}") from None
        self.settings = settings
        self._collector: asyncio.Task[None] | None = None
        for served in self.server.models.all:
            log.info(
                "serving %s (%s, %s) on %s, %d intra-op thread(s), batches of up to %d",
                served.stored.tag,
                served.spec.task,
                served.spec.architecture,
                served.model.provider,
                settings.intra_op_threads,
                served.batcher.max_batch_size,
            )

    @bentoml.on_startup
    async def warm_up(self) -> None:
        try:
            await self.server.warm_up()
        except GrpcUnavailable as exc:
            log.error("cannot start: %s", exc)
            raise SystemExit(f"convserve cannot start: {exc}") from None
        self.server.drain.install(asyncio.get_running_loop())
        heap.freeze()  # models, sessions and the app live as long as the process
        if self.settings.gc_full_interval_s > 0:  # else Python's automatic collection
            self._collector = asyncio.get_running_loop().create_task(
                heap.collect_on_a_clock(full_every_s=self.settings.gc_full_interval_s)
            )
        loop = type(asyncio.get_running_loop())
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
        log.info(
            "warm-up done; ready (event loop %s.%s, HTTP %s)", loop.__module__, loop.__name__, http
        )

    async def __is_ready__(self) -> bool:
        # async: answered on the event loop, never queued behind the thread pool.
        return self.server.ready

    @bentoml.on_shutdown
    async def stop_batchers(self) -> None:
        await self.server.stop_grpc()
        if self._collector is not None:
            self._collector.cancel()
            gc.enable()  # at once: the loop may stop before the cancelled task runs again
        self.server.shutdown()


# BentoML types the argument as a factory protocol, app -> app, which a middleware class is when
# called; pyright compares the instance's __call__ instead.
Classifier.add_asgi_middleware(
    FrontDoor,  # pyright: ignore[reportArgumentType]
    docs=app,
    access_log=_defined.access_log,
)
