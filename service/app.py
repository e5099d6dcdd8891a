"""The convserve BentoML service: lifecycle and mounting. Protocols live in their own modules.

    bentoml serve convserve.service.app:Classifier

Lifecycle:
  deploy   (`on_deployment`, once, before workers start) every model is verified; a failure
           stops `bentoml serve` with its message and exit status 1.
  load     (`__init__`, per worker) sessions opened on the configured providers, self-tested.
  warm up  (startup hook) full-size batch and batcher latency model; then /readyz says 200.
  serve    REST (`rest.py`) and the Open Inference Protocol (`oip.py`), behind admission.
  drain    on SIGTERM the server stops accepting, in-flight requests finish, exit 0.
"""

from __future__ import annotations

import logging

import bentoml
from fastapi import FastAPI

from convserve.service import errors, oip, rest
from convserve.service.admission import AdmissionLimits, AdmissionMiddleware
from convserve.service.inference import Inference
from convserve.service.metrics import service_metrics
from convserve.service.pool import ModelPool, StartupError, preflight
from convserve.service.settings import ServiceSettings

log = logging.getLogger("convserve")
# BentoML leaves the root logger at WARNING; the service's own lifecycle lines are INFO.
log.setLevel(logging.INFO)

app = FastAPI(
    title="convserve",
    description="CNN image classification on ONNX Runtime with adaptive batching. "
    'Every error is JSON: {"error": {"code": ..., "message": ...}}.',
    docs_url="/api/docs",
    openapi_url="/api/openapi.json",
    redoc_url=None,
)
app.add_middleware(AdmissionMiddleware)
errors.install(app)
app.include_router(rest.router)
app.include_router(oip.router)


def _access_log() -> bool:
    try:
        return ServiceSettings().access_log
    except ValueError:
        return False


@bentoml.service(
    name="convserve",
    workers=1,
    traffic={"timeout": 60},
    # Read when the service is defined; invalid settings are reported by verify_models.
    logging={"access": {"enabled": _access_log()}},
)
@bentoml.asgi_app(app, path="/")
class Classifier:
    @bentoml.on_deployment
    def verify_models() -> None:
        """Runs once in the serving process before workers start: fail fast, exit non-zero."""
        try:
            preflight(ServiceSettings())
        except (StartupError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            raise SystemExit(f"convserve cannot start: {exc}") from None

    def __init__(self) -> None:
        self.settings = ServiceSettings()
        self.metrics = service_metrics()
        try:
            self.pool = ModelPool.load(self.settings, self.metrics)
        except StartupError as exc:
            raise SystemExit(f"convserve cannot start: {exc}") from None
        # The routes reach this worker's models through the app they are mounted in.
        app.state.inference = Inference.create(self.settings, self.pool)
        app.state.admission = AdmissionLimits(
            max_body_bytes=self.settings.max_body_bytes,
            max_in_flight=self.settings.max_in_flight,
            on_reject=lambda code: self.metrics.rejected.labels(code=code).inc(),
        )
        app.state.on_error = app.state.admission.on_reject
        for served in self.pool.models:
            log.info(
                "serving %s (%s) on %s",
                served.stored.tag,
                served.spec.architecture,
                served.classifier.provider,
            )

    @bentoml.on_startup
    async def warm_up(self) -> None:
        await self.pool.warm_up(self.settings)
        log.info("warm-up done; ready")

    def __is_ready__(self) -> bool:
        return self.pool.ready

    @bentoml.on_shutdown
    def stop_batchers(self) -> None:
        self.pool.shutdown()
