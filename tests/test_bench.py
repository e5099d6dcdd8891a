"""The benchmark harness in quick mode: it must finish without errors and produce its files.
Never a speed assertion; speeds are what the harness reports (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
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
    # convserve's own /metrics were scraped around each run: batches happened and were counted.
    for r in runs:
        batching = r["batching"]
        assert batching["batch_count"] > 0 and batching["batch_mean"] >= 1, batching
        assert batching["wait_count"] >= 1  # every request queued once per batch it joined
        assert batching["batch_cumulative"][-1][1] == batching["batch_count"]
    assert (out / "batching.png").stat().st_size > 0
    assert results["in_process"]["lenet5"]["batches"]
    assert list((out / "raw").glob("*_stats.csv")) and list((out / "raw").glob("*.html"))
    summary = (out / "summary.md").read_text()
    assert "## Goals" in summary and "## In-process limit" in summary
    assert "## Batching (from convserve's own /metrics)" in summary


def test_short_soak_serves_the_mix_without_5xx_and_reports_memory(
    quick_stored, bentoml_home, tmp_path
):
    """`make soak` in 30 seconds: the mix (with its bad inputs) at 80 % of capacity. The RSS
    slope goal needs the long run's warm-up; here only that it is measured and reported."""
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "convserve.loadtest.soak", "--minutes", "0.5",
           "--capacity-s", "8", "--warmup-s", "5", "--sample-s", "1", "--report-s", "10",
           "--model", "quick-lenet5:latest", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    summary = json.loads((out / "summary.json").read_text())
    print(done.stdout[-1500:])
    assert summary["requests"] > 1000 and summary["failures"] == 0, done.stdout[-2000:]
    assert summary["server_statuses"].get("5xx", 0) == 0
    assert summary["server_statuses"]["4xx"] > 0  # the bad inputs were sent and refused
    assert summary["endpoints"]["bad input"]["requests"] > 0
    assert summary["rss_slope_mb_per_min"] == summary["rss_slope_mb_per_min"]  # not NaN
    assert "soak: " in done.stdout and (out / "rss.png").stat().st_size > 0
    assert (out / "soak.md").read_text().startswith("Soak of 0.5 min")
