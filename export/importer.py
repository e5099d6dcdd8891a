"""`convserve import`: an ONNX image model made anywhere (timm, torchvision, Keras through
tf2onnx, ...) into the model store, verified as convserve's own exports are.

In order, and nothing is written to the store until every step has passed:
  1. the file: a self-contained ONNX model (no external data), which the ONNX checker passes
     and ONNX Runtime loads;
  2. the graph against the flags: the image input's rank, dtype, layout, channels and size,
     the batch dimension (fixed at 1 is served, one image per ONNX Runtime call), the outputs
     and, for classifiers, the label count;
  3. the recipe (`InputSpec`) and the spec, written into the file's metadata;
  4. a known answer from real images (`--samples`, or scikit-image's photos), which must be
     finite and, for `--output probabilities`, sum to 1 per image;
  5. the store: checksums, spec, known answer, exactly as `convserve export` writes them, so
     start-up verifies an imported model the same way.
Every refusal is an `ImportRefused` whose message names the problem.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from convserve.models.data import IMAGE_SUFFIXES, PHOTO_SIZE, load_photos
from convserve.preprocess import from_pixels
from convserve.runtime import OnnxModel, make_session
from convserve.spec import (
    IMPORTABLE_TASKS,
    IMPORTED,
    ONNX_METADATA_KEY,
    EmbedSpec,
    InputSpec,
    ModelSpec,
    StylizeSpec,
    TaskName,
)
from convserve.store import StoredModel, save_model

MAX_FILE_BYTES = 2**31 - 1  # protobuf's limit: larger models need external data
# The model store's tag names (BentoML's rule): lowercase letters, digits, '-', '_' and '.'.
NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?")
ELEMENT_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}


class ImportRefused(Exception):
    """The model or a flag is not what the import needs; nothing was stored."""


@dataclass(frozen=True)
class ImportOptions:
    name: str
    task: TaskName = TaskName.CLASSIFY
    labels: Path | None = None
    layout: str = "nchw"
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 255.0
    channel_order: str = "rgb"
    interpolation: str = "bilinear"
    reduced_decode: bool = True  # large uploads decoded at a reduced size (InputSpec's field)
    output: Literal["logits", "probabilities"] = "logits"
    samples: Path | None = None
    threshold: float | None = None  # embed: tau
    max_side: int = 1024  # stylize: larger uploads are scaled down first
    multiple_of: int = 4  # stylize: sides the network can halve twice


def _load_proto(path: Path) -> Any:
    """The parsed model, refused when it is not one self-contained, valid ONNX file."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ImportRefused(f"{path.name}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ImportRefused(f"{path.name} is empty")
    if size > MAX_FILE_BYTES:
        raise ImportRefused(f"{path.name} is over 2 GB: external-data models are not accepted")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise ImportRefused(
            f"{path.name} is not an ONNX model, or is truncated ({type(exc).__name__})"
        ) from None
    external = [
        t.name for t in _initializers(proto) if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ImportRefused(
            f"{path.name} keeps {len(external)} weight tensor(s) in external data files "
            f"({external[0]}, ...); save it as one self-contained file (external_data=False)"
        )
    if not proto.graph.node:
        raise ImportRefused(f"{path.name} holds no graph (truncated, or not an ONNX model)")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "invalid"
        raise ImportRefused(f"{path.name} fails the ONNX checker: {first}") from None
    return proto


def _initializers(proto: Any):  # noqa: ANN202 - every TensorProto of the graph and subgraphs
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.t is not None and attr.HasField("t"):
                    yield attr.t
                stack.extend([attr.g] if attr.HasField("g") else [])
                stack.extend(attr.graphs)


def _session(path: Path) -> Any:
    try:
        return make_session(path)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors, of many types
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ImportRefused(
            f"ONNX Runtime cannot load {path.name} ({type(exc).__name__}: {message})"
        ) from None


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class ImageInput:
    name: str
    dtype: str
    channels: int
    height: int | None  # None: any size (a symbolic dimension)
    width: int | None
    batch: int | None  # None: any batch


def image_input(session: Any, layout: str, task: str) -> ImageInput:
    """The graph's image input, checked against the layout and the task."""
    inputs = session.get_inputs()
    expected_inputs = 2 if task == "stylize" else 1
    if len(inputs) != expected_inputs:
        names = ", ".join(i.name for i in inputs)
        raise ImportRefused(
            f"a {task} model takes {expected_inputs} input(s); this one takes {len(inputs)} "
            f"({names})"
        )
    first = inputs[0]
    dtype = ELEMENT_TYPES.get(first.type)
    if dtype is None:
        raise ImportRefused(
            f"input {first.name!r} is {first.type}; an image input is float32 or uint8"
        )
    shape = list(first.shape)
    if len(shape) != 4:
        raise ImportRefused(f"input {first.name!r} has shape {shape}; an image input has 4 axes")
    channel_axis, other_axis = (1, 3) if layout == "nchw" else (3, 1)
    channels = _dim(shape[channel_axis])
    if channels not in (1, 3):
        hint = ""
        if _dim(shape[other_axis]) in (1, 3):
            other = "nhwc" if layout == "nchw" else "nchw"
            hint = f"; it looks {other.upper()}: pass --layout {other}"
        raise ImportRefused(
            f"input {first.name!r} has shape {shape}: {layout.upper()} puts the channels "
            f"(1 or 3) on axis {channel_axis}{hint}"
        )
    height, width = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
    batch = _dim(shape[0])
    if batch is not None and batch != 1:
        raise ImportRefused(
            f"input {first.name!r} fixes its batch at {batch}; give it a dynamic batch axis "
            "(or a batch of 1)"
        )
    return ImageInput(first.name, dtype, channels, _dim(height), _dim(width), batch)


def _labels(path: Path | None) -> tuple[str, ...]:
    """A labels file as Triton reads one: one label per line (a final newline is allowed)."""
    if path is None:
        return ()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"cannot read the labels file {path.name} ({exc})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ImportRefused(f"the labels file {path.name} is empty")
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ImportRefused(f"the labels file {path.name} has an empty label on line {blank[0]}")
    return tuple(line.strip() for line in lines)


def _per_channel(values: tuple[float, ...] | None, channels: int, default: float, what: str):  # noqa: ANN202
    if values is None:
        return (default,) * channels
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ImportRefused(
            f"--{what} has {len(values)} values; the model's input has {channels} channel(s)"
        )
    return tuple(values)


def recipe(options: ImportOptions, image: ImageInput) -> InputSpec:
    """The preprocessing recipe the flags describe, checked against the graph's input."""
    mean = _per_channel(options.mean, image.channels, 0.0, "mean")
    std = _per_channel(options.std, image.channels, 1.0, "std")
    common: dict[str, Any] = {
        "channels": image.channels, "mean": mean, "std": std, "scale": options.scale,
        "interpolation": options.interpolation, "layout": options.layout, "dtype": image.dtype,
        "reduced_decode": options.reduced_decode,
        "channel_order": options.channel_order if image.channels == 3 else "rgb",
    }  # fmt: skip
    if options.task == "stylize":
        if options.resize or options.crop:
            raise ImportRefused("a stylizer keeps each image's own size: no --resize or --crop")
        return InputSpec(**common, height=options.max_side, width=options.max_side,
                         resize="none", multiple_of=options.multiple_of)  # fmt: skip
    height, width = image.height, image.width
    if options.crop is not None:
        if height is None and width is None:
            height = width = options.crop
        elif (height, width) != (options.crop, options.crop):
            raise ImportRefused(
                f"--crop {options.crop}, but the model's input is {height} x {width}"
            )
    if height is None or width is None:
        raise ImportRefused(
            f"input {image.name!r} has no fixed height and width; pass --crop N for the size "
            "to feed it"
        )
    if options.resize is not None:
        if options.resize < min(height, width):
            raise ImportRefused(
                f"--resize {options.resize} is smaller than the {height} x {width} input it "
                "would be cropped to"
            )
        return InputSpec(**common, height=height, width=width, resize="crop",
                         resize_to=options.resize)  # fmt: skip
    return InputSpec(**common, height=height, width=width, resize="stretch")


def _check_outputs(session: Any, options: ImportOptions, labels: tuple[str, ...]) -> None:
    outputs = session.get_outputs()
    if options.task == "classify":
        if not labels:
            raise ImportRefused("a classifier needs its labels: --labels LABELS.txt")
        shape = list(outputs[0].shape)
        if len(shape) != 2:
            raise ImportRefused(
                f"output {outputs[0].name!r} has shape {shape}; a classifier's is [batch, classes]"
            )
        classes = _dim(shape[1])
        if classes is not None and classes != len(labels):
            raise ImportRefused(
                f"the labels file has {len(labels)} labels but output {outputs[0].name!r} has "
                f"{classes} classes"
            )
    elif options.task == "embed":
        if options.threshold is None:
            raise ImportRefused("an embedding model needs its verification threshold: --threshold")
        if len(list(outputs[0].shape)) != 2:
            raise ImportRefused(f"output {outputs[0].name!r}: an embedding is [batch, dim]")
    elif options.task == "stylize" and len(list(outputs[0].shape)) != 4:
        raise ImportRefused(f"output {outputs[0].name!r}: a stylized image has 4 axes")


def _samples(folder: Path | None, spec: InputSpec) -> np.ndarray:
    """uint8 N x H x W x 3 of one size: the folder's images, or scikit-image's photos."""
    from PIL import Image

    size = (96, 64) if spec.resize == "none" else PHOTO_SIZE  # a stylizer runs them in full
    if folder is None:
        return load_photos(size=size)[:4]
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImportRefused(f"no images (PNG, JPEG, WebP, GIF, BMP) in {folder}")
    images = []
    for path in paths[:16]:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize(size, Image.Resampling.BILINEAR)
                images.append(np.asarray(rgb))
        except OSError:
            raise ImportRefused(f"{path.name} in --samples is not a readable image") from None
    return np.stack(images)


def _stylize_spec(session: Any) -> StylizeSpec:
    image, weights = session.get_inputs()
    shape = list(weights.shape)
    styles = _dim(shape[-1]) if shape else None
    if len(shape) not in (1, 2) or styles is None:
        raise ImportRefused(
            f"input {weights.name!r} has shape {shape}; a stylizer's style weights are a fixed "
            "vector"
        )
    return StylizeSpec(styles=styles, image_input=image.name, style_input=weights.name,
                       output=session.get_outputs()[0].name)  # fmt: skip


def _extra(spec: ModelSpec, session: Any) -> dict[str, np.ndarray]:
    """The known answer's other inputs: a stylizer's first style, at full weight."""
    if spec.stylize is None:
        return {}
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in session.get_inputs()[1].shape]
    weights = np.zeros(shape, dtype=np.float32)
    weights.reshape(-1)[0] = 1.0
    return {spec.stylize.style_input: weights}


