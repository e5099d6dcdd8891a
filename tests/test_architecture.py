"""The serving core's shape, as docs/architecture.md describes it: one server object per worker
found without a service locator, protocols and tasks as objects, one handler per operation and
its documentation written from the same declarations, names as types."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from convserve.errors import ConvserveError, ErrorCode, InvalidInput
from convserve.service.protocols.oip.http import Oip
from convserve.service.protocols.rest import STATUS, Rest
from convserve.service.server import Routes
from convserve.service.tasks import TASKS
from convserve.spec import IMPORTABLE_TASKS, TaskName

ROOT = Path(__file__).resolve().parent.parent


def test_no_part_of_the_service_is_found_on_app_state_or_probed_for():
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in (ROOT / "service").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "app.state" in line or re.search(r"getattr\([^)]*state", line)
    ]
    assert offenders == []


def _served_operations() -> set[tuple[str, str]]:
    """(method, path template) of every operation the front door answers."""
    tasks = [task(None, None) for task in TASKS]  # type: ignore[arg-type] - routes need neither
    protocols = [Oip(None, None, None, None), Rest(tasks, None, None)]  # type: ignore[arg-type] - ditto
    routes = Routes(protocols)  # type: ignore[arg-type] - ditto
    found = [*routes.exact.values(), *(f for _, f in routes.templates)]
    return {(method, f.template) for f in found for method in f.methods}


def _documented_operations() -> set[tuple[str, str]]:
    from convserve.service.app import app

    return {
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        for method in item
        if path not in ("/metrics",)
    }


def test_every_served_operation_is_documented_and_every_documented_one_served():
    """One handler per operation, registered for every path it serves (the OIP's versioned
    and unversioned paths alike), and the OpenAPI document lists exactly those."""
    assert _served_operations() == _documented_operations()


def test_each_operation_has_one_handler_for_both_of_its_paths():
    tasks = [task(None, None) for task in TASKS]  # type: ignore[arg-type] - routes need neither
    oip = dict(Oip(None, None, None, None).operations())  # type: ignore[arg-type] - ditto
    unversioned, versioned = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    for tail in ("", "/ready", "/infer"):
        assert oip[unversioned + tail] is oip[versioned + tail]
    rest = dict(Rest(tasks, None, None).operations())  # type: ignore[arg-type] - ditto
    assert set(rest) == {route.path for task in TASKS for route in task.routes} | {"/models"}


def test_the_documented_query_parameters_are_each_routes_parameter_model():
    from convserve.service.app import app

    paths = app.openapi()["paths"]
    for task in TASKS:
        for route in task.routes:
            documented = {p["name"] for p in paths[route.path]["post"]["parameters"]}
            extra = {"shape", "dtype"} if route.path.endswith("/tensor") else set()
            assert documented == set(route.params.model_fields) | extra, route.path


def test_error_codes_are_a_closed_set_with_a_status_for_every_code():
    assert set(STATUS) == set(ErrorCode)
    with pytest.raises(ValueError):
        ConvserveError("no_such_code", "a code outside the set")  # type: ignore[arg-type]
    for code in ErrorCode:
        error = ConvserveError(code, "m")
        rest, oip = Rest.render_error(error, "id"), Oip.render_error(error, "id")
        assert rest.status == STATUS[code] and 400 <= oip.status <= 504
        assert oip.status == (400 if STATUS[code] in (415, 422) else STATUS[code])
    assert InvalidInput(ErrorCode.INVALID_TOP_K, "m").code == "invalid_top_k"  # a str too


def test_task_names_are_one_type_from_the_spec_to_the_plug_ins_and_the_import_command():
    from convserve.models import _registry

    assert sorted(task.name for task in TASKS) == sorted(TaskName)
    assert {_registry.task_of(name) for name in _registry.list_models()} <= set(TaskName)
    refused = subprocess.run(
        [sys.executable, "-m", "convserve", "import", "x.onnx", "--name", "x", "--task", "detect"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "invalid choice" in refused.stderr
    assert TaskName.DETECT not in IMPORTABLE_TASKS


def test_the_models_prepare_makes_are_data_each_field_a_real_option():
    from convserve.cli import RECIPES, Imported, Pretrained, Trained
    from convserve.export.importer import ImportOptions
    from convserve.models.train import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    import_fields = {f.name for f in dataclasses.fields(ImportOptions)}
    for name, recipe in RECIPES.items():
        assert recipe.name == name
        how = recipe.how
        if isinstance(how, Trained):
            assert set(how.training) <= train_fields, name
            TrainConfig(how.model, **how.training)  # the values are accepted
        elif isinstance(how, Imported):
            assert set(how.options) <= import_fields, name
        else:
            assert isinstance(how, Pretrained)


def test_the_load_test_builds_no_payload_until_a_user_needs_one():
    code = (
        "from convserve.loadtest import locustfile as l\n"
        "assert l._garments.cache_info().currsize == 0\n"
        "assert len(l.pngs()) == l.PAYLOADS and l._garments.cache_info().currsize == 1\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
