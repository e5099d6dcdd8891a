"""Where the time goes: a loaded server sampled with py-spy, its samples folded into layers,
reported in microseconds of server CPU per request; and wrk's HTTP floors beside it.

    python -m convserve.loadtest.profile --out docs/bench/profile --label after

The server (`bentoml serve`, the store in $BENTOML_HOME) runs pinned to one core, Locust on the
other. py-spy samples whichever thread holds the GIL, `RATE` times a second, so a layer's
samples / RATE is the time the interpreter spent in it (the layer of a sample: its innermost
recognised frame). Divided by the requests Locust completed in the window, that is
microseconds per request. The server's CPU time (its process tree) not spent holding the GIL
is code that released it: ONNX Runtime's kernels, Pillow's decoders, socket system calls; it
is shown as its own line, so the column adds up to the server's CPU per request.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from convserve.defaults import DEFAULT_TAG, SERVICE
from convserve.loadtest.bench import LOCUSTFILE
from convserve.loadtest.processes import PY, ROOT, Server, cores, start, stop, tree_cpu_seconds

# (layer, path fragments): a sample belongs to the first layer, from the innermost frame out,
# one of whose fragments is in the frame's file name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ONNX Runtime inference", ("onnxruntime",)),
    ("image decode + preprocess", ("/PIL/", "preprocess.py", "imaging.py")),
    ("multipart / body parsing", ("multipart", "formparsers", "/wire.py")),
    ("HTTP protocol (uvicorn)", ("h11", "httptools", "uvicorn/protocols", "uvloop")),
    ("tracing (OpenTelemetry)", ("opentelemetry",)),
    ("request metrics (prometheus_client)", ("server/http/instruments", "prometheus_client")),
    ("BentoML traffic middlewares", ("server/http/traffic",)),
    ("batching", ("dispatcher.py", "batching.py")),
    ("JSON / pydantic", ("/json/", "pydantic", "fastapi/encoders", "orjson")),
    ("FastAPI / Starlette routing", ("fastapi/", "starlette/")),
    ("BentoML plumbing", ("_bentoml_impl", "_bentoml_sdk", "bentoml/")),
    ("thread hops (anyio, executors)", ("anyio/", "concurrent/futures", "threading.py")),
    ("event loop (asyncio)", ("asyncio/",)),
    ("convserve: admission, clock", ("/service/admission.py", "/service/clock.py")),
    ("convserve: request ids, metrics layer", ("/service/requests_log.py", "/service/metrics.py")),
    # Before and after the serving core's restructuring: the front door and the protocols were
    # hotpath.py, rest.py and oip.py; decoding.py was inference.py.
    (
        "convserve: front door, protocols, task handlers",
        (
            "/service/server.py",
            "/service/protocols/",
            "/service/tasks/",
            "/service/decoding.py",
            "/service/hotpath.py",
            "/service/rest.py",
            "/service/oip.py",
            "/service/inference.py",
        ),
    ),
    ("convserve (other)", ("convserve", "/service/", "/loadtest/")),
]
OTHER = "other Python (interpreter, GC, numpy, ...)"
OUTSIDE_GIL = "outside the GIL (ORT kernels, Pillow decoders, syscalls)"
RATE = 250  # samples per second
_FRAME = re.compile(r"\(([^()]*?):\d+\)$")


@dataclass(frozen=True)
class Profile:
    label: str
    users: int
    seconds: float
    requests: int
    requests_per_s: float
    cpu_us_per_request: float
    samples: int
    layers: dict[str, float]  # microseconds of server CPU per request
    floors: dict[str, float]  # wrk requests/s


def layer_of(stack: str) -> str:
    """The layer of one folded stack (`frame;frame;...`, outermost first)."""
    for frame in reversed(stack.split(";")):
        match = _FRAME.search(frame)
        path = match.group(1) if match else frame
        for layer, fragments in LAYERS:
            if any(f in path for f in fragments):
                return layer
    return OTHER


def fold(raw: str) -> Counter[str]:
    """py-spy's `--format raw` output -> samples per layer."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[layer_of(stack)] += int(n)
    return counts


