"""ONNX Runtime session for one stored model: explicit options, logits -> top-k predictions."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from export.store import StoredModel

log = logging.getLogger("convserve.runtime")


@dataclass(frozen=True)
class SessionConfig:
    intra_op_threads: int
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def make_session(model_path: str, config: SessionConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # CNNs are one chain of ops
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True  # batches of similar size reuse the arena's blocks
    options.enable_mem_pattern = True
    options.log_severity_level = 3  # warnings from ORT go to the server log as errors only
    session = ort.InferenceSession(
        model_path, sess_options=options, providers=list(config.providers)
    )
    log.info("ONNX Runtime session for %s on %s", model_path, session.get_providers())
    return session


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and probabilities of the k most likely classes per row, most likely first.

    Ties are broken by the lower class index, so answers are deterministic.
    """
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=1)


class OnnxClassifier:
    """Logits for N x C x H x W float32 batches of one model. Thread-safe (ORT sessions are)."""

    def __init__(self, stored: StoredModel, config: SessionConfig) -> None:
        self.stored = stored
        self.spec = stored.spec
        self.session = make_session(str(stored.path), config)
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(None, {self.input_name: batch})
        return out

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.logits(batch))
