"""PyTorch checkpoint -> verified ONNX file: dynamic batch axis, the model spec inside.

A classifier exports as it is (its logits); a model that serves something else says what to
export with `for_export()`: a detector its decoding network (boxes and scores), an embedding
network its unit-length embedding."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from convserve.models.checkpoint import load_checkpoint
from convserve.spec import ONNX_METADATA_KEY, ModelSpec

log = logging.getLogger(__name__)

# Pinned so an exported file means the same thing whichever torch exported it; 18 is the
# newest opset the dynamo exporter and every onnxruntime we support agree on.
OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str
    output: str
    opset: int = OPSET


def exported_module(model: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """The network ONNX export writes for `model`, and its outputs' names."""
    for_export = getattr(model, "for_export", None)
    if callable(for_export):
        module, names = for_export()  # type: ignore[misc]
        return module.eval(), list(names)
    return model, [OUTPUT_NAME]


def export_onnx(config: ExportConfig) -> tuple[Path, ModelSpec]:
    model, spec = load_checkpoint(config.checkpoint)
    module, output_names = exported_module(model)
    example = torch.zeros(spec.input.shape(2))  # batch 2: a batch of 1 could be specialized
    batch = torch.export.Dim("batch", min=1, max=4096)
    out = Path(config.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        module,
        (example,),
        input_names=[INPUT_NAME],
        output_names=output_names,
        dynamic_shapes={"x": {0: batch}},
        opset_version=config.opset,
        dynamo=True,
        external_data=False,  # one self-contained file: the store and the service hash it whole
    )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: spec.model_dump_json()})
    proto.doc_string = f"{spec.architecture}: {spec.task}, outputs {', '.join(output_names)}"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, out)
    log.info("exported %s (opset %d) to %s", spec.architecture, config.opset, out)
    return out, spec


def read_spec(onnx_path: str | Path) -> ModelSpec:
    """The spec embedded in an exported file (torch-free callers use the store's copy)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return ModelSpec.model_validate_json(props[ONNX_METADATA_KEY])
