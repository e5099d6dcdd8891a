"""Benchmark harness: convserve against the in-process limit and against its peers, side by
side in one run, with the same model, preprocessing and load.

    python -m convserve.loadtest.bench                      # the full run behind docs/benchmarks.md
    python -m convserve.loadtest.bench --quick --out build/bench-quick   # < 2 minutes, a smoke test

For each scenario it starts the server itself (pinned to its own cores where the machine has
several), waits for readiness, runs headless Locust (--csv, --html) for a bounded time,
samples the server's CPU and memory, stops everything it started, and finally writes
results.json / results.csv, plots and summary.md with ratios and the goals.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from convserve.defaults import DEFAULT_TAG, LENET, SERVICE
from convserve.loadtest.scrape import batching, scrape

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
PEERS = "convserve.loadtest.peers"
PY = sys.executable


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]  # {port} is filled in
    health: str
    env: dict[str, str] = field(default_factory=dict)
    how: str = ""  # how it is tuned, for the summary


@dataclass(frozen=True)
class Scenario:
    name: str
    server: str
    user_class: str
    users: list[int]
    images_per_request: int = 1
    model: str = "lenet5"  # which model files the server gets


@dataclass
class Result:
    scenario: str
    server: str
    users: int
    requests: int
    failures: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_percent: float
    peak_rss_mb: float
    cpu_us_per_request: float = 0.0  # server CPU (its process tree) per completed request
    batching: dict | None = None  # convserve's own /metrics over the run (scrape.batching)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cores() -> tuple[list[str], list[str]]:
    """taskset prefixes for the server and the load generator (none on a single core)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return [], []
    half = len(cpus) // 2
    server, load = cpus[:half], cpus[half:]
    return (
        ["taskset", "-c", ",".join(map(str, server))],
        ["taskset", "-c", ",".join(map(str, load))],
    )


def _uvicorn(app: str) -> list[str]:
    """A FastAPI peer as its documentation runs it: one uvicorn worker, no access log."""
    return [
        PY,
        "-m",
        "uvicorn",
        app,
        "--port",
        "{port}",
        "--workers",
        "1",
        "--log-level",
        "warning",
    ]


def servers(threads: int) -> dict[str, Server]:
    conv_env = {"CONVSERVE_INTRA_OP_THREADS": str(threads), "CONVSERVE_WARMUP_REQUESTS": "12"}
    peer_env = {"PEER_THREADS": str(threads)}
    bentoml = [PY, "-m", "bentoml", "serve"]
    return {
        "convserve": Server(
            "convserve",
            [*bentoml, SERVICE, "--port", "{port}"],
            "/readyz",
            conv_env,
            "defaults: adaptive batching by images (max 128, no queue delay, 2 s budget), "
            "raw ASGI inference routes, warm-up, no access log",
        ),
        "convserve-nobatch": Server(
            "convserve-nobatch",
            [*bentoml, SERVICE, "--port", "{port}"],
            "/readyz",
            {**conv_env, "CONVSERVE_MAX_BATCH_SIZE": "1"},
            "adaptive batching off (max batch 1)",
        ),
        "fastapi-ort": Server(
            "fastapi-ort",
            _uvicorn(f"{PEERS}.fastapi_ort:app"),
            "/health",
            peer_env,
            "the hand-written baseline: uvicorn, one async route taking UploadFile, Pillow, one "
            "ORT session with one thread, no batching",
        ),  # fmt: skip
        "fastapi-torch": Server(
            "fastapi-torch",
            _uvicorn(f"{PEERS}.fastapi_torch:app"),
            "/health",
            peer_env,
            "uvicorn, 1 worker, sync endpoint (thread pool), torch.inference_mode, threads = "
            "cores, no access log",
        ),
        "bentoml-torch": Server(
            "bentoml-torch",
            [*bentoml, f"{PEERS}.bentoml_torch:TorchClassifier", "--port", "{port}"],
            "/readyz",
            peer_env,
            "batchable API (max batch 128, max latency 2 s), 1 worker, threads = cores, "
            "no access log",
        ),
        "litserve-ort": Server(
            "litserve-ort",
            [PY, "-m", f"{PEERS}.litserve_ort", "--port", "{port}"],
            "/health",
            peer_env,
            "LitAPI with batching (max batch 64, 5 ms timeout), 1 worker, ORT threads = cores, "
            "no access log",
        ),
    }


