"""Triton's perf_analyzer against convserve and against Triton, on the same model and load: the
tool Triton's and KServe's users measure servers with, run unchanged, over HTTP and gRPC, with
tensors and with encoded images, at request concurrency 1 to 64.

    python -m convserve.loadtest.perf_analyzer                 # docs/bench/perf-analyzer
    python -m convserve.loadtest.perf_analyzer --quick --out build/perf-analyzer-quick

Each server runs pinned to one core, perf_analyzer on the other. The model is the default
LeNet-5 (fashion-lenet5 from the model store); the peer is Triton (the server nvidia-pytriton
ships) with the same ONNX file in ONNX Runtime behind PyTriton's dynamic batcher, as its
documentation shows (loadtest/peers/triton_ort.py):

    tensors  convserve `fashion-lenet5`        Triton `lenet5_pixels`   UINT8 [1, 1, 28, 28],
             perf_analyzer's random data (any byte is a pixel)
    images   convserve `fashion-lenet5.image`  Triton `lenet5`          BYTES [1, 1]: one PNG
             of the Fashion-MNIST test set per request (--input-data, 64 different ones)

Server CPU per request is the server's process-tree CPU over the whole perf_analyzer run divided
by the requests it completed (perf_analyzer's throughput times the run's time is not used: its
warm-up windows count too). The goals, as ratios measured in this run:

    gRPC tensors: server CPU per request <= 0.8 x HTTP tensors', at concurrency 64
    convserve's throughput ahead of Triton's, same protocol, inputs and concurrency

perf_analyzer ships in tritonclient 2.50.0's manylinux wheel (`ensure`, below); it needs
Debian's libb64-0d and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel (no GPU is used).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from convserve.defaults import SERVICE
from convserve.loadtest import peer_envs
from convserve.loadtest.processes import (
    PY,
    ROOT,
    NotReady,
    Server,
    cores,
    free_port,
    start,
    stop,
    tree_cpu_seconds,
)

CACHE = ROOT / ".cache" / "perf_analyzer"
TRITONCLIENT = "tritonclient==2.50.0"
CUDART = "nvidia-cuda-runtime-cu12==12.3.101"
BINARY = CACHE / "bin" / "perf_analyzer"
# perf_analyzer's flags for each way of calling: gRPC unary calls (ModelInfer), or one stream
# per concurrent request slot (ModelStreamInfer, `--streaming`).
PROTOCOLS = {"http": ["-i", "http"], "grpc": ["-i", "grpc"],
             "grpc-stream": ["-i", "grpc", "--streaming"]}  # fmt: skip
CONCURRENCY = (1, 4, 16, 64)
QUICK_CONCURRENCY = (1, 64)
IMAGES = 64  # different PNGs perf_analyzer cycles through
RUN_TIMEOUT_S = 240  # one perf_analyzer run; a run that hangs is reported as such
# A measurement is stable when 3 windows' throughput and latency are within this percentage
# (perf_analyzer's default is 10): a shared 2-core machine varies by more than that.
STABILITY_PERCENT = 25
GOAL_CPU_RATIO = 0.8


class Unavailable(Exception):
    """perf_analyzer cannot run here; the message says what is missing."""


def ensure() -> tuple[Path, dict[str, str]]:
    """perf_analyzer and the environment it runs in, unpacked from the wheels on first use."""
    libdir = CACHE / "lib"
    if not BINARY.exists():
        print(f"unpacking perf_analyzer from {TRITONCLIENT} into {CACHE} (once)", flush=True)
        wheels = CACHE / "wheels"
        for spec in (TRITONCLIENT, CUDART):
            subprocess.run(
                [PY, "-m", "pip", "download", "--quiet", "--no-deps", spec, "-d", str(wheels),
                 "--platform", "manylinux1_x86_64", "--only-binary=:all:"],
                check=True,
            )  # fmt: skip
        (CACHE / "bin").mkdir(parents=True, exist_ok=True)
        libdir.mkdir(parents=True, exist_ok=True)
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    name = Path(member).name
                    if member.endswith("/bin/perf_analyzer"):
                        BINARY.write_bytes(archive.read(member))
                        BINARY.chmod(0o755)
                    elif name.startswith("libcudart.so"):
                        (libdir / name).write_bytes(archive.read(member))
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    missing = subprocess.run(["ldd", str(BINARY)], capture_output=True, text=True, env=env)
    absent = [line.split()[0] for line in missing.stdout.splitlines() if "not found" in line]
    if absent:
        hint = " (apt-get install libb64-0d)" if any("b64" in a for a in absent) else ""
        raise Unavailable(f"perf_analyzer needs {', '.join(absent)}{hint}")
    return BINARY, env


def images_input(path: Path, count: int = IMAGES) -> Path:
    """perf_analyzer's --input-data file: `count` Fashion-MNIST test images as PNGs, one per
    request. A BYTES tensor's `b64` is its serialized form: each element after its 4-byte
    little-endian length."""
    from PIL import Image

    from convserve.models.data import load_fashion_mnist

    rows = []
    for pixels in load_fashion_mnist("test").images[:count]:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        element = struct.pack("<I", buf.tell()) + buf.getvalue()
        rows.append({"image": {"b64": base64.b64encode(element).decode()}})
    path.write_text(json.dumps({"data": rows}))
    return path


@dataclass
class Point:
    server: str
    protocol: str  # a key of PROTOCOLS
    inputs: str  # tensors | images
    concurrency: int
    throughput: float  # inferences/s, perf_analyzer's
    p50_us: float
    p99_us: float
    cpu_us_per_request: float  # the server's
    errors: str = ""


def run_one(
    binary: Path, env: dict[str, str], model: str, protocol: str, url: str, concurrency: int,
    *, input_data: Path | None, prefix: list[str], window_ms: int, cpu_of: int,
    count: Callable[[], int] | None,
) -> tuple[dict[str, str], float, str]:  # fmt: skip
    """One perf_analyzer run: its CSV row, the server's CPU µs per request, its errors."""
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        cmd = [
            *prefix, str(binary), "-m", model, *PROTOCOLS[protocol], "-u", url,
            "--concurrency-range", str(concurrency), "--measurement-interval", str(window_ms),
            "--max-trials", "8", "--stability-percentage", str(STABILITY_PERCENT),
            "-f", report.name,
        ]  # fmt: skip
        if input_data is not None:
            cmd += ["--input-data", str(input_data)]
        cpu, done, started = tree_cpu_seconds(cpu_of), count() if count else 0, time.monotonic()
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S
            )
            output, failed = result.stdout + result.stderr, result.returncode != 0
        except subprocess.TimeoutExpired:
            output, failed = f"did not finish in {RUN_TIMEOUT_S} s", True
        cpu, done = tree_cpu_seconds(cpu_of) - cpu, (count() - done) if count else 0
        wall = time.monotonic() - started
        errors = _errors(output) if failed else ""
        with open(report.name) as written:
            rows = list(csv.DictReader(written)) if not errors else []
    row = rows[0] if rows else {}
    if count is None:  # a server that counts nothing: its CPU rate over perf_analyzer's rate
        rate = float(row.get("Inferences/Second", 0) or 0)
        return row, (1e6 * cpu / wall / rate if rate else 0.0), errors
    return row, (1e6 * cpu / done if done else 0.0), errors


