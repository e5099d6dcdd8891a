"""The BentoML model store: one ONNX file plus its spec per version, `latest` the newest.

Torch-free: the service reads the store through this module.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import bentoml

from models.spec import ModelSpec

MODEL_FILE = "model.onnx"
SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class StoredModel:
    tag: str  # "name:version"
    path: Path  # the ONNX file
    spec: ModelSpec
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def store_name(spec: ModelSpec, dataset: str = "fashion") -> str:
    return f"{dataset}-{spec.architecture}"


def save_model(onnx_path: str | Path, spec: ModelSpec, name: str) -> StoredModel:
    """Copy the ONNX file into a new version of `name` in the store, with spec and checksum."""
    onnx_path = Path(onnx_path)
    digest = sha256_of(onnx_path)
    with bentoml.models.create(
        name,
        labels={"architecture": spec.architecture, "format": "onnx"},
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
    return StoredModel(tag=str(ref.tag), path=Path(ref.path) / MODEL_FILE, spec=spec, sha256=digest)


def load_model(tag: str) -> StoredModel:
    """Resolve `tag` ("name:latest", "name:version" or "name") to its files in the store."""
    ref = bentoml.models.get(tag)
    root = Path(ref.path)
    spec = ModelSpec.model_validate_json((root / SPEC_FILE).read_text())
    return StoredModel(
        tag=str(ref.tag), path=root / MODEL_FILE, spec=spec, sha256=str(ref.info.metadata["sha256"])
    )


def has_model(tag: str) -> bool:
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True
