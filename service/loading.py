"""Loading the models a worker serves: each verified, with its own session, task and batcher,
then warmed up. Looking them up is the server's (`server.Models`).

Start-up contract for every model, in `open_model`: present in the store; every file byte for
byte as exported (sha256) and no other file; session created on the requested providers; the
spec inside the ONNX file equal to spec.json; its task one the service knows; and the known
answer reproduced from raw uint8 pixels through the serving preprocessing and the task's
runner, every output (and for classifiers the top-1 labels). Any failure is a `StartupError`
whose one-line message names the file at fault, for operators.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from convserve.preprocess import from_pixels
from convserve.runtime import OnnxModel, ProviderError, SessionConfig, make_session, runtime_for
from convserve.service.batching import Batcher
from convserve.service.clock import Clock
from convserve.service.metrics import ServiceMetrics
from convserve.service.settings import ALL_MODELS, ServiceSettings
from convserve.service.tasks.base import Task, TensorInfo
from convserve.spec import ONNX_METADATA_KEY, ModelSpec, TaskName
from convserve.store import (
    KnownAnswer,
    StoredModel,
    StoreError,
    load_model,
    read_known_answer,
    stored_names,
    verify_files,
)

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


def check_spec_matches_onnx(stored: StoredModel, model: OnnxModel) -> None:
    """spec.json says what the ONNX file itself says (metrics aside: INT8 versions carry their
    own); a spec edited after export, labels or normalization, is refused here."""
    meta = model.session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    try:
        inside = ModelSpec.model_validate_json(meta or "")
    except ValueError:
        raise StartupError(f"model {stored.tag}: model.onnx carries no convserve spec") from None
    if inside.model_dump(exclude={"metrics"}) != stored.spec.model_dump(exclude={"metrics"}):
        raise StartupError(
            f"model {stored.tag}: spec.json differs from the spec inside model.onnx "
            "(labels, input or normalization); re-export the model"
        )


def run_known_answer(known: KnownAnswer, spec: ModelSpec, model: OnnxModel) -> list[np.ndarray]:
    """The stored pixels through the serving preprocessing, then the model: every output."""
    return list(model.run(from_pixels(known.pixels, spec.input), known.extra))


def check_known_answer(stored: StoredModel, model: OnnxModel, atol: float) -> float:
    """Largest output difference from the export-time answer, for the stored raw pixels put
    through the serving preprocessing; raises if over `atol` or if a top-1 label differs."""
    known = read_known_answer(stored)
    spec = stored.spec
    actual = run_known_answer(known, spec, model)
    shapes = [a.shape for a in actual]
    labelled = known.labels is not None  # a classifier: its first output has a row per label
    if shapes != [e.shape for e in known.outputs] or (
        labelled and shapes[0][1] != spec.num_classes
    ):
        raise StartupError(
            f"model {stored.tag}: self-test output shapes {shapes}, expected "
            f"{[e.shape for e in known.outputs]}"
            + (f" for {spec.num_classes} labels in spec.json" if labelled else "")
        )
    diff = max(
        float(np.abs(a - e).max(initial=0.0)) for a, e in zip(actual, known.outputs, strict=True)
    )
    if labelled:
        labels = [spec.labels[int(i)] for i in actual[0].argmax(1).tolist()]
        if labels != known.labels:
            raise StartupError(
                f"model {stored.tag}: start-up self-test failed: top-1 labels differ from those "
                "recorded at export (check spec.json's labels)"
            )
    if diff > atol:
        raise StartupError(
            f"model {stored.tag}: start-up self-test failed (max output difference {diff:.2e}, "
            f"allowed {atol:.0e}; check spec.json's recipe: mean, std, resize)"
        )
    return diff


def task_of(stored: StoredModel, tasks: Mapping[TaskName, Task]) -> Task:
    task = tasks.get(stored.spec.task)
    if task is None:  # a spec from a newer convserve
        raise StartupError(f"model {stored.tag}: task {stored.spec.task!r} is not served here")
    return task


def open_model(tag: str, settings: ServiceSettings) -> tuple[StoredModel, OnnxModel]:
    """The stored model, verified, and its runtime (an `OnnxClassifier` for classifiers)."""
    try:
        stored = load_model(tag)
        verify_files(stored)
        try:
            session = make_session(stored.path, session_config(settings))
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors: a file it cannot load
            raise StartupError(
                f"model {stored.tag}: ONNX Runtime cannot load model.onnx "
                f"({type(exc).__name__}); re-export it"
            ) from None
        model = runtime_for(session, stored.spec)
        check_spec_matches_onnx(stored, model)
        diff = check_known_answer(stored, model, settings.known_answer_atol)
    except (StoreError, ProviderError) as exc:
        raise StartupError(str(exc)) from None
    log.info(
        "%s verified (sha256 of %d files, self-test max |Δ| %.1e) on %s",
        stored.tag,
        len(stored.files or {}),
        diff,
        model.provider,
    )
    return stored, model


def _refuse_duplicates(tags: list[str]) -> None:
    if len(set(tags)) != len(tags):
        raise StartupError(f"a model is listed twice in CONVSERVE_MODELS: {', '.join(tags)}")


def served_tags(settings: ServiceSettings) -> list[str]:
    """The tags CONVSERVE_MODELS names: as listed, or for `*` every stored model's latest
    version in name order (a container built from a directory of models serves them all)."""
    if settings.models != [ALL_MODELS]:
        return list(settings.models)
    names = stored_names()
    if not names:
        raise StartupError("CONVSERVE_MODELS is * (every stored model), but the store is empty")
    return [f"{name}:latest" for name in names]


def preflight(settings: ServiceSettings) -> None:
    """Everything start-up checks, done once before any worker starts."""
    _refuse_duplicates([open_model(tag, settings)[0].tag for tag in served_tags(settings)])


@dataclass
class ServedModel:
    stored: StoredModel
    model: OnnxModel
    task: Task
    batcher: Batcher
    outputs: list[TensorInfo]  # the runner's outputs, in order, as the OIP names them
    spec: ModelSpec  # the stored spec (a field, not a lookup: requests read it often)
    active: int = 0  # requests that resolved it and are not answered yet (model control)


def load_one(
    tag: str,
    settings: ServiceSettings,
    metrics: ServiceMetrics | None,
    tasks: Mapping[TaskName, Task],
    clock: Clock | None = None,
) -> ServedModel:
    """The stored model `tag` opened, verified and given its task and its batcher."""
    stored, model = open_model(tag, settings)
    task = task_of(stored, tasks)
    batcher = Batcher(
        task.runner(model, stored.spec),
        max_batch_size=task.max_batch(stored.spec),
        max_latency_ms=settings.max_latency_ms,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_queued_images=settings.max_queued_images,
        timeout_s=settings.request_timeout_ms / 1000,
        observer=metrics.observer(stored.tag) if metrics else None,
        name=stored.tag,
        clock=clock,
    )
    outputs = task.oip_outputs(stored.spec, model)
    return ServedModel(stored, model, task, batcher, outputs, stored.spec)


def load_models(
    settings: ServiceSettings,
    metrics: ServiceMetrics | None,
    tasks: Mapping[TaskName, Task],
    clock: Clock | None = None,
) -> list[ServedModel]:
    """Every configured model opened, verified and given its task and its batcher."""
    models = [load_one(tag, settings, metrics, tasks, clock) for tag in served_tags(settings)]
    _refuse_duplicates([m.stored.tag for m in models])
    return models


async def warm_up(models: list[ServedModel], settings: ServiceSettings) -> None:
    for served in models:
        example = served.task.warm_up_input(served.spec, served.batcher.max_batch_size)
        # A full-size batch first, so ORT's arena holds the largest buffers before traffic.
        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, served.batcher.infer, example)
        # The batcher's cost model starts knowing both ends: a full batch and (below) one.
        served.batcher.cost.update(served.batcher.max_batch_size, time.perf_counter() - started)
        one = served.task.warm_up_input(served.spec, 1)
        await served.batcher.warm_up(one, settings.warmup_requests)