def _check_known_answer(spec: ModelSpec, outputs: Sequence[np.ndarray]) -> None:
    if not all(np.isfinite(o).all() for o in outputs):
        raise ImportRefused("the model gives NaN or infinity for real images")
    first = outputs[0]
    if spec.task == "classify":
        if first.shape[1] != spec.num_classes:
            raise ImportRefused(
                f"the labels file has {spec.num_classes} labels but the model scores "
                f"{first.shape[1]} classes"
            )
        sums = first.sum(axis=1)
        normalized = np.allclose(sums, 1.0, atol=1e-3) and (first >= 0).all()
        if spec.output == "probabilities" and not normalized:
            raise ImportRefused(
                f"--output probabilities, but the outputs sum to {sums.min():.3g}..{sums.max():.3g}"
                " per image: pass --output logits"
            )
        if spec.output == "logits" and normalized:
            # A softmax over probabilities would flatten every answer towards uniform.
            raise ImportRefused(
                "the outputs are probabilities already (non-negative, summing to 1 per image): "
                "pass --output probabilities"
            )


def import_model(path: str | Path, options: ImportOptions) -> StoredModel:
    """Verify `path` against `options` and store it as a new version of `options.name`."""
    import onnx

    path = Path(path)
    if not NAME.fullmatch(options.name):
        raise ImportRefused(
            f"--name {options.name!r}: use 1 to 63 lowercase letters, digits, '-', '_' or '.'"
        )
    if options.task not in IMPORTABLE_TASKS:
        raise ImportRefused(
            f"--task {options.task}: import takes {', '.join(IMPORTABLE_TASKS)} models (a "
            "detector's outputs must be convserve's decoded boxes: train one with convserve)"
        )
    labels = _labels(options.labels)
    proto = _load_proto(path)
    session = _session(path)
    image = image_input(session, options.layout, options.task)
    _check_outputs(session, options, labels)
    producer = proto.producer_name or "unknown"
    parts: dict[str, Any] = {}
    if options.task == "stylize":
        parts["stylize"] = _stylize_spec(session)
    if options.task == "embed":
        dim = _dim(session.get_outputs()[0].shape[1]) or 1
        try:
            parts["embed"] = EmbedSpec(dim=dim, threshold=options.threshold or 0.0,
                                       output=session.get_outputs()[0].name)  # fmt: skip
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].lower()
            raise ImportRefused(
                f"--threshold {options.threshold:g}: {problem} (tau is a squared distance "
                "between unit-length embeddings, 0 to 4)"
            ) from None
    try:
        spec = ModelSpec(
            architecture=f"imported:{producer}".lower().replace(" ", "-")[:64],
            dataset=IMPORTED, task=options.task, input=recipe(options, image),
            labels=labels, output=options.output, **parts,
        )  # fmt: skip
    except ValueError as exc:  # the recipe's own consistency checks
        raise ImportRefused(f"the flags do not make a recipe: {exc}") from None
    pixels = _samples(options.samples, spec.input)
    extra = _extra(spec, session)
    outputs = OnnxModel(session).run(from_pixels(pixels, spec.input), extra)
    _check_known_answer(spec, outputs)
    onnx.helper.set_model_props(
        proto, {**{p.key: p.value for p in proto.metadata_props}, ONNX_METADATA_KEY:
                spec.model_dump_json()}
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(staged))
        return save_model(staged, spec, options.name, pixels, extra=extra)
