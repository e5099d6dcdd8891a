"""deploy/kserve/inferenceservice.yaml, validated offline and strictly.

KServe's own schema comes from its published SDK (the `kserve` wheel on PyPI, fetched by
`make test` into .cache/kserve, never installed: its pins clash with BentoML's). The SDK's
generated model classes declare every field (`attribute_map`) and its type (`openapi_types`);
they are read from the wheel's source with `ast`, without importing it. KServe's fields are
checked against them; the Kubernetes parts (containers, volumes, metadata) are gathered into a
Pod and validated with `kubernetes-validate --strict`, like deploy/k8s.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
WHEELS = ROOT / ".cache" / "kserve"
SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
POD_PARTS = {"V1Container": "containers", "V1Volume": "volumes"}
TABLES = ("openapi_types", "attribute_map")


def _kserve_models() -> dict[str, tuple[dict, dict]]:
    (wheel,) = sorted(WHEELS.glob("kserve-*.whl"))[-1:] or [None]
    assert wheel, "the kserve wheel is missing (make test downloads it into .cache/kserve)"
    models: dict[str, tuple[dict, dict]] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not (name.startswith("kserve/models/v1") and name.endswith(".py")):
                continue
            for cls in ast.parse(z.read(name)).body:
                if not isinstance(cls, ast.ClassDef):
                    continue
                found = {}
                for stmt in cls.body:
                    target = stmt.targets[0] if isinstance(stmt, ast.Assign) else None
                    if isinstance(target, ast.Name) and target.id in TABLES:
                        found[target.id] = ast.literal_eval(stmt.value)
                if len(found) == 2:
                    models[cls.name] = (found["openapi_types"], found["attribute_map"])
    return models


def _check(value, kind: str, where: str, models: dict, errors: list, pod: dict) -> None:
    if kind in models:
        types, names = models[kind]
        by_json = {json_key: attr for attr, json_key in names.items()}
        if not isinstance(value, dict):
            errors.append(f"{where}: expected an object ({kind})")
            return
        for key, item in value.items():
            if key not in by_json:
                errors.append(f"{where}.{key}: not a field of {kind}")
            else:
                _check(item, types[by_json[key]], f"{where}.{key}", models, errors, pod)
    elif kind.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list")
            return
        inner = kind[5:-1]
        if inner in POD_PARTS:
            pod.setdefault(POD_PARTS[inner], []).extend(value)
            return
        for i, item in enumerate(value):
            _check(item, inner, f"{where}[{i}]", models, errors, pod)
    elif kind.startswith("dict("):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            errors.append(f"{where}: expected a map of strings")
    elif kind == "V1ObjectMeta":
        pod["metadata"] = value
    elif kind in SCALARS:
        if not isinstance(value, SCALARS[kind]) or (kind == "int" and isinstance(value, bool)):
            errors.append(f"{where}: expected {kind}, got {value!r}")
    else:
        errors.append(f"{where}: {kind} is not validated here; keep the manifest to what is")


def test_the_inferenceservice_is_valid_against_kserves_schema_and_kubernetes(tmp_path):
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    models = _kserve_models()
    assert len(models) > 50 and "V1beta1PredictorSpec" in models
    errors: list[str] = []
    pod: dict = {}
    _check(manifest, "V1beta1InferenceService", "$", models, errors, pod)
    assert not errors, errors
    # The Kubernetes parts, as the Pod KServe makes of them, validated strictly.
    pod_manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": pod["metadata"],
        "spec": {"containers": pod["containers"], "volumes": pod.get("volumes", [])},
    }
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(pod_manifest))
    tool = shutil.which("kubernetes-validate") or str(
        ROOT / ".venv" / "bin" / "kubernetes-validate"
    )
    done = subprocess.run([tool, "--strict", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_validator_refuses_what_kserve_does_not_have(tmp_path):
    """The check can fail: a misspelt KServe field and a wrongly typed one are caught."""
    models = _kserve_models()
    manifest = yaml.safe_load(MANIFEST.read_text())
    manifest["spec"]["predictor"]["minReplica"] = 2  # misspelt
    manifest["spec"]["predictor"]["scaleTarget"] = "70"  # a string where KServe wants int
    errors: list[str] = []
    _check(manifest, "V1beta1InferenceService", "$", models, errors, {})
    assert any("minReplica: not a field" in e for e in errors), errors
    assert any("scaleTarget: expected int" in e for e in errors), errors


def test_the_predictor_serves_the_protocol_kserve_routes_to():
    manifest = yaml.safe_load(MANIFEST.read_text())
    predictor = manifest["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["ports"][0]["containerPort"] == 3000  # the image's port
    # gRPC on the port the image serves it (settings' default), named as KServe names it
    from convserve.service.settings import ServiceSettings

    grpc_port = ServiceSettings.model_fields["grpc_port"].default
    assert {"name": "h2c", "containerPort": grpc_port, "protocol": "TCP"} in container["ports"]
    # Probes on the Open Inference Protocol's health routes, which convserve answers.
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    from convserve.service.protocols.oip.http import documentation

    paths = {route.path for route in documentation().routes}
    assert {"/v2/health/ready", "/v2/health/live", "/v2/models/{name}/infer"} <= paths
    env = {e["name"]: e["value"] for e in container["env"]}
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    longest = (
        float(env["CONVSERVE_BODY_TIMEOUT_S"]) + int(env["CONVSERVE_REQUEST_TIMEOUT_MS"]) / 1e3
    )
    needed = pre_stop + float(env["CONVSERVE_DRAIN_S"]) + longest
    assert predictor["terminationGracePeriodSeconds"] >= needed + 5
