"""Slow request heads against one worker: many connections that send a request line and then
one header byte every few seconds (reconnecting when closed), and normal requests made while
they are held.

    python -m convserve.loadtest.slow_heads --connections 24000 --out docs/reliability

The server (`bentoml serve`, the default model of the store in $BENTOML_HOME, its default
limits) runs on one core; the attack runs on the other, in as many processes as the machine's
limit on open files per process needs (each raises its own limit to the hard one and holds at
most 12,000 connections, or 1,000 fewer than the limit). Reported: how many heads the server
closed, the longest any stayed open, and the normal requests' statuses and latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx

from convserve.defaults import DEFAULT_TAG, SERVICE
from convserve.loadtest.processes import PY, Server, cores, start, stop


def per_process() -> int:
    """Connections one attacking process may hold: its hard limit on open files, less room
    for the interpreter's own."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1_000_000
    return max(1, min(12_000, limit - 1_000))


async def _slow_head(host: str, port: int, every_s: float, until: float, held: list[float]) -> None:
    """One attacker: a request line, then a header byte every `every_s`; when the server hangs
    up, the time it held the connection is recorded and it connects again."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(1.0)
            continue
        opened = time.monotonic()
        writer.write(f"GET /models HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
        try:
            while time.monotonic() < until:
                try:
                    await asyncio.wait_for(reader.read(4096), timeout=every_s)
                    break  # an answer (408) or the end of the connection: the server closed it
                except TimeoutError:
                    writer.write(b"x")
                    await writer.drain()
        except OSError:
            pass
        held.append(time.monotonic() - opened)
        writer.close()


def attack(host: str, port: int, connections: int, every_s: float, seconds: float) -> None:
    """One attacking process; prints its held times as JSON when done."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list[float] = []

    async def main() -> None:
        until = time.monotonic() + seconds
        tasks = []
        for i in range(connections):
            tasks.append(asyncio.ensure_future(_slow_head(host, port, every_s, until, held)))
            if i % 500 == 499:
                await asyncio.sleep(0.05)  # a ramp, not one burst of SYNs
        await asyncio.gather(*tasks)

    asyncio.run(main())
    print(json.dumps({"closed": len(held), "longest_s": max(held, default=0.0)}))


def run(args: argparse.Namespace) -> dict[str, object]:
    server_core, load_core = cores()
    log = Path(args.out) / "slow-heads-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {"CONVSERVE_MODELS": args.models, "CONVSERVE_GRPC_PORT": "0"}  # HTTP only
    spec = Server("convserve", [PY, "-m", "bentoml", "serve", SERVICE, "--port", "{port}"],
                  "/readyz", env)  # fmt: skip
    proc, url = start(spec, log, prefix=server_core)
    host, port = url.removeprefix("http://").split(":")
    try:
        processes = -(-args.connections // per_process())
        attackers = [
            subprocess.Popen(
                [
                    *load_core,
                    PY,
                    "-m",
                    "convserve.loadtest.slow_heads",
                    "attack",
                    host,
                    port,
                    str(-(-args.connections // processes)),
                    str(args.every),
                    str(args.seconds),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for _ in range(processes)
        ]
        time.sleep(args.ramp)  # every attacker connected and sending
        statuses, latencies = [], []
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(args.normal):
                t0 = time.perf_counter()
                try:
                    statuses.append(http.get("/models").status_code)
                except httpx.HTTPError as exc:
                    statuses.append(type(exc).__name__)
                latencies.append(time.perf_counter() - t0)
        reports = [json.loads(a.communicate()[0]) for a in attackers]
    finally:
        stop(proc)
    latencies.sort()
    return {
        "connections": args.connections,
        "byte_every_s": args.every,
        "seconds": args.seconds,
        "heads_closed_by_the_server": sum(r["closed"] for r in reports),
        "longest_head_held_s": round(max(r["longest_s"] for r in reports), 1),
        "normal_requests": args.normal,
        "normal_answered_200": statuses.count(200),
        "normal_statuses": sorted({str(s) for s in statuses}),
        "normal_p50_ms": round(1e3 * latencies[len(latencies) // 2]),
        "normal_max_ms": round(1e3 * latencies[-1]),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["attack"]:
        host, port, n, every, seconds = argv[1:]
        attack(host, int(port), int(n), float(every), float(seconds))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=24_000)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between header bytes")
    parser.add_argument("--seconds", type=float, default=75.0, help="how long the attack lasts")
    parser.add_argument("--ramp", type=float, default=30.0, help="attack before normal requests")
    parser.add_argument("--normal", type=int, default=50)
    parser.add_argument("--models", default=DEFAULT_TAG)
    parser.add_argument("--out", default="build/slow-heads")
    args = parser.parse_args(argv)
    result = run(args)
    (Path(args.out) / "slow-heads.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
