"""The models a service serves: each verified, with its own session and batcher.

Start-up contract for every model, in `open_model`: present in the store; every file byte for
byte as exported (sha256) and no other file; session created on the requested providers; the
spec inside the ONNX file equal to spec.json; and the known answer reproduced from raw uint8
pixels through the serving preprocessing, labels included. Any failure is a `StartupError`
whose one-line message names the file at fault, for operators.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from convserve.errors import NotServed
from convserve.preprocess import from_pixels
from convserve.runtime import OnnxClassifier, ProviderError, SessionConfig, make_session
from convserve.service.batching import Batcher
from convserve.service.metrics import ServiceMetrics
from convserve.service.settings import ServiceSettings
from convserve.spec import ONNX_METADATA_KEY, ModelSpec
from convserve.store import StoredModel, StoreError, load_model, read_known_answer, verify_files

log = logging.getLogger("convserve.pool")


class StartupError(Exception):
    """A served model cannot be used; the service must not start."""


def session_config(settings: ServiceSettings) -> SessionConfig:
    return SessionConfig(
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        providers=tuple(settings.providers),
        allow_provider_fallback=settings.allow_provider_fallback,
        graph_optimization_level=settings.graph_optimization_level,
        enable_mem_arena=settings.enable_mem_arena,
    )


def check_spec_matches_onnx(stored: StoredModel, classifier: OnnxClassifier) -> None:
    """spec.json says what the ONNX file itself says (metrics aside: INT8 versions carry their
    own); a spec edited after export, labels or normalization, is refused here."""
    meta = classifier.session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    try:
        inside = ModelSpec.model_validate_json(meta or "")
    except ValueError:
        raise StartupError(f"model {stored.tag}: model.onnx carries no convserve spec") from None
    if inside.model_dump(exclude={"metrics"}) != stored.spec.model_dump(exclude={"metrics"}):
        raise StartupError(
            f"model {stored.tag}: spec.json differs from the spec inside model.onnx "
            "(labels, input or normalization); re-export the model"
        )


def check_known_answer(stored: StoredModel, classifier: OnnxClassifier, atol: float) -> float:
    """Largest logit difference from the export-time answer, for the stored raw pixels put
    through the serving preprocessing; raises if over `atol` or if a top-1 label differs."""
    pixels, expected, expected_labels = read_known_answer(stored)
    spec = stored.spec
    actual = classifier.logits(from_pixels(pixels, spec.input))
    if actual.shape != expected.shape or actual.shape[1] != spec.num_classes:
        raise StartupError(
            f"model {stored.tag}: self-test output shape {actual.shape}, expected "
            f"{expected.shape} for {spec.num_classes} labels in spec.json"
        )
    diff = float(np.abs(actual - expected).max())
    labels = [spec.labels[i] for i in actual.argmax(1)]
    if labels != expected_labels:
        raise StartupError(
            f"model {stored.tag}: start-up self-test failed: top-1 labels differ from those "
            "recorded at export (check spec.json's labels)"
        )
    if diff > atol:
        raise StartupError(
            f"model {stored.tag}: start-up self-test failed (max logit difference {diff:.2e}, "
            f"allowed {atol:.0e}; check spec.json's mean and std)"
        )
    return diff


def open_model(tag: str, settings: ServiceSettings) -> tuple[StoredModel, OnnxClassifier]:
    try:
        stored = load_model(tag)
        verify_files(stored)
        try:
            session = make_session(stored.path, session_config(settings))
        except ProviderError:
            raise
        except Exception as exc:  # ONNX Runtime's own errors: a file it cannot load
            raise StartupError(
                f"model {stored.tag}: ONNX Runtime cannot load model.onnx "
                f"({type(exc).__name__}); re-export it"
            ) from None
        classifier = OnnxClassifier(session)
        check_spec_matches_onnx(stored, classifier)
        diff = check_known_answer(stored, classifier, settings.known_answer_atol)
    except (StoreError, ProviderError) as exc:
        raise StartupError(str(exc)) from None
    log.info(
        "%s verified (sha256 of %d files, self-test max |Δ| %.1e) on %s",
        stored.tag,
        len(stored.files or {}),
        diff,
        classifier.provider,
    )
    return stored, classifier


def _refuse_duplicates(tags: list[str]) -> None:
    if len(set(tags)) != len(tags):
        raise StartupError(f"a model is listed twice in CONVSERVE_MODELS: {', '.join(tags)}")


def preflight(settings: ServiceSettings) -> None:
    """Everything start-up checks, done once before any worker starts."""
    _refuse_duplicates([open_model(tag, settings)[0].tag for tag in settings.models])


@dataclass
class ServedModel:
    stored: StoredModel
    classifier: OnnxClassifier
    batcher: Batcher

    @property
    def spec(self) -> ModelSpec:
        return self.stored.spec


@dataclass
class ModelPool:
    """Lookup by name and version; the first configured model is the default."""

    models: list[ServedModel]
    ready: bool = False
    _by_name: dict[str, list[ServedModel]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for served in self.models:
            self._by_name.setdefault(served.stored.name, []).append(served)

    @classmethod
    def load(cls, settings: ServiceSettings, metrics: ServiceMetrics | None) -> ModelPool:
        models = []
        for tag in settings.models:
            stored, classifier = open_model(tag, settings)
            batcher = Batcher(
                classifier.probabilities,
                max_batch_size=settings.max_batch_size,
                max_latency_ms=settings.max_latency_ms,
                max_queue_delay_ms=settings.max_queue_delay_ms,
                max_queued_images=settings.max_queued_images,
                timeout_s=settings.request_timeout_ms / 1000,
                observer=metrics.observer(stored.tag) if metrics else None,
                name=stored.tag,
            )
            models.append(ServedModel(stored, classifier, batcher))
        _refuse_duplicates([m.stored.tag for m in models])
        return cls(models)

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def get(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The model a request asked for; `NotServed` when it is not served."""
        if name is None and version is None:
            return self.default
        name = name or self.default.stored.name
        candidates = self._by_name.get(name)
        if not candidates:
            raise NotServed(
                "model_not_found",
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
            "version_not_found",
            f"version {version!r} of model {name!r} is not served; GET /models lists them",
        )

    async def warm_up(self, settings: ServiceSettings) -> None:
        for served in self.models:
            spec = served.spec.input
            # A full-size batch first, so ORT's arena holds the largest buffers before traffic.
            full = np.zeros(spec.shape(settings.max_batch_size), dtype=np.float32)
            started = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(
                None, served.classifier.probabilities, full
            )
            # The batcher's cost model starts knowing both ends: a full batch and (below) one.
            served.batcher.cost.update(len(full), time.perf_counter() - started)
            await served.batcher.warm_up(full[:1], settings.warmup_requests)
        self.ready = True

    def shutdown(self) -> None:
        for served in self.models:
            served.batcher.shutdown()
