"""The benchmark harness in quick mode: it must finish without errors and produce its files.
Never a speed assertion; speeds are what the harness reports (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serving import ROOT

pytestmark = pytest.mark.slow


def test_quick_benchmark_runs_clean_and_writes_its_files(
    default_stored, default_run, bentoml_home, tmp_path
):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "convserve.loadtest.bench",
        "--quick",
        "--out",
        str(out),
        "--bentoml-home",
        str(bentoml_home),
        "--checkpoint",
        str(default_run / "best.pt"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in (
        "results.json",
        "results.csv",
        "summary.md",
        "throughput_vs_users.png",
        "latency_vs_throughput.png",
    ):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    runs = results["results"]
    assert runs and all(r["failures"] == 0 and r["requests"] > 0 for r in runs)
    assert results["in_process"]["lenet5"]["batches"]
    assert list((out / "raw").glob("*_stats.csv")) and list((out / "raw").glob("*.html"))
    summary = (out / "summary.md").read_text()
    assert "## Goals" in summary and "## In-process limit" in summary
