"""The one ONNX Runtime session factory (explicit options, checked providers), the model runner
every task uses, and what turns logits into answers (softmax, top-k). Everything that runs a
model file comes through here: the service, export's parity check and known answer, import,
INT8 calibration, the benchmarks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime  # pyright: ignore[reportMissingTypeStubs] - it ships none

from convserve.spec import ModelSpec

log = logging.getLogger("convserve.runtime")
# onnxruntime ships no type information: its API is `Any` here, in this one place, and what
# convserve keeps of it is typed where it is used.
ort: Any = onnxruntime

GRAPH_LEVELS: dict[str, Any] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ProviderError(Exception):
    """A requested execution provider is unavailable or did not become active."""


@dataclass(frozen=True)
class SessionConfig:
    intra_op_threads: int = 0  # 0: ONNX Runtime's default, one per physical core
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    allow_provider_fallback: bool = False
    graph_optimization_level: str = "all"
    enable_mem_arena: bool = True


def check_providers_available(config: SessionConfig) -> None:
    """Before loading anything: every requested provider is in this ONNX Runtime build."""
    missing = [p for p in config.providers if p not in ort.get_available_providers()]
    if missing and not config.allow_provider_fallback:
        raise ProviderError(
            f"execution provider(s) {', '.join(missing)} requested but this ONNX Runtime build "
            f"offers only {', '.join(ort.get_available_providers())}; install the gpu extra, "
            "change CONVSERVE_PROVIDERS, or set CONVSERVE_ALLOW_PROVIDER_FALLBACK=true"
        )


def make_session(
    model_path: str | Path, config: SessionConfig = SessionConfig()
) -> Any:  # an onnxruntime.InferenceSession
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # CNNs are one chain of ops
    options.graph_optimization_level = GRAPH_LEVELS[config.graph_optimization_level]
    options.enable_cpu_mem_arena = config.enable_mem_arena  # similar batches reuse its blocks
    options.enable_mem_pattern = config.enable_mem_arena
    options.log_severity_level = 3  # ORT's own warnings would flood the server log
    check_providers_available(config)
    available = [p for p in config.providers if p in ort.get_available_providers()]
    session = ort.InferenceSession(
        str(model_path), sess_options=options, providers=available or ["CPUExecutionProvider"]
    )
    # ORT silently drops a provider that fails to initialise (no GPU, wrong CUDA): look.
    active = session.get_providers()
    inactive = [p for p in config.providers if p not in active]
    if inactive:
        message = (
            f"execution provider(s) {', '.join(inactive)} requested but not active "
            f"(active: {', '.join(active)})"
        )
        if not config.allow_provider_fallback:
            raise ProviderError(message + "; set CONVSERVE_ALLOW_PROVIDER_FALLBACK=true to run")
        log.warning("%s; falling back as allowed", message)
    return session


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fixed_batch(session: Any) -> int | None:
    """The first input's batch dimension when the graph fixes it (1 in many exported files)."""
    shape = getattr(session.get_inputs()[0], "shape", None)
    if shape and isinstance(shape[0], int) and shape[0] > 0:
        return shape[0]
    return None


class OnnxModel:
    """Runs one model file: its first input gets the batch, named extra inputs travel beside
    it, every output comes back. Thread-safe (ORT sessions are).

    A graph whose batch dimension is fixed at 1 (common in files exported elsewhere) is served
    all the same: the rows of a batch go through one ONNX Runtime call each.

    `session` may be any object with ONNX Runtime's `run`/`get_inputs`/`get_providers`: unit
    tests pass a fake one.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        inputs = session.get_inputs()
        self.input_name = inputs[0].name
        self.input_names: list[str] = [i.name for i in inputs]
        outputs: list[Any] = session.get_outputs() if hasattr(session, "get_outputs") else []
        self.output_names: list[str] = [o.name for o in outputs]
        self.provider = session.get_providers()[0]
        self.fixed_batch = _fixed_batch(session)

    def run(self, batch: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> list[Any]:
        """batch: N inputs for the first input -> every output, each with N rows. `extra`:
        the other inputs, fed as they are to every call."""
        feeds = {**(extra or {}), self.input_name: batch}
        if self.fixed_batch is None or len(batch) == self.fixed_batch:
            return self.session.run(None, feeds)
        if self.fixed_batch != 1:
            raise ValueError(f"the model takes batches of exactly {self.fixed_batch}")
        rows = [self.session.run(None, {**feeds, self.input_name: batch[i : i + 1]})
                for i in range(len(batch))]  # fmt: skip
        return [np.concatenate([r[k] for r in rows]) for k in range(len(rows[0]))]


class OnnxClassifier(OnnxModel):
    """Logits and probabilities for batches of one classifier. `output` says what its first
    output holds: logits (softmax is applied here) or probabilities already (a softmax inside
    the graph, as many exported files have)."""

    def __init__(self, session: Any, output: str = "logits") -> None:
        super().__init__(session)
        self.output = output

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        out = self.logits(batch)
        return out if self.output == "probabilities" else softmax(out)


def runtime_for(session: Any, spec: ModelSpec) -> OnnxModel:
    """The runner of a model file as its spec describes it: a classifier gets logits and
    probabilities, every other task the outputs as they are."""
    if spec.task == "classify":
        return OnnxClassifier(session, spec.output)
    return OnnxModel(session)
