"""Benchmark harness: convserve against the in-process limit, the floor and its peers, side by
side in one run, with the same model, the same images and the same Locust load.

    python -m convserve.loadtest.bench                      # the full run behind docs/benchmarks.md
    python -m convserve.loadtest.bench --quick --out build/bench-quick   # < 2 minutes, a smoke test
    python -m convserve.loadtest.bench --only phone --out docs/bench/phone   # 12 MP phone photos

For each scenario (loadtest/scenarios.py) it starts the server itself, pinned to its own core
(the load generator gets the other), waits for readiness, runs headless Locust for a bounded
time, samples the server's CPU and memory, scrapes convserve's /metrics before and after, stops
everything it started, and writes results.json / results.csv, plots and summary.md with the
goals. A peer that cannot run here is reported with the reason, not dropped silently.

Only the files it writes are replaced in --out: other commands' output beside them stays.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from convserve.loadtest import peer_envs
from convserve.loadtest.prepare import ModelFiles, prepare_models
from convserve.loadtest.processes import PY, ROOT, NotReady, Sampler, Server, cores, start, stop
from convserve.loadtest.scenarios import MULTIPART, Scenario, scenarios, servers
from convserve.loadtest.scrape import batching, scrape

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
SATURATED = 90.0  # percent of the server's cores: below this a run did not saturate it


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
    cpu_percent: float  # mean over the run, percent of one core (the process tree)
    peak_rss_mb: float
    cpu_us_per_request: float = 0.0  # server CPU (its process tree) per completed request
    saturated: bool = False  # the server's cores were busy (cpu_percent >= SATURATED x cores)
    shape: str = ""
    batching: dict | None = None  # convserve's own /metrics over the run (scrape.batching)


@dataclass
class Run:
    """Everything one benchmark run measured, for the report."""

    results: list[Result]
    limits: dict[str, dict]  # model -> in-process figures (loadtest/inprocess.py)
    servers: dict[str, Server]
    scenarios: list[Scenario]
    seconds: int
    server_prefix: list[str]
    load_prefix: list[str]
    quick: bool
    machine: dict
    probe: dict | None = None  # one user, sequential (loadtest/probe.py)
    unavailable: dict[str, str] = field(default_factory=dict)  # server -> why it did not run
    # server -> the top-1 index it answered for each phone photo, in order (multipart servers)
    answers: dict[str, list[int]] = field(default_factory=dict)

    def find(self, scenario: str, server: str, users: int) -> Result | None:
        return next(
            (
                r
                for r in self.results
                if (r.scenario, r.server, r.users) == (scenario, server, users)
            ),
            None,
        )


def _locust(
    url: str,
    scenario: Scenario,
    users: int,
    seconds: int,
    prefix: list[str],
    raw: Path,
    env: dict[str, str],
) -> dict:
    per_request = f"-{scenario.images_per_request}i" if scenario.images_per_request > 1 else ""
    stem = raw / f"{scenario.server}-{scenario.model}-{scenario.user_class}{per_request}-{users}u"
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
        cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, timeout=seconds + 180
    )
    with open(f"{stem}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    return rows["Aggregated"]


def _probe(url: str, prefix: list[str], requests: int) -> dict:
    """One user's latency on the load generator's core (loadtest/probe.py)."""
    print(f"one-user latency probe: {requests} sequential requests", flush=True)
    done = subprocess.run(
        [*prefix, PY, "-m", "convserve.loadtest.probe", "--url", url, "--requests", str(requests)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(done.stdout)


def _phone_answers(url: str, folder: Path, model: str) -> list[int]:
    """The top-1 index a multipart server answers for each phone photo, one request each."""
    import requests

    answers = []
    for path in sorted(folder.glob("*.jpg")):
        files = {"images": (path.name, path.read_bytes(), "image/jpeg")}
        resp = requests.post(f"{url}/classify?top_k=1&model={model}", files=files, timeout=60)
        resp.raise_for_status()
        answers.append(int(resp.json()["results"][0]["predictions"][0]["index"]))
    return answers


def _inprocess(files: ModelFiles, threads: int, prefix: list[str], *options: str) -> dict:
    """loadtest/inprocess.py on the server's cores, with the server's threads: its JSON."""
    cmd = [*prefix, PY, "-m", "convserve.loadtest.inprocess", "--onnx", files.onnx,
           "--spec", files.spec, "--threads", str(threads), *options]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _limit(files: ModelFiles, threads: int, prefix: list[str], quick: bool, photos: bool) -> dict:
    options = ["--seconds", "1" if quick else "3"]
    if photos:
        options += ["--photos", "--batch-sizes", "1,8,16"]
    return _inprocess(files, threads, prefix, *options)


def _measure(
    url: str,
    proc: subprocess.Popen,
    scenario: Scenario,
    users: int,
    seconds: int,
    raw: Path,
    load_prefix: list[str],
    env: dict[str, str],
    cpus: int,
) -> Result:
    ours = scenario.server.startswith("convserve")
    before = scrape(url) if ours else None
    with Sampler(proc.pid) as sampler:
        row = _locust(url, scenario, users, seconds, load_prefix, raw, env)
    batches = batching(before, scrape(url)) if before is not None else None
    rps, count = float(row["Requests/s"]), int(row["Request Count"])
    busy = sampler.cpu[1:] or sampler.cpu  # the first sample straddles the start
    mean_cpu = sum(busy) / max(1, len(busy))
    return Result(
        scenario=scenario.name,
        server=scenario.server,
        users=users,
        requests=count,
        failures=int(row["Failure Count"]),
        requests_per_s=rps,
        images_per_s=rps * scenario.images_per_request,
        p50_ms=float(row["50%"]),
        p95_ms=float(row["95%"]),
        p99_ms=float(row["99%"]),
        cpu_percent=mean_cpu,
        peak_rss_mb=sampler.peak_rss / 1e6,
        cpu_us_per_request=1e6 * sampler.cpu_used / max(1, count),
        saturated=mean_cpu >= SATURATED * cpus,
        shape=scenario.shape,
        batching=batches,
    )


def run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"
    shutil.rmtree(raw, ignore_errors=True)  # this run's raw files only
    raw.mkdir()
    chosen = scenarios(args.quick)
    if args.servers:
        chosen = [s for s in chosen if s.server in args.servers.split(",")]
    if args.only:
        chosen = [s for s in chosen if args.only in s.name]
    seconds = args.seconds or (5 if args.quick else 15)
    server_prefix, load_prefix = cores()
    cpus = len(os.sched_getaffinity(0)) // 2 if server_prefix else len(os.sched_getaffinity(0))
    threads = max(1, cpus)
    unavailable: dict[str, str] = {}

    def peer_python(name: str) -> str:
        try:
            return peer_envs.ensure(name)
        except peer_envs.Unavailable as exc:
            unavailable[name] = str(exc)
            return "false"  # a command that exits at once; the scenario is skipped below

    needed = {s.server for s in chosen}
    table = servers(threads, lambda n: peer_python(n) if n in needed else "false")
    work = Path(tempfile.mkdtemp(prefix="convserve-bench-"))
    missing: dict[str, str] = {}  # task models not in the user's store
    models = prepare_models(args, work, {s.model for s in chosen}, missing)
    phone = work / "phone"  # 12 MP phone JPEGs, made for this run (never stored)
    if any(s.against == "phone" for s in chosen):
        from convserve.models.data import phone_photos

        phone.mkdir()
        for i, data in enumerate(phone_photos()):
            (phone / f"{i}.jpg").write_bytes(data)
    results: list[Result] = []
    answers: dict[str, list[int]] = {}
    limits: dict[str, dict] = {}
    runs, k = sum(len(sc.users) for sc in chosen), 0
    probe: dict | None = None
    try:
        for model, files in models.items():
            print(f"in-process limit: {model}", flush=True)
            limits[model] = _limit(
                files, threads, server_prefix, args.quick, photos=model.startswith("efficientnet")
            )
            if phone.is_dir() and model == "efficientnet-lite0":
                print("in-process limit: efficientnet-lite0 on phone photos", flush=True)
                # CPU per phone photo, each way of decoding it
                limits[model]["phone"] = _inprocess(
                    files, threads, server_prefix, "--phone", str(phone)
                )
        for scenario in chosen:
            if scenario.model in missing:
                k += len(scenario.users)
                unavailable[scenario.name] = missing[scenario.model]
                print(f"skipping {scenario.name}: {missing[scenario.model]}", flush=True)
                continue
            files = models[scenario.model]
            server = table[scenario.server]
            if scenario.server in unavailable:
                k += len(scenario.users)
                print(f"skipping {scenario.server}: {unavailable[scenario.server]}", flush=True)
                continue
            env = {
                "CONVSERVE_MODELS": files.tag,
                "PEER_ONNX": files.onnx,
                "PEER_SPEC": files.spec,
                "PEER_TORCHSCRIPT": files.torchscript or "",
            }
            load_env = {
                "CONVSERVE_LOCUST_V2_MODEL": files.tag.split(":")[0],
                "CONVSERVE_LOCUST_MODEL": files.tag.split(":")[0],
                "CONVSERVE_LOCUST_SPEC": files.spec,  # its labels, for the peers' answers
                "CONVSERVE_LOCUST_PHONE_DIR": str(phone),
                **scenario.locust_env,
            }
            log = raw / f"{scenario.server}-{scenario.model}.log"
            try:
                proc, url = start(server, log, env=env, prefix=server_prefix, timeout=300)
            except NotReady as exc:
                unavailable[scenario.server] = f"did not start: {str(exc).splitlines()[0]}"
                k += len(scenario.users)
                print(f"{scenario.server} did not start; see {log}", flush=True)
                continue
            try:
                phone_multipart = scenario.against == "phone" and scenario.shape == MULTIPART
                if phone_multipart and scenario.server not in answers:
                    answers[scenario.server] = _phone_answers(
                        url, phone, load_env["CONVSERVE_LOCUST_MODEL"]
                    )
                if (
                    scenario.server == "convserve"
                    and scenario.user_class == "SingleImageUser"
                    and probe is None
                ):
                    probe = _probe(url, load_prefix, 300 if args.quick else 3000)
                for users in scenario.users:
                    k += 1
                    eta = (runs - k + 1) * (seconds + 6)
                    print(
                        f"[{k}/{runs}] {scenario.name}: {server.name}, {users} users "
                        f"(about {eta // 60:.0f} min {eta % 60:02.0f} s left)",
                        flush=True,
                    )
                    r = _measure(
                        url, proc, scenario, users, seconds, raw, load_prefix, load_env, cpus
                    )
                    results.append(r)
                    print(
                        f"    {r.requests_per_s:.0f} req/s, {r.images_per_s:.0f} images/s, "
                        f"p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms, "
                        f"{r.cpu_us_per_request:.0f} µs server CPU/request "
                        f"({r.cpu_percent:.0f} % CPU{'' if r.saturated else ', not saturated'}),"
                        f" {r.failures} failures",
                        flush=True,
                    )
            finally:
                stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = Run(
        results,
        limits,
        table,
        chosen,
        seconds,
        server_prefix,
        load_prefix,
        args.quick,
        machine(),
        probe,
        unavailable,
        answers,
    )
    write(out, report)
    return out


def write(out: Path, run: Run) -> None:
    """results.json, results.csv, the plots and summary.md (the files this harness owns)."""
    from convserve.loadtest.plots import plot
    from convserve.loadtest.report import summary

    (out / "results.json").write_text(
        json.dumps(
            {
                "results": [asdict(r) for r in run.results],
                "in_process": run.limits,
                "one_user_probe": run.probe,
                "machine": run.machine,
                "seconds_per_run": run.seconds,
                "unavailable": run.unavailable,
                "phone_answers": run.answers,
            },
            indent=2,
        )
    )
    if run.results:
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=[k for k in asdict(run.results[0]) if k != "batching"]
            )
            writer.writeheader()
            writer.writerows(
                {k: v for k, v in asdict(r).items() if k != "batching"} for r in run.results
            )
    plot(run, out)
    (out / "summary.md").write_text(summary(run))


def machine() -> dict:
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
    parser.add_argument("--servers", help="only these servers' scenarios, comma-separated")
    parser.add_argument("--only", help="only the scenarios whose name holds this, e.g. phone")
    args = parser.parse_args(argv)
    out = run(args)
    print(f"results in {out}/ (summary.md, results.json, results.csv, plots, raw/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
