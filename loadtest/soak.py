"""Soak: hours-of-service behaviour in minutes. Does memory creep, do errors appear, does
latency drift, at a load the server can sustain?

    python -m convserve.loadtest.soak --minutes 20 --out docs/soak     (make soak)

1. Start `bentoml serve` for --model (the server pinned to one core, Locust to the other, as
   in the benchmark), or use a running server (--url).
2. Capacity: a closed-loop Locust run of the soak mix for --capacity-s seconds.
3. Soak: Locust's SoakUser (multipart and raw PNGs, .npy tensors, OIP binary, GET /models,
   ~5 % bad inputs that must get their documented 4xx) at --load (default 80 %) of that
   capacity, open loop, for --minutes. The server's RSS (process tree) is sampled every
   --sample-s seconds.
4. Report: RSS slope after warm-up (least squares, MB/min), 5xx counted by the server's own
   /metrics, Locust's failures, and latency per endpoint; summary.json, soak.md, rss.png.

Targets: RSS slope under 1 MB/min after warm-up, zero 5xx, zero failures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from convserve.defaults import DEFAULT_TAG, SERVICE
from convserve.loadtest.bench import LOCUSTFILE
from convserve.loadtest.processes import PY, ROOT, Server, cores, start, stop, tree_rss

SLOPE_GOAL_MB_PER_MIN = 1.0


def _statuses(url: str) -> dict[str, float]:
    """Requests by status class, from the server's own /metrics."""
    totals: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("convserve_requests_total{"):
            status = re.search(r'status="(\d)', line)
            if status:
                key = f"{status.group(1)}xx"
                totals[key] = totals.get(key, 0.0) + float(line.split()[-1])
    return totals


def _locust(url: str, users: int, rate: float, seconds: float, stem: Path, prefix: list[str],
            env: dict[str, str]) -> subprocess.Popen:  # fmt: skip
    cmd = [*prefix, PY, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "-u", str(users), "-r", str(users), "-t", f"{max(1, round(seconds))}s",
           "--csv", str(stem), "--only-summary", "--stop-timeout", "10", "SoakUser"]  # fmt: skip
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **env, "CONVSERVE_LOCUST_RATE": str(rate)},
        stdout=subprocess.DEVNULL,
        stderr=stem.with_suffix(".log").open("wb"),
    )


