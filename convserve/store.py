"""The BentoML model store: one ONNX file plus its spec per version, `latest` the newest.

Torch-free: export writes the store and the service reads it through this module.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np

from convserve.runtime import make_session
from convserve.spec import ModelSpec

MODEL_FILE = "model.onnx"
SPEC_FILE = "spec.json"
# A few real inputs and the logits ONNX Runtime gave for them at export: the service's
# start-up self-test compares against these before it declares itself ready.
KNOWN_ANSWER_FILE = "known_answer.npz"


@dataclass(frozen=True)
class StoredModel:
    tag: str  # "name:version"
    path: Path  # the ONNX file
    spec: ModelSpec
    sha256: str  # as recorded when the model was saved, not as the file is now
    created: str = ""  # ISO 8601
    precision: str = "fp32"  # or "int8" (statically quantized, QDQ)

    @property
    def name(self) -> str:
        return self.tag.split(":", 1)[0]

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[1]

    @property
    def known_answer_path(self) -> Path:
        return self.path.parent / KNOWN_ANSWER_FILE


class StoreError(Exception):
    """A model is missing from the store or its files are not what was saved."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def known_answer(onnx_path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Logits of `inputs` (N x C x H x W float32) from a plain CPU session of the file."""
    session = make_session(onnx_path)
    (logits,) = session.run(None, {session.get_inputs()[0].name: inputs})
    return logits


def save_model(
    onnx_path: str | Path,
    spec: ModelSpec,
    name: str,
    known_inputs: np.ndarray,
    precision: str = "fp32",
) -> StoredModel:
    """Copy the ONNX file into a new version of `name` in the store, with spec, checksum and
    the known answer for `known_inputs` (a few real, preprocessed images)."""
    onnx_path = Path(onnx_path)
    digest = sha256_of(onnx_path)
    expected = known_answer(onnx_path, known_inputs)
    with bentoml.models.create(
        name,
        labels={"architecture": spec.architecture, "format": "onnx", "precision": precision},
        metadata={
            "sha256": digest,
            "input_shape": list(spec.input.shape(-1)),
            "labels": list(spec.labels),
            **{f"metric_{k}": v for k, v in spec.metrics.items()},
        },
    ) as ref:
        target = Path(ref.path) / MODEL_FILE
        shutil.copyfile(onnx_path, target)
        (Path(ref.path) / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        np.savez(Path(ref.path) / KNOWN_ANSWER_FILE, inputs=known_inputs, logits=expected)
    return load_model(str(ref.tag))


def load_model(tag: str) -> StoredModel:
    """Resolve `tag` ("name:latest", "name:version" or "name") to its files in the store.

    Raises StoreError with a message fit for an operator when it is missing or incomplete.
    """
    try:
        ref = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise StoreError(
            f"model {tag!r} is not in the model store; train and export one first "
            "(`convserve train` then `convserve export`)"
        ) from None
    root = Path(ref.path)
    try:
        spec = ModelSpec.model_validate_json((root / SPEC_FILE).read_text())
        digest = str(ref.info.metadata["sha256"])
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(
            f"model {ref.tag} is incomplete in the store ({exc}); re-export it"
        ) from None
    return StoredModel(
        tag=str(ref.tag),
        path=root / MODEL_FILE,
        spec=spec,
        sha256=digest,
        created=ref.info.creation_time.isoformat(),
        precision=ref.info.labels.get("precision", "fp32"),
    )


def list_versions(name: str) -> list[StoredModel]:
    """Every stored version of `name`, newest first."""
    refs = sorted(bentoml.models.list(name), key=lambda r: r.info.creation_time, reverse=True)
    return [load_model(str(r.tag)) for r in refs]


def verify_file(stored: StoredModel) -> None:
    """The ONNX file is byte for byte what was saved."""
    if not stored.path.is_file():
        raise StoreError(f"model {stored.tag}: its ONNX file is missing from the store")
    actual = sha256_of(stored.path)
    if actual != stored.sha256:
        raise StoreError(
            f"model {stored.tag}: ONNX file checksum {actual[:12]}… does not match the "
            f"{stored.sha256[:12]}… recorded at export; the file is corrupt, re-export it"
        )


def read_known_answer(stored: StoredModel) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(stored.known_answer_path, allow_pickle=False) as f:
            return f["inputs"], f["logits"]
    except (OSError, KeyError, ValueError):
        raise StoreError(
            f"model {stored.tag}: its known-answer file is missing or unreadable; re-export it"
        ) from None


def has_model(tag: str) -> bool:
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True