def _errors(output: str) -> str:
    lines = [x.strip() for x in output.splitlines() if re.search(r"error|fail", x, re.I)]
    return "; ".join(dict.fromkeys(lines))[:300] or output.strip()[-300:]


def _counter(url: str, name: str, label: str) -> Callable[[], int]:
    """A Prometheus counter's sum over the series whose labels hold `label`."""
    import httpx

    def value() -> int:
        text = httpx.get(url, timeout=10).text
        return int(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(name) and label in line
            )
        )

    return value


@dataclass(frozen=True)
class Target:
    server: str
    protocol: str
    inputs: str
    model: str
    url: str
    count: Callable[[], int] | None  # requests the server has completed so far, if it says


def _wait_grpc(address: str, timeout: float = 60) -> None:
    import grpc

    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)


def _pair(
    pid: int, server: str, tensors: str, images: str,
    addresses: dict[str, tuple[str, Callable[[], int]]],
) -> list[tuple[int, Target]]:  # fmt: skip
    """A server's targets: each protocol, tensors and images."""
    return [
        (pid, Target(server, protocol, inputs, model, address, count))
        for protocol, (address, count) in addresses.items()
        for inputs, model in (("tensors", tensors), ("images", images))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "perf-analyzer"))
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 64, short windows")
    parser.add_argument("--model", default="fashion-lenet5:latest")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=None,
        help="rounds of every run; each point is the median (default 3, --quick 1)",
    )  # fmt: skip
    parser.add_argument("--skip-floor", action="store_true", help="leave out grpcio's floor")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    binary, env = ensure()
    levels = QUICK_CONCURRENCY if args.quick else CONCURRENCY
    args.repeat = args.repeat or (1 if args.quick else 3)
    window_ms = 1000 if args.quick else 1500
    server_prefix, load_prefix = cores()
    work = Path(tempfile.mkdtemp(prefix="convserve-pa-"))
    images = images_input(work / "images.json")
    from convserve.store import load_model

    stored = load_model(args.model)
    name = stored.name
    points: list[Point] = []
    unavailable: dict[str, str] = {}
    started: list[subprocess.Popen] = []
    try:
        targets: list[tuple[int, Target]] = []
        grpc_port = free_port()
        convserve = Server(
            "convserve",
            [PY, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1", "--port", "{port}"],
            "/readyz",
            {"CONVSERVE_MODELS": stored.tag, "CONVSERVE_GRPC_PORT": str(grpc_port),
             "CONVSERVE_WARMUP_REQUESTS": "12", "CONVSERVE_INTRA_OP_THREADS": "1"},
        )  # fmt: skip
        proc, url = start(convserve, work / "convserve.log", prefix=server_prefix)
        started.append(proc)
        metrics = url + "/metrics"
        http_count = _counter(metrics, "convserve_requests_total", 'status="200"')
        grpc_count = _counter(metrics, "convserve_grpc_requests_total", 'code="OK"')
        targets += _pair(proc.pid, "convserve", name, name + ".image", {
            "http": (url.removeprefix("http://"), http_count),
            "grpc": (f"127.0.0.1:{grpc_port}", grpc_count),
            "grpc-stream": (f"127.0.0.1:{grpc_port}", grpc_count),
        })  # fmt: skip
        if not args.skip_triton:
            try:
                python = peer_envs.ensure("triton")
                triton = Server(
                    "triton",
                    [python, "loadtest/peers/triton_ort.py", "--port", "{port}"],
                    "/v2/models/lenet5/ready",
                    {
                        "PEER_ONNX": str(stored.path),
                        "PEER_SPEC": str(stored.path.parent / "spec.json"),
                        "PEER_THREADS": "1",
                    },  # fmt: skip
                )
                tproc, turl = start(triton, work / "triton.log", prefix=server_prefix)
                started.append(tproc)
                port = int(turl.rsplit(":", 1)[1])  # its gRPC and metrics ports follow
                tmetrics = f"http://127.0.0.1:{port + 2}/metrics"
                tcount = _counter(tmetrics, "nv_inference_request_success", "model=")
                # Unary calls only: at concurrency 64, perf_analyzer --streaming against the
                # PyTriton model did not finish in 10 minutes and Triton stopped answering.
                targets += _pair(tproc.pid, "triton", "lenet5_pixels", "lenet5", {
                    "http": (turl.removeprefix("http://"), tcount),
                    "grpc": (f"127.0.0.1:{port + 1}", tcount),
                })  # fmt: skip
            except (peer_envs.Unavailable, NotReady) as exc:
                unavailable["triton"] = str(exc).splitlines()[0]
                print(f"triton: {unavailable['triton']}", flush=True)
        if not args.skip_floor:
            fport = free_port()
            log = open(work / "floor.log", "wb")  # noqa: SIM115 (open while the floor runs)
            floor = subprocess.Popen(
                [*server_prefix, PY, "-m", "convserve.loadtest.peers.floor_grpc", "--port",
                 str(fport)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            started.append(floor)
            _wait_grpc(f"127.0.0.1:{fport}")
            for protocol in ("grpc", "grpc-stream"):
                target = Target("grpc-floor", protocol, "tensors", "floor", f"127.0.0.1:{fport}",
                                None)  # fmt: skip
                targets.append((floor.pid, target))
        total, k = len(targets) * len(levels) * args.repeat, 0
        # Rounds of every level, the servers alternating at each: drift hits them all alike.
        for concurrency in [c for _ in range(args.repeat) for c in levels]:
            for pid, target in targets:
                k += 1
                print(
                    f"[{k}/{total}] {target.server} {target.protocol} {target.inputs} "
                    f"concurrency {concurrency}",
                    flush=True,
                )
                row, cpu_us, errors = run_one(
                    binary, env, target.model, target.protocol, target.url, concurrency,
                    input_data=images if target.inputs == "images" else None,
                    prefix=load_prefix, window_ms=window_ms, cpu_of=pid, count=target.count,
                )  # fmt: skip
                points.append(
                    Point(
                        target.server, target.protocol, target.inputs, concurrency,
                        float(row.get("Inferences/Second", 0) or 0),
                        float(row.get("p50 latency", 0) or 0),
                        float(row.get("p99 latency", 0) or 0),
                        cpu_us, errors,
                    )
                )  # fmt: skip
                if errors:
                    print(f"  errors: {errors}", flush=True)
    finally:
        for proc in started:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    runs = points
    points = medians(runs)
    summary = report(points, unavailable, levels, args.repeat, runs)
    (out / "results.json").write_text(
        json.dumps(
            {
                "points": [asdict(p) for p in points],
                "runs": [asdict(p) for p in runs],
                "unavailable": unavailable,
            },
            indent=1,
        )  # fmt: skip
    )
    (out / "summary.md").write_text(summary)
    plot(points, out / "throughput.png")
    print(summary)
    return 1 if any(p.errors for p in points) else 0


def medians(runs: list[Point]) -> list[Point]:
    """One point per server, protocol, inputs and concurrency: the median of its runs that
    reported no error (each figure on its own); an error when none did."""
    keyed: dict[tuple[str, str, str, int], list[Point]] = {}
    for p in runs:
        keyed.setdefault((p.server, p.protocol, p.inputs, p.concurrency), []).append(p)
    points = []
    for key, group in keyed.items():
        good = [p for p in group if not p.errors]
        if not good:
            points.append(group[0])
            continue
        points.append(
            Point(
                *key,
                statistics.median(p.throughput for p in good),
                statistics.median(p.p50_us for p in good),
                statistics.median(p.p99_us for p in good),
                statistics.median(p.cpu_us_per_request for p in good),
            )
        )
    return points


def _find(points: list[Point], server: str, protocol: str, inputs: str, c: int) -> Point | None:
    return next(
        (p for p in points if (p.server, p.protocol, p.inputs, p.concurrency) ==
         (server, protocol, inputs, c)),
        None,
    )  # fmt: skip


def _cells(p: Point | None) -> str:
    if p is None:
        return "– | – | –"
    if p.errors:
        return f"error: {p.errors[:60]} | – | –"
    return f"{p.throughput:.0f} | {p.p99_us / 1000:.2f} | {p.cpu_us_per_request:.0f}"


def report(
    points: list[Point],
    unavailable: dict[str, str],
    levels: tuple[int, ...],
    repeat: int = 1,
    runs: list[Point] | None = None,
) -> str:
    lines = [
        "# perf_analyzer: convserve and Triton, LeNet-5",
        "",
        f"Made by `python -m convserve.loadtest.perf_analyzer` on {time.strftime('%Y-%m-%d')}: "
        "each server pinned to one core, perf_analyzer (tritonclient 2.50.0) on the other. "
        "Inferences/s (perf_analyzer's), p99 latency (ms) and the server's CPU µs per request; "
        f"each the median of {repeat} run(s), the servers alternating at every level.",
        "",
    ]
    titles = {"grpc": "gRPC (ModelInfer)", "grpc-stream": "gRPC streaming (ModelStreamInfer)",
              "http": "HTTP"}  # fmt: skip
    for protocol in PROTOCOLS:
        for inputs in ("tensors", "images"):
            lines += [
                f"## {titles[protocol]}, {inputs}",
                "",
                "| concurrency | convserve infer/s | p99 ms | CPU µs/req | Triton infer/s | "
                "p99 ms | CPU µs/req | convserve / Triton |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for c in levels:
                ours = _find(points, "convserve", protocol, inputs, c)
                theirs = _find(points, "triton", protocol, inputs, c)

                ratio = (
                    f"{ours.throughput / theirs.throughput:.2f}x"
                    if ours and theirs and theirs.throughput and not ours.errors
                    else "–"
                )
                lines.append(f"| {c} | {_cells(ours)} | {_cells(theirs)} | {ratio} |")
            lines.append("")
    if any(p.server == "grpc-floor" for p in points):
        lines += [
            "## grpcio's floor",
            "",
            "grpcio's asyncio server answering a fixed response (loadtest/peers/floor_grpc.py): "
            "what a call costs before any work, beside convserve's whole HTTP request.",
            "",
            "| concurrency | floor ModelInfer infer/s | CPU µs/req | floor ModelStreamInfer "
            "infer/s | CPU µs/req | convserve HTTP tensors CPU µs/req |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for c in levels:
            unary = _find(points, "grpc-floor", "grpc", "tensors", c)
            streamed = _find(points, "grpc-floor", "grpc-stream", "tensors", c)
            http = _find(points, "convserve", "http", "tensors", c)

            def two(p: Point | None) -> str:
                if p is None or p.errors:
                    return "– | –"
                return f"{p.throughput:.0f} | {p.cpu_us_per_request:.0f}"

            ours = f"{http.cpu_us_per_request:.0f}" if http and not http.errors else "–"
            lines.append(f"| {c} | {two(unary)} | {two(streamed)} | {ours} |")
        lines.append("")
    lines += ["## Goals", ""]
    top = max(levels)
    http = _find(points, "convserve", "http", "tensors", top)
    for protocol in ("grpc", "grpc-stream"):
        grpc = _find(points, "convserve", protocol, "tensors", top)
        if grpc and http and http.cpu_us_per_request and not grpc.errors:
            ratio = grpc.cpu_us_per_request / http.cpu_us_per_request
            verdict = "met" if ratio <= GOAL_CPU_RATIO else "NOT met"
            lines.append(
                f"- {titles[protocol]} tensors, server CPU per request at concurrency {top}: "
                f"{grpc.cpu_us_per_request:.0f} µs against HTTP's "
                f"{http.cpu_us_per_request:.0f} µs, {ratio:.2f}x (goal <= {GOAL_CPU_RATIO}): "
                f"**{verdict}**"
            )
    behind = []
    compared = 0
    for p in points:
        if p.server != "convserve" or p.errors:
            continue
        theirs = _find(points, "triton", p.protocol, p.inputs, p.concurrency)
        if theirs is None or theirs.errors or not theirs.throughput:
            continue
        compared += 1
        if p.throughput <= theirs.throughput:
            behind.append(f"{p.protocol} {p.inputs} at {p.concurrency}")
    if compared:
        verdict = "met" if not behind else f"NOT met ({', '.join(behind)})"
        lines.append(
            f"- convserve's throughput ahead of Triton's at every one of {compared} points: "
            f"**{verdict}**"
        )
    for server, why in unavailable.items():
        lines.append(f"- {server} did not run: {why}")
    runs = runs if runs is not None else points
    errors = [p for p in runs if p.errors]
    lines.append(
        f"- perf_analyzer runs that reported an error: {len(errors)} of {len(runs)}"
        + "".join(
            f"\n  - {p.server} {p.protocol} {p.inputs} {p.concurrency}: {p.errors}" for p in errors
        )  # fmt: skip
    )
    return "\n".join(lines) + "\n"


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, inputs in zip(axes, ("tensors", "images"), strict=True):
        for server, colour in (("convserve", "tab:blue"), ("triton", "tab:gray")):
            for protocol, style in (("grpc", "-"), ("grpc-stream", ":"), ("http", "--")):
                mine = sorted(
                    (p.concurrency, p.throughput)
                    for p in points
                    if (p.server, p.protocol, p.inputs) == (server, protocol, inputs)
                    and not p.errors
                )
                if mine:
                    xs, ys = zip(*mine, strict=True)
                    ax.plot(xs, ys, style, color=colour, marker="o", label=f"{server} {protocol}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("request concurrency")
        ax.set_title(f"LeNet-5, {inputs}, one core")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("inferences/s (perf_analyzer)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
