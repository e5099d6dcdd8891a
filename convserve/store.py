"""The BentoML model store: one ONNX file plus its spec per version, `latest` the newest.

Integrity: export records the sha256 of every file of a version (the ONNX file, its spec, its
known answer) in the model's store metadata; `verify_files` checks them all, and refuses any
file that was not written at export (ONNX external data among them).

Torch-free: export writes the store and the service reads it through this module.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np

from convserve.preprocess import from_pixels
from convserve.runtime import OnnxModel, make_session
from convserve.spec import ModelSpec

MODEL_FILE = "model.onnx"
SPEC_FILE = "spec.json"
# A few real images as raw uint8 pixels, every output ONNX Runtime gave for them at export (and
# for classifiers the labels of their top-1): the service's start-up self-test runs them through
# the serving preprocessing and compares, before it declares itself ready.
KNOWN_ANSWER_FILE = "known_answer.npz"
EXPORTED_FILES = (MODEL_FILE, SPEC_FILE, KNOWN_ANSWER_FILE)
STORE_FILES = {"model.yaml"}  # written by BentoML itself


@dataclass(frozen=True)
class StoredModel:
    tag: str  # "name:version"
    path: Path  # the ONNX file
    spec: ModelSpec
    sha256: str  # of the ONNX file, as recorded when the model was saved
    created: str = ""  # ISO 8601
    precision: str = "fp32"  # or "int8" (statically quantized, QDQ)
    files: dict[str, str] | None = None  # file name -> sha256, recorded at export

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


@dataclass(frozen=True)
class KnownAnswer:
    pixels: np.ndarray  # uint8 N x H x W (x C): real images, before any preprocessing
    outputs: list[np.ndarray]  # every output of the model for them, in the graph's order
    extra: dict[str, np.ndarray]  # the model's other inputs, by name (a stylizer's weights)
    labels: list[str] | None  # classifiers: the top-1 label of each image


def known_answer(
    onnx_path: str | Path, inputs: np.ndarray, extra: dict[str, np.ndarray] | None = None
) -> list[np.ndarray]:
    """Every output for `inputs` (the model's input batch) from a plain CPU session."""
    return OnnxModel(make_session(onnx_path)).run(inputs, extra)


def save_model(
    onnx_path: str | Path,
    spec: ModelSpec,
    name: str,
    known_pixels: np.ndarray,
    precision: str = "fp32",
    extra: dict[str, np.ndarray] | None = None,
) -> StoredModel:
    """Copy the ONNX file into a new version of `name` in the store, with its spec, the known
    answer for `known_pixels` (a few real uint8 images, N x H x W or N x H x W x C; `extra`:
    the model's other inputs, by name) and the sha256 of every file."""
    onnx_path = Path(onnx_path)
    outputs = known_answer(onnx_path, from_pixels(known_pixels, spec.input), extra)
    arrays = {f"output_{i}": out for i, out in enumerate(outputs)}
    arrays |= {f"input_{k}": v for k, v in (extra or {}).items()}
    if spec.task == "classify":
        top1: list[int] = outputs[0].argmax(1).tolist()
        arrays["labels"] = np.array([spec.labels[i] for i in top1])
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        shutil.copyfile(onnx_path, staged / MODEL_FILE)
        (staged / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        np.savez(staged / KNOWN_ANSWER_FILE, allow_pickle=False, pixels=known_pixels, **arrays)
        files = {f: sha256_of(staged / f) for f in EXPORTED_FILES}
        with bentoml.models.create(
            name,
            labels={
                "architecture": spec.architecture,
                "task": spec.task,
                "format": "onnx",
                "precision": precision,
            },
            metadata={
                "sha256": files[MODEL_FILE],
                "files": files,
                "input_shape": list(spec.input.shape(-1)),
                "labels": list(spec.labels),
                **{f"metric_{k}": v for k, v in spec.metrics.items()},
            },
        ) as ref:
            for f in EXPORTED_FILES:
                shutil.copyfile(staged / f, Path(ref.path) / f)
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
    files = ref.info.metadata.get("files")
    return StoredModel(
        tag=str(ref.tag),
        path=root / MODEL_FILE,
        spec=spec,
        sha256=digest,
        created=ref.info.creation_time.isoformat(),
        precision=ref.info.labels.get("precision", "fp32"),
        files={str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else None,
    )


def stored_names() -> list[str]:
    """The name of every model in the store, in name order."""
    return sorted({r.tag.name for r in bentoml.models.list()})


def list_versions(name: str) -> list[StoredModel]:
    """Every stored version of `name`, newest first."""
    refs = sorted(bentoml.models.list(name), key=lambda r: r.info.creation_time, reverse=True)
    return [load_model(str(r.tag)) for r in refs]


def verify_files(stored: StoredModel) -> None:
    """Every file of the version is byte for byte what export wrote, and there is no other."""
    if not stored.files:
        raise StoreError(
            f"model {stored.tag} has no checksums of its files (exported by an older "
            "convserve); re-export it"
        )
    folder = stored.path.parent
    for name, expected in stored.files.items():
        path = folder / name
        if not path.is_file():
            raise StoreError(f"model {stored.tag}: {name} is missing from the store")
        actual = sha256_of(path)
        if actual != expected:
            raise StoreError(
                f"model {stored.tag}: {name} checksum {actual[:12]}… does not match the "
                f"{expected[:12]}… recorded at export; the file is corrupt or was edited, "
                "re-export the model"
            )
    for path in folder.iterdir():
        if path.name not in stored.files and path.name not in STORE_FILES:
            raise StoreError(
                f"model {stored.tag}: unexpected file {path.name} beside the model (ONNX "
                "external data is not accepted); re-export it"
            )


def read_known_answer(stored: StoredModel) -> KnownAnswer:
    """The images, outputs and labels recorded at export."""
    try:
        with np.load(stored.known_answer_path, allow_pickle=False) as f:
            keys = set(f.files)
            count = len([k for k in keys if k.startswith("output_")])
            # Versions stored before every output was recorded kept one, as `logits`.
            outputs = [f[f"output_{i}"] for i in range(count)] if count else [f["logits"]]
            extra = {k.removeprefix("input_"): f[k] for k in keys if k.startswith("input_")}
            labels = [str(label) for label in f["labels"]] if "labels" in keys else None
            return KnownAnswer(f["pixels"], outputs, extra, labels)
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
