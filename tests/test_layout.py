"""The package's shape: one import namespace, layers that only point down, no cycles."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A real (non-editable) install of the project: what lands in site-packages."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    return target


def test_only_convserve_lands_in_site_packages(installed):
    top = {p.name for p in installed.iterdir() if p.name not in ("bin", "__pycache__")}
    assert {t for t in top if not t.endswith(".dist-info")} == {"convserve"}
    package = {p.name for p in (installed / "convserve").iterdir()}
    assert {"models", "export", "service", "loadtest", "spec.py", "preprocess.py"} <= package


def test_import_contracts_hold(installed):
    """pyproject.toml's import-linter contracts, on the installed tree (grimp reads a package's
    own folder, so it needs the mapped sub-packages laid out as they are installed)."""
    result = subprocess.run(
        [str(BIN / "lint-imports"), str(ROOT / "pyproject.toml")],
        cwd=installed,
        env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and "5 kept, 0 broken" in result.stdout


def test_outside_the_repository_only_the_convserve_namespace_imports(tmp_path):
    code = """
import importlib
import convserve.models, convserve.export, convserve.service, convserve.loadtest
for name in ("models", "service", "export", "loadtest"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_the_package_type_checks(installed):
    """pyright (basic mode) over the installed package, against this environment's libraries."""
    shutil.copyfile(ROOT / "pyproject.toml", installed / "pyproject.toml")
    result = subprocess.run(
        [str(BIN / "pyright"), "--project", str(installed), "--pythonpath", sys.executable],
        cwd=installed, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = result.stdout.replace(str(installed) + "/", "")
    assert result.returncode == 0, report[-6000:]
    assert "0 errors" in report


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff_lint_and_format_are_clean(command):
    result = subprocess.run([str(BIN / "ruff"), *command], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


PRIVATE = r"bentoml\._internal|^\s*(from|import)\s+_bentoml_(impl|sdk)"


def test_no_private_bentoml_api_is_used():
    """BentoML's public API only: nothing under bentoml._internal (or _bentoml_*) is imported."""
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("convserve", "models", "export", "service", "loadtest")
        for path in (ROOT / folder).rglob("*.py")
        if re.search(PRIVATE, path.read_text(), flags=re.MULTILINE)
    ]
    assert offenders == []