def _tool(name: str) -> str:
    """A command from this environment's bin directory, or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _locust(url: str, users: int, seconds: float, prefix: list[str], user_class: str) -> int:
    """Completed requests of a headless Locust run."""
    out = subprocess.run(
        [*prefix, PY, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
         "-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--only-summary",
         "--json", user_class],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    stats = json.loads(out.stdout)
    return sum(s["num_requests"] for s in stats)


def _wrk(url: str, prefix: list[str], seconds: int = 5, connections: int = 32) -> float:
    out = subprocess.run(
        [*prefix, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else 0.0


def profile(args: argparse.Namespace) -> Profile:
    server_prefix, load_prefix = cores()
    env = {"CONVSERVE_MODELS": args.models, "CONVSERVE_INTRA_OP_THREADS": "1",
           "CONVSERVE_GRPC_PORT": "0"}  # HTTP only  # fmt: skip
    if args.server_pythonpath:  # an older version installed apart (pip install --target)
        env["PYTHONPATH"] = args.server_pythonpath
    server = Server("convserve", [PY, "-m", "bentoml", "serve", args.service, "--port", "{port}"],
                    "/readyz", env)  # fmt: skip
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"server-{args.label}.log"
    proc, url = start(server, log, prefix=server_prefix, cwd=args.cwd)
    try:
        print(f"warming up ({args.users} users, 5 s)", flush=True)
        _locust(url, args.users, 5, load_prefix, args.user_class)
        raw = out / f"py-spy-{args.label}.txt"
        # --nonblocking: pausing the process for each sample would cost more than the requests.
        spy = subprocess.Popen(
            [_tool("py-spy"), "record", "--pid", str(proc.pid), "--subprocesses",
             "--full-filenames", "--nonblocking", "--gil", "--rate", str(RATE),
             "--duration", str(args.seconds + 2), "--format", "raw", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1)
        cpu0, t0 = tree_cpu_seconds(proc.pid), time.monotonic()
        print(f"profiling: {args.users} users, {args.seconds} s", flush=True)
        requests = _locust(url, args.users, args.seconds, load_prefix, args.user_class)
        cpu, elapsed = tree_cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
        spy.wait(timeout=60)
        floors = {}
        if shutil.which("wrk"):
            print("HTTP floors (wrk)", flush=True)
            floors = {
                "GET /livez (a BentoML route)": _wrk(f"{url}/livez", load_prefix),
                "GET /v2/health/live (through the mounted app)": _wrk(
                    f"{url}/v2/health/live", load_prefix
                ),
            }
    finally:
        stop(proc)
    counts = fold(raw.read_text())
    total = sum(counts.values()) or 1
    per_request = 1e6 * cpu / max(requests, 1)
    scale = 1e6 / RATE / max(requests, 1) * min(1.0, elapsed * RATE / total)
    layers = {k: n * scale for k, n in counts.most_common()}
    layers[OUTSIDE_GIL] = max(0.0, per_request - sum(layers.values()))
    return Profile(args.label, args.users, elapsed, requests, requests / elapsed, per_request,
                   total, layers, floors)  # fmt: skip


def table(profiles: list[Profile]) -> str:
    """Markdown: one column per profile, µs of server CPU per request for each layer."""
    names = [name for name, _ in LAYERS] + [OTHER, OUTSIDE_GIL]
    head = "| layer | " + " | ".join(f"{p.label} (µs/request)" for p in profiles) + " |"
    lines = [head, "|---" * (len(profiles) + 1) + "|"]
    for name in names:
        if any(name in p.layers for p in profiles):
            cells = " | ".join(f"{p.layers.get(name, 0.0):.0f}" for p in profiles)
            lines.append(f"| {name} | {cells} |")
    lines.append(
        "| **total server CPU** | "
        + " | ".join(f"**{p.cpu_us_per_request:.0f}**" for p in profiles)
        + " |"
    )
    lines.append("| requests/s | " + " | ".join(f"{p.requests_per_s:.0f}" for p in profiles) + " |")
    for floor in sorted({f for p in profiles for f in p.floors}):
        cells = " | ".join(
            f"{p.floors[floor]:.0f}" if floor in p.floors else "not measured" for p in profiles
        )
        lines.append(f"| wrk, {floor}, req/s | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--out", default="build/profile")
    parser.add_argument("--label", default="now", help="the column name, e.g. before / after")
    parser.add_argument("--models", default=DEFAULT_TAG)
    parser.add_argument("--service", default=SERVICE, help="the BentoML service's import path")
    parser.add_argument(
        "--cwd", help="where the server starts (e.g. a checkout of an older commit)"
    )
    parser.add_argument(
        "--server-pythonpath",
        help="the server imports convserve from here: an older commit installed with "
        "`pip install --no-deps --target DIR CHECKOUT` (start it with --cwd outside the checkout)",
    )
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--user-class", default="SingleImageUser")
    args = parser.parse_args(argv)
    result = profile(args)
    out = Path(args.out)
    (out / f"profile-{result.label}.json").write_text(json.dumps(asdict(result), indent=2))
    profiles = [Profile(**json.loads(p.read_text())) for p in sorted(out.glob("profile-*.json"))]
    profiles.sort(key=lambda p: (not p.label.startswith("before"), p.label))  # "before" first
    (out / "where-the-time-goes.md").write_text(table(profiles))
    print(table(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
