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
    (out / "profile").mkdir(parents=True)  # another command's output, which must survive
    (out / "profile" / "where-the-time-goes.md").write_text("kept")
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
    assert (out / "profile" / "where-the-time-goes.md").read_text() == "kept"
    assert "## Batching (from convserve's own /metrics)" in summary


def test_short_soak_serves_the_mix_without_5xx_and_reports_memory(
    quick_stored, bentoml_home, tmp_path
):
    """`make soak` in 30 seconds: the mix (with its bad inputs) at 80 % of capacity. The RSS
    slope goal needs the long run's warm-up; here only that it is measured and reported."""
    out = tmp_path / "soak"
    cmd = [
        sys.executable,
        "-m",
        "convserve.loadtest.soak",
        "--minutes",
        "0.5",
        "--capacity-s",
        "8",
        "--warmup-s",
        "5",
        "--sample-s",
        "1",
        "--report-s",
        "10",
        "--model",
        "quick-lenet5:latest",
        "--out",
        str(out),
    ]
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


def test_the_goals_are_computed_from_the_runs_figures():
    """The report's verdicts on a made-up run: each ratio from the right rows, met or missed."""
    from convserve.loadtest.bench import Result, Run
    from convserve.loadtest.report import goals
    from convserve.loadtest.scenarios import RESNET_MULTI, SINGLE, SINGLE_RAW

    def result(
        scenario,
        server,
        users,
        rps,
        cpu_us,
        p50=10.0,
        p99=20.0,
        shape="multipart",
        images=1,
    ):
        return Result(
            scenario,
            server,
            users,
            1000,
            0,
            rps,
            rps * images,
            p50,
            p50,
            p99,
            95.0,
            100.0,
            cpu_us,
            True,
            shape,
        )

    results = [
        result(SINGLE, "convserve", 64, 4000, 200, p99=25),
        result(SINGLE, "fastapi-lean", 64, 2000, 500),  # 2.5x the work per CPU-second: met
        result(SINGLE, "floor", 64, 3500, 160),  # 200 / 160 = 1.25: met (<= 1.3)
        result(SINGLE, "convserve", 32, 3800, 210),
        result(SINGLE, "fastapi-lean", 32, 1900, 300),  # 300 / 210 = 1.43: missed (>= 1.5)
        result(SINGLE_RAW, "convserve", 64, 3000, 220, shape="raw image body"),
        result(SINGLE_RAW, "torchserve", 64, 3100, 400, shape="raw image body"),  # ahead: no
        result(RESNET_MULTI, "convserve", 8, 30, 0, images=32),
    ]
    run = Run(
        results,
        {"resnet20": {"batches": [{"images_per_s": 3200.0}]}},
        {},
        [],
        15,
        [],
        [],
        False,
        {},
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in goals(run)[2:]}
    assert rows["requests per server-CPU-second vs fastapi-lean, 64 users"].endswith("| met |")
    assert "2.50×" in rows["requests per server-CPU-second vs fastapi-lean, 64 users"]
    assert "**missed**" in rows["requests per server-CPU-second vs fastapi-lean, 32 users"]
    assert "1.25×" in rows["server CPU per request vs the floor, 64 users"]
    assert rows["server CPU per request vs the floor, 64 users"].endswith("| met |")
    ahead = rows["ahead of every peer, 64 users (req/s, same request shape)"]
    assert "closest: torchserve" in ahead and "**missed**" in ahead
    assert rows["p99 at 64 users"].endswith("| met |")  # 25 <= 3 x 10
    resnet = rows["ResNet-20, 32 images per request: served ÷ in-process"]
    assert "960 ÷ 3,200" in resnet and "**missed**" in resnet  # 30 req/s x 32 = 960


def test_the_phone_photo_limit_measures_each_way_of_decoding(imagenet_stored, tmp_path):
    """`inprocess --phone`: CPU per 12 MP photo for the cheapest decode, convserve's and a full
    one, each answering the same top-1 on every photo (the harness compares the servers'
    answers the same way)."""
    from convserve.models.data import phone_photos

    for i, data in enumerate(phone_photos()):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    spec = imagenet_stored.path.parent / "spec.json"
    cmd = [sys.executable, "-m", "convserve.loadtest.inprocess", "--onnx",
           str(imagenet_stored.path), "--spec", str(spec), "--phone", str(tmp_path),
           "--rounds", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    limit = json.loads(done.stdout)
    assert limit["photos"] == 6 and limit["batch"] == 8
    assert all(limit[f"{way}_ms_per_photo"] > 0 for way in ("cheapest", "recipe", "full", "model"))
    top1 = limit["top1"]
    assert len(top1["full"]) == 6 and top1["cheapest"] == top1["recipe"] == top1["full"]


def test_perf_analyzer_points_are_medians_and_the_goals_follow_from_them():
    """The perf_analyzer harness's arithmetic, on made-up runs (no server)."""
    from convserve.loadtest.perf_analyzer import Point, medians, report

    def run(server, protocol, throughput, cpu, errors=""):
        return Point(server, protocol, "tensors", 64, throughput, 1000, 2000, cpu, errors)

    runs = [
        run("convserve", "http", 3000, 300), run("convserve", "http", 5000, 200),
        run("convserve", "http", 4000, 250), run("convserve", "http", 9, 9, "unstable"),
        run("convserve", "grpc-stream", 4500, 190), run("convserve", "grpc", 1500, 600),
        run("triton", "http", 2000, 500), run("triton", "grpc", 3000, 300),
    ]  # fmt: skip
    points = {(p.server, p.protocol): p for p in medians(runs)}
    http = points[("convserve", "http")]
    assert (http.throughput, http.cpu_us_per_request, http.errors) == (4000, 250, "")
    summary = report(list(points.values()), {}, (64,), 4, runs)
    assert "190 µs against HTTP's 250 µs, 0.76x (goal <= 0.8): **met**" in summary
    assert "600 µs against HTTP's 250 µs, 2.40x (goal <= 0.8): **NOT met**" in summary
    assert "**NOT met (grpc tensors at 64)**" in summary  # HTTP ahead of Triton, gRPC behind
    assert "reported an error: 1 of 8" in summary
