"""The plots of a benchmark run (loadtest/bench.py's `Run`); the summary's tables and verdicts
are `report.py`'s."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from convserve.loadtest import report_phone
from convserve.loadtest.report import SHAPES, batched
from convserve.loadtest.scenarios import SINGLE

if TYPE_CHECKING:
    from convserve.loadtest.bench import Result, Run


def plot(run: Run, out: Path) -> None:
    plot_phone(run, out)
    plot_batching(run.results, out)
    single = [r for r in run.results if r.scenario in SHAPES]
    if not single:
        return
    _against_users(
        single,
        "requests_per_s",
        "requests/s",
        "linear",
        "LeNet-5, one PNG per request: throughput",
        out / "throughput_vs_users.png",
    )
    _against_users(
        single,
        "cpu_us_per_request",
        "server CPU µs per request",
        "log",
        "LeNet-5, one PNG per request: server CPU per request",
        out / "cpu_per_request_vs_users.png",
    )
    _against_users(
        single,
        "p99_ms",
        "p99 latency (ms)",
        "log",
        "LeNet-5, one PNG per request: p99 latency",
        out / "p99_vs_users.png",
    )
    _latency_vs_throughput([r for r in single if r.scenario == SINGLE], out)


def _against_users(
    rows: list[Result], field: str, ylabel: str, yscale: str, title: str, path: Path
) -> None:
    """One line per (scenario, server): `field` against concurrent users (log scale)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    keys = sorted({(r.scenario, r.server) for r in rows}, key=lambda k: (k[1] != "convserve", k))
    for scenario, server in keys:
        line = sorted(
            (r for r in rows if (r.scenario, r.server) == (scenario, server)), key=lambda r: r.users
        )
        if len(line) < 2:
            continue
        label = server if scenario == SINGLE else f"{server} ({scenario.split(', ')[-1]})"
        style = "o-" if server.startswith("convserve") else "o--"
        ax.plot([r.users for r in line], [getattr(r, field) for r in line], style, label=label)
    ax.set(xlabel="concurrent users", ylabel=ylabel, xscale="log", yscale=yscale, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _latency_vs_throughput(rows: list[Result], out: Path) -> None:
    """p50, p95 and p99 against requests/s, one line per server (multipart uploads)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, pct in zip(axes, ("p50_ms", "p95_ms", "p99_ms"), strict=True):
        for name in sorted({r.server for r in rows}, key=lambda n: (n != "convserve", n)):
            line = sorted((r for r in rows if r.server == name), key=lambda r: r.users)
            ax.plot(
                [r.requests_per_s for r in line], [getattr(r, pct) for r in line], "o-", label=name
            )
        ax.set(
            xlabel="requests/s",
            ylabel=f"{pct[:3]} latency (ms)",
            yscale="log",
            title=f"{pct[:3]} latency against throughput",
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_throughput.png", dpi=120)
    plt.close(fig)


def plot_batching(results: list[Result], out: Path) -> bool:
    """From convserve's own /metrics: the batch-size distribution and the queue-wait CDF of
    each run (is batching happening, and what does it cost in waiting?)."""
    runs = batched(results)
    if not runs:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in runs:
        assert r.batching is not None
        label = f"{r.scenario}, {r.server}, {r.users} u"
        cum = [(float(le) if le != "+Inf" else None, c) for le, c in r.batching["batch_cumulative"]]
        bounds = [le for le, _ in cum if le is not None]
        counts = [c for le, c in cum if le is not None]
        per_bucket = [b - a for a, b in zip([0.0, *counts[:-1]], counts, strict=True)]
        total = r.batching["batch_count"]
        left.plot(bounds, [c / total for c in per_bucket], "o-", label=label)
        wait = [(float(le), c) for le, c in r.batching["wait_cumulative"] if le != "+Inf"]
        waited = r.batching["wait_count"]
        if wait and waited:
            right.step(
                [1e3 * le for le, _ in wait],
                [c / waited for _, c in wait],
                where="post",
                label=label,
            )
    left.set(
        xscale="log",
        xlabel="images per ONNX Runtime call (bucket upper bound)",
        ylabel="fraction of batches",
        title="Batch sizes",
    )
    right.set(
        xscale="log",
        xlabel="queue wait (ms, bucket upper bound)",
        ylabel="fraction of requests waiting at most this",
        title="Queue wait (CDF)",
        ylim=(0, 1.02),
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "batching.png", dpi=120)
    plt.close(fig)
    return True


def _colour(label: str) -> str:
    if label.startswith("convserve"):
        return "tab:blue"
    return "tab:green" if label.startswith("in-process") else "tab:gray"


def plot_phone(run: Run, out: Path) -> None:
    """Server CPU per photo, each server and request shape, beside the in-process limits."""
    rows, limit = report_phone.rows(run), report_phone.in_process_limit(run)
    if not rows:
        return
    bars = [
        (
            f"{r.server}\n({r.images_per_s / r.requests_per_s:.0f}/request)",
            report_phone.ms_per_image(r),
        )
        for r in rows
        if r.requests_per_s > 0
    ]
    if limit:
        ways = report_phone.LIMIT_WAYS
        bars += [(f"in-process\n{way}", limit[f"{way}_ms_per_photo"]) for way in ways]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colours = [_colour(label) for label, _ in bars]
    ax.bar(range(len(bars)), [b[1] for b in bars], color=colours)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set(ylabel="server CPU ms per photo", title="12 MP phone JPEGs, EfficientNet-Lite0")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "phone_cpu_per_photo.png", dpi=120)
    plt.close(fig)