def _stats(stem: Path) -> dict[str, dict]:
    with open(f"{stem}_stats.csv") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def slope_mb_per_min(samples: list[tuple[float, int]], warmup_s: float) -> float:
    """Least-squares slope of RSS over time after warm-up, in MB per minute."""
    after = [(t, rss) for t, rss in samples if t >= warmup_s]
    if len(after) < 3:
        return float("nan")
    t = np.array([s[0] for s in after]) / 60.0
    mb = np.array([s[1] for s in after]) / 1e6
    return float(np.polyfit(t, mb, 1)[0])


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server_prefix, load_prefix = cores()
    env = {"CONVSERVE_LOCUST_V2_MODEL": args.model.split(":")[0]}
    proc = None
    if args.url:
        url = args.url.rstrip("/")
        pid = args.pid
    else:
        server = Server(
            "convserve",
            [PY, "-m", "bentoml", "serve", SERVICE, "--port", "{port}"],
            "/readyz",
            {"CONVSERVE_MODELS": args.model, "CONVSERVE_DRAIN_S": "0", "CONVSERVE_GRPC_PORT": "0"},
        )
        proc, url = start(server, out / "server.log", prefix=server_prefix, cwd=out)
        pid = proc.pid
    try:
        print(f"soak: capacity of the mix, closed loop, {args.users} users, {args.capacity_s:g} s",
              flush=True)  # fmt: skip
        cap = _locust(url, args.users, 1000.0, args.capacity_s, out / "capacity", load_prefix, env)
        cap.wait()
        capacity = float(_stats(out / "capacity")["Aggregated"]["Requests/s"])
        rate = args.load * capacity / args.users
        offered = args.load * capacity
        print(f"soak: capacity {capacity:,.0f} req/s; soaking at {args.load:.0%} = "
              f"{offered:,.0f} req/s for {args.minutes:g} min", flush=True)  # fmt: skip
        before = _statuses(url)
        seconds = args.minutes * 60
        loader = _locust(url, args.users, rate, seconds, out / "soak", load_prefix, env)
        started = time.monotonic()
        samples: list[tuple[float, int]] = []
        next_report = started + args.report_s
        while loader.poll() is None:
            now = time.monotonic()
            if pid:
                samples.append((now - started, tree_rss(pid)))
            if now >= next_report:
                elapsed = now - started
                left = max(0.0, seconds - elapsed)
                print(f"soak: {elapsed / 60:5.1f}/{args.minutes:g} min, RSS "
                      f"{samples[-1][1] / 2**20 if samples else 0:,.0f} MiB, "
                      f"ETA {left / 60:.1f} min", flush=True)  # fmt: skip
                next_report += args.report_s
            time.sleep(args.sample_s)
        after = _statuses(url)
    finally:
        if proc is not None:
            stop(proc)
    stats = _stats(out / "soak")
    warmup = min(args.warmup_s, seconds / 4)
    summary = {
        "minutes": args.minutes,
        "capacity_rps": capacity,
        "offered_rps": args.load * capacity,
        "achieved_rps": float(stats["Aggregated"]["Requests/s"]),
        "requests": int(stats["Aggregated"]["Request Count"]),
        "failures": int(stats["Aggregated"]["Failure Count"]),
        "server_statuses": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after},
        "rss_start_mib": samples[0][1] / 2**20 if samples else None,
        "rss_end_mib": samples[-1][1] / 2**20 if samples else None,
        "rss_slope_mb_per_min": slope_mb_per_min(samples, warmup),
        "warmup_s": warmup,
        "endpoints": {
            name: {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "p50_ms": float(row["50%"] or 0),
                "p99_ms": float(row["99%"] or 0),
            }
            for name, row in stats.items()
            if name != "Aggregated"
        },
    }
    fives = summary["server_statuses"].get("5xx", 0.0)
    slope = summary["rss_slope_mb_per_min"]
    summary["goals_met"] = {
        "rss_slope_under_1_mb_per_min": bool(slope < SLOPE_GOAL_MB_PER_MIN),
        "zero_5xx": fives == 0,
        "zero_failures": summary["failures"] == 0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "rss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("seconds", "rss_bytes"), *samples])
    _plot(samples, warmup, slope, out / "rss.png")
    (out / "soak.md").write_text(_markdown(summary))
    print(_markdown(summary), flush=True)
    return summary


def _plot(samples: list[tuple[float, int]], warmup: float, slope: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return
    t = np.array([s[0] for s in samples]) / 60
    mib = np.array([s[1] for s in samples]) / 2**20
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(t, mib, lw=1, label="server RSS (process tree)")
    ax.axvline(warmup / 60, color="grey", ls=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.set_title(f"Soak: RSS slope after warm-up {slope:+.3f} MB/min (goal < 1)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(s: dict) -> str:
    statuses = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(s["server_statuses"].items()))
    lines = [
        f"Soak of {s['minutes']:g} min at {s['offered_rps']:,.0f} req/s offered "
        f"({s['offered_rps'] / s['capacity_rps']:.0%} of the mix's {s['capacity_rps']:,.0f} "
        f"req/s capacity); {s['achieved_rps']:,.0f} req/s achieved.",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
        f"| RSS slope after {s['warmup_s']:.0f} s warm-up | "
        f"{s['rss_slope_mb_per_min']:+.3f} MB/min | < 1 MB/min |",
        f"| RSS start / end | {s['rss_start_mib']:,.0f} / {s['rss_end_mib']:,.0f} MiB | |",
        f"| requests (server's count by status) | {statuses} | no 5xx |",
        f"| Locust failures (wrong answer, wrong error) | {s['failures']} | 0 |",
        "",
        "| endpoint | requests | failures | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, e in sorted(s["endpoints"].items()):
        lines.append(
            f"| {name} | {e['requests']:,} | {e['failures']} | {e['p50_ms']:.0f} | "
            f"{e['p99_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--out", default="docs/soak")
    parser.add_argument("--model", default=DEFAULT_TAG, help="model store tag")
    parser.add_argument("--url", help="soak a running server instead of starting one")
    parser.add_argument("--pid", type=int, help="its process id, to sample RSS (with --url)")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of capacity")
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=120.0)
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--report-s", type=float, default=60.0, help="progress line interval")
    summary = run(parser.parse_args(argv))
    return 0 if all(summary["goals_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