SINGLE = "lenet5 single image"
PEER_ORDER = ("convserve", "fastapi-ort", "fastapi-torch", "bentoml-torch", "litserve-ort")


def _scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario("lenet5 single image", "convserve", "SingleImageUser", [1, 8])]
    users = [1, 8, 32, 64]
    return [
        *(Scenario("lenet5 single image", s, "SingleImageUser", users) for s in PEER_ORDER),
        Scenario("lenet5 single image", "convserve-nobatch", "SingleImageUser", [1, 64]),
        Scenario("lenet5 32 images per request", "convserve", "MultiImageUser", [8], 32),
        Scenario("resnet20 at saturation", "convserve", "SingleImageUser", [64], 1, "resnet20"),
        Scenario(
            "resnet20 32 images per request", "convserve", "MultiImageUser", [8], 32, "resnet20"
        ),
        Scenario(
            "resnet20 int8 32 images per request",
            "convserve",
            "MultiImageUser",
            [8],
            32,
            "resnet20-int8",
        ),
    ]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants so far."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


class Sampler:
    """CPU (percent of one core, summed over the process tree) and peak RSS of a server."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.cpu: list[float] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _run(self) -> None:
        procs = {p.pid: p for p in self._tree()}
        for p in procs.values():
            p.cpu_percent(None)
        while not self._stop.wait(0.5):
            for p in self._tree():
                if p.pid not in procs:
                    procs[p.pid] = p
                    p.cpu_percent(None)
            total, rss = 0.0, 0
            for p in list(procs.values()):
                try:
                    total += p.cpu_percent(None)
                    rss += p.memory_info().rss
                except psutil.Error:
                    procs.pop(p.pid, None)
            self.cpu.append(total)
            self.peak_rss = max(self.peak_rss, rss)

    def __enter__(self) -> Sampler:
        self.cpu_at_start = tree_cpu_seconds(self.root.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_used = tree_cpu_seconds(self.root.pid) - self.cpu_at_start
        self._stop.set()
        self._thread.join()


def _start(
    server: Server, env: dict[str, str], prefix: list[str], log: Path, cwd: str | None = None
) -> tuple:
    port = _free_port()
    cmd = [*prefix, *(c.replace("{port}", str(port)) for c in server.command)]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or ROOT,
        env={**os.environ, **env, **server.env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited; see {log}")
        try:
            if httpx.get(url + server.health, timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    _stop(proc)
    raise RuntimeError(f"{server.name} not ready in 180 s; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _locust(
    url: str,
    scenario: Scenario,
    users: int,
    seconds: int,
    prefix: list[str],
    raw: Path,
    env: dict[str, str],
) -> dict:
    stem = raw / f"{scenario.server}-{scenario.model}-{scenario.user_class}-{users}u"
    cmd = [
        *prefix,
        PY,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--csv",
        str(stem),
        "--html",
        f"{stem}.html",
        "--only-summary",
        "--stop-timeout",
        "10",
        scenario.user_class,
    ]
    subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, timeout=seconds + 120
    )
    with open(f"{stem}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    return rows["Aggregated"]


def _probe(url: str, prefix: list[str], requests: int) -> dict:
    """One user's latency on the load generator's core (loadtest/probe.py)."""
    print(f"one-user latency probe: {requests} sequential requests", flush=True)
    done = subprocess.run(
        [*prefix, PY, "-m", "convserve.loadtest.probe", "--url", url, "--requests", str(requests)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return json.loads(done.stdout)


def _prepare_models(args: argparse.Namespace, work: Path, scenarios: list[Scenario]) -> dict:
    """Model files per scenario model: a BENTOML_HOME store plus the ONNX/spec/checkpoint."""
    from convserve.store import load_model, save_model

    home = work / "bentoml"
    os.environ["BENTOML_HOME"] = str(home)
    models: dict[str, dict[str, str]] = {}
    source = Path(args.bentoml_home) / "models" / LENET
    shutil.copytree(source, home / "models" / LENET)
    lenet = load_model(DEFAULT_TAG)
    models["lenet5"] = {
        "tag": lenet.tag,
        "onnx": str(lenet.path),
        "spec": str(lenet.path.parent / "spec.json"),
        "checkpoint": str(Path(args.checkpoint).resolve()),
    }
    if any(s.model.startswith("resnet20") for s in scenarios):
        import torch

        from convserve.export.onnx_export import ExportConfig, export_onnx
        from convserve.export.quantize import quantize_int8
        from convserve.export.verify import known_pixels
        from convserve.models import create_model
        from convserve.preprocess import from_pixels
        from convserve.spec import ModelSpec

        ckpt = Path(args.resnet_checkpoint) if args.resnet_checkpoint else None
        if ckpt is None:  # throughput does not depend on the weights' values
            torch.manual_seed(0)
            kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10}
            spec = lenet.spec.model_copy(
                update={"architecture": "resnet20", "kwargs": kwargs, "metrics": {}}
            )
            ckpt = work / "resnet20.pt"
            torch.save(
                {
                    "spec": ModelSpec.model_dump(spec, mode="json"),
                    "state_dict": create_model("resnet20", **kwargs).state_dict(),
                },
                ckpt,
            )
        path, spec = export_onnx(ExportConfig(str(ckpt), str(work / "resnet20.onnx")))
        inputs = known_pixels(spec)
        calibration = from_pixels(known_pixels(spec, count=256), spec.input)
        int8 = quantize_int8(path, work / "resnet20.int8.onnx", calibration)
        q = save_model(int8, spec, "bench-resnet20", inputs, precision="int8")
        f = save_model(path, spec, "bench-resnet20", inputs)
        for key, stored in (("resnet20", f), ("resnet20-int8", q)):
            models[key] = {
                "tag": stored.tag,
                "onnx": str(stored.path),
                "spec": str(stored.path.parent / "spec.json"),
                "checkpoint": str(ckpt),
            }
    return models


def run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    raw = out / "raw"
    shutil.rmtree(out, ignore_errors=True)
    raw.mkdir(parents=True)
    scenarios = _scenarios(args.quick)
    if args.servers:
        scenarios = [s for s in scenarios if s.server in args.servers.split(",")]
    seconds = args.seconds or (5 if args.quick else 15)
    server_prefix, load_prefix = _cores()
    threads = len(os.sched_getaffinity(0)) // 2 if server_prefix else 1
    table = servers(max(1, threads))
    work = Path(tempfile.mkdtemp(prefix="convserve-bench-"))
    models = _prepare_models(args, work, scenarios)
    results: list[Result] = []
    limits: dict[str, dict] = {}
    runs, k = sum(len(sc.users) for sc in scenarios), 0
    probe: dict | None = None
    try:
        for model, files in models.items():
            print(f"in-process limit: {model}", flush=True)
            done = subprocess.run(
                [
                    *server_prefix,
                    PY,
                    "-m",
                    "convserve.loadtest.inprocess",
                    "--onnx",
                    files["onnx"],
                    "--spec",
                    files["spec"],
                    "--threads",
                    str(max(1, threads)),
                    "--seconds",
                    "1" if args.quick else "3",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            limits[model] = json.loads(done.stdout)
        for scenario in scenarios:
            files = models[scenario.model]
            env = {
                "CONVSERVE_MODELS": files["tag"],
                "PEER_CHECKPOINT": files["checkpoint"],
                "PEER_ONNX": files["onnx"],
                "PEER_SPEC": files["spec"],
            }
            load_env = {"CONVSERVE_LOCUST_V2_MODEL": files["tag"].split(":")[0]}
            server = table[scenario.server]
            log = raw / f"{scenario.server}-{scenario.model}.log"
            proc, url = _start(server, env, server_prefix, log)
            try:
                if scenario.server == "convserve" and scenario.name == SINGLE and probe is None:
                    probe = _probe(url, load_prefix, 300 if args.quick else 3000)
                for users in scenario.users:
                    k += 1
                    eta = (runs - k + 1) * (seconds + 6)
                    print(
                        f"[{k}/{runs}] {scenario.name}: {server.name}, {users} users "
                        f"(about {eta // 60:.0f} min {eta % 60:02.0f} s left)",
                        flush=True,
                    )
                    ours = server.name.startswith("convserve")
                    before = scrape(url) if ours else None
                    with Sampler(proc.pid) as sampler:
                        row = _locust(url, scenario, users, seconds, load_prefix, raw, load_env)
                    batches = batching(before, scrape(url)) if before is not None else None
                    rps = float(row["Requests/s"])
                    results.append(
                        Result(
                            scenario=scenario.name,
                            server=server.name,
                            users=users,
                            requests=int(row["Request Count"]),
                            failures=int(row["Failure Count"]),
                            requests_per_s=rps,
                            images_per_s=rps * scenario.images_per_request,
                            p50_ms=float(row["50%"]),
                            p95_ms=float(row["95%"]),
                            p99_ms=float(row["99%"]),
                            cpu_percent=max(sampler.cpu, default=0.0),
                            peak_rss_mb=sampler.peak_rss / 1e6,
                            cpu_us_per_request=1e6
                            * sampler.cpu_used
                            / max(1, int(row["Request Count"])),
                            batching=batches,
                        )
                    )
                    r = results[-1]
                    print(
                        f"    {r.requests_per_s:.0f} req/s, {r.images_per_s:.0f} images/s, "
                        f"p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms, "
                        f"{r.cpu_us_per_request:.0f} µs server CPU/request, "
                        f"{r.failures} failures",
                        flush=True,
                    )
            finally:
                _stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(out, results, limits, table, scenarios, seconds, server_prefix, load_prefix, args, probe)
    return out


def _write(
    out, results, limits, table, scenarios, seconds, server_prefix, load_prefix, args, probe
):  # noqa: ANN001, PLR0913, E501
    (out / "results.json").write_text(
        json.dumps(
            {
                "results": [asdict(r) for r in results],
                "in_process": limits,
                "one_user_probe": probe,
                "machine": _machine(),
                "seconds_per_run": seconds,
            },
            indent=2,
        )
    )
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    from convserve.loadtest.report import plot, summary

    plot(results, out)
    (out / "summary.md").write_text(
        summary(
            results,
            limits,
            table,
            scenarios,
            seconds,
            server_prefix,
            load_prefix,
            args.quick,
            _machine(),
            probe,
        )
    )


def _machine() -> dict:
    import onnxruntime

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 1e9),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convserve bench", description=__doc__.partition("\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="one short scenario (smoke test)")
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--seconds", type=int, help="per run (default 15, quick 5)")
    parser.add_argument(
        "--bentoml-home",
        default=os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml")),
        help="store holding fashion-lenet5",
    )
    parser.add_argument(
        "--checkpoint",
        default="runs/default/best.pt",
        help="the PyTorch checkpoint of that model, for the PyTorch peers",
    )
    parser.add_argument("--resnet-checkpoint", help="a trained resnet20 (default: untrained)")
    parser.add_argument(
        "--servers", help="only these servers' scenarios, comma-separated (e.g. convserve)"
    )
    args = parser.parse_args(argv)
    out = run(args)
    print(f"results in {out}/ (summary.md, results.json, results.csv, plots, raw/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
