"""The convserve BentoML service: lifecycle and mounting. Protocols live in their own modules.

    bentoml serve convserve.service.app:Classifier

Lifecycle:
  deploy   (`on_deployment`, once, before workers start) every model is verified; a failure
           stops `bentoml serve` with its message and exit status 1.
  load     (`__init__`, per worker) sessions opened on the configured providers, self-tested.
  warm up  (startup hook) full-size batch and batcher latency model; then /readyz says 200.
  serve    each task's REST routes (`tasks/`) and the Open Inference Protocol (`oip.py`),
           behind admission; the raw hot path (`hotpath.py`) answers the inference routes.
  drain    on SIGTERM /readyz turns 503 and requests are served for CONVSERVE_DRAIN_S more;
           then the server stops accepting, in-flight requests finish, exit 0 (`drain.py`).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
from pathlib import Path

import bentoml
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from convserve.service import errors, heap, oip, rest
from convserve.service.admission import Admission, AdmissionMiddleware
from convserve.service.clock import Clock
from convserve.service.drain import Drain
from convserve.service.hotpath import FrontDoor, HotPath, Routes
from convserve.service.inference import Inference
from convserve.service.metrics import RequestMetrics, exposition, service_metrics
from convserve.service.pool import ModelPool, StartupError, preflight
from convserve.service.requests_log import RequestIds, configure
from convserve.service.settings import ServiceSettings
from convserve.service.tasks import TASKS

log = logging.getLogger("convserve")
errors_log = logging.getLogger("convserve.errors")
# BentoML leaves the root logger at WARNING; the service's own lifecycle lines are INFO.
log.setLevel(logging.INFO)

app = FastAPI(
    title="convserve",
    description="CNN image models on ONNX Runtime with adaptive batching: classification, "
    "detection, embeddings and verification, style transfer. "
    'Every error is JSON: {"error": {"code": ..., "message": ..., "request_id": ...}}.',
    docs_url=None,  # served below, from local assets
    openapi_url="/api/openapi.json",
    redoc_url=None,
)
app.add_middleware(AdmissionMiddleware)
errors.install(app)
for _task in TASKS.values():
    if (_router := _task.router()) is not None:
        app.include_router(_router)
app.include_router(rest.router)
app.include_router(oip.router)
ROUTES = Routes(TASKS.values())


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


# The mounted app: FastAPI's routes (models, tensors, metrics, the page, the documentation)
# and, until the service is ready, the inference routes too. Once it is, the front door
# (below) answers those before BentoML routes them.
HOT = HotPath(app, ROUTES)
SERVED = RequestIds(RequestMetrics(HOT, ROUTES.template_of, access_log=_defined.access_log))


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
@bentoml.asgi_app(SERVED, path="/")
class Classifier:
    @bentoml.on_deployment
    def verify_models() -> None:
        """Runs once in the serving process before workers start: fail fast, exit non-zero."""
        configure(_defined.log_format)
        try:
            preflight(ServiceSettings())
        except (StartupError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            raise SystemExit(f"convserve cannot start: {exc}") from None

    def __init__(self) -> None:
        self.settings = ServiceSettings()
        configure(self.settings.log_format)
        self.metrics = service_metrics()
        # One clock per worker: body deadlines, hang-up watches, inference deadlines, gauges.
        clock = Clock()
        try:
            self.pool = ModelPool.load(self.settings, self.metrics, TASKS, clock)
        except StartupError as exc:
            raise SystemExit(f"convserve cannot start: {exc}") from None
        # The routes reach this worker's models through the app they are mounted in.
        app.state.inference = Inference.create(self.settings, self.pool)
        app.state.admission = Admission(
            max_body_bytes=self.settings.max_body_bytes,
            max_in_flight=self.settings.max_in_flight,
            max_held_bytes=self.settings.max_held_bytes,
            max_pending_bodies=self.settings.max_pending_bodies,
            body_timeout_s=self.settings.body_timeout_s,
            on_reject=self._on_error,
            clock=clock,
        )
        app.state.admission.clock.on_tick = self._sample_gauges
        app.state.on_error = self._on_error
        app.state.on_client_gone = self.metrics.client_gone.inc
        self.drain = Drain(self.settings.drain_s)
        for served in self.pool.models:
            log.info(
                "serving %s (%s, %s) on %s, %d intra-op thread(s), batches of up to %d",
                served.stored.tag,
                served.spec.task,
                served.spec.architecture,
                served.model.provider,
                self.settings.intra_op_threads,
                served.batcher.max_batch_size,
            )

    def _on_error(self, code: str) -> None:
        """Every error answer: counted, and one log line (with the request id)."""
        self.metrics.rejected.labels(code).inc()
        errors_log.info("answered %s", code, extra={"code": code})

    def _sample_gauges(self) -> None:
        """Ten times a second (the request clock's tick), not on every request."""
        self.metrics.in_flight.set(app.state.admission.in_flight)
        for served in self.pool.models:
            name, version = served.stored.tag.split(":", 1)
            self.metrics.queued.labels(name, version).set(served.batcher.queued_images)

    @bentoml.on_startup
    async def warm_up(self) -> None:
        await self.pool.warm_up(self.settings)
        self.drain.install(asyncio.get_running_loop())
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
        return self.pool.ready and not self.drain.draining

    @bentoml.on_shutdown
    def stop_batchers(self) -> None:
        app.state.admission.clock.stop()
        if collector := getattr(self, "_collector", None):
            collector.cancel()
            gc.enable()  # at once: the loop may stop before the cancelled task runs again
        self.pool.shutdown()


# BentoML types the argument as a factory protocol, app -> app, which a middleware class is when
# called; pyright compares the instance's __call__ instead.
Classifier.add_asgi_middleware(
    FrontDoor,  # pyright: ignore[reportArgumentType]
    hot=HOT,
    target=SERVED,
    access_log=_defined.access_log,
)
