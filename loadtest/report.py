"""Plots and the Markdown summary of a benchmark run (loadtest/bench.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SINGLE = "lenet5 single image"
MULTI = "lenet5 32 images per request"
RESNET_MULTI = "resnet20 32 images per request"


def _against_users(
    single: list, names: list[str], field: str, ylabel: str, yscale: str, title: str, path: Path
) -> None:
    """One line per server: `field` against concurrent users (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        rows = sorted((r for r in single if r.server == name), key=lambda r: r.users)
        ax.plot([r.users for r in rows], [getattr(r, field) for r in rows], "o-", label=name)
    ax.set(xlabel="concurrent users", ylabel=ylabel, xscale="log", yscale=yscale, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(results: list, out: Path) -> None:
    single = [r for r in results if r.scenario == SINGLE]
    names = sorted({r.server for r in single})
    _against_users(
        single,
        names,
        "requests_per_s",
        "requests/s",
        "linear",
        "LeNet-5, one image per request: throughput",
        out / "throughput_vs_users.png",
    )

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=False)
    for ax, pct in zip(axes, ("p50_ms", "p95_ms", "p99_ms"), strict=True):
        for name in names:
            rows = sorted((r for r in single if r.server == name), key=lambda r: r.users)
            ax.plot(
                [r.requests_per_s for r in rows], [getattr(r, pct) for r in rows], "o-", label=name
            )
        ax.set(
            xlabel="requests/s",
            ylabel=f"{pct[:3]} latency (ms)",
            yscale="log",
            title=f"{pct[:3]} latency against throughput",
        )
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_throughput.png", dpi=120)
    plt.close(fig)

    plot_batching(results, out)
    _against_users(
        single,
        names,
        "p99_ms",
        "p99 latency (ms)",
        "log",
        "LeNet-5, one image per request: p99 latency",
        out / "p99_vs_users.png",
    )


def _batched(results: list) -> list:
    return [r for r in results if r.batching and r.batching.get("batch_count")]


def plot_batching(results: list, out: Path) -> bool:
    """From convserve's own /metrics: the batch-size distribution and the queue-wait CDF of
    each run (is batching happening, and what does it cost in waiting?)."""
    runs = _batched(results)
    if not runs:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in runs:
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
            fractions = [c / waited for _, c in wait]
            right.step([1e3 * le for le, _ in wait], fractions, where="post", label=label)
    left.set(xscale="log", xlabel="images per ONNX Runtime call (bucket upper bound)",
             ylabel="fraction of batches", title="Batch sizes")  # fmt: skip
    right.set(xscale="log", xlabel="queue wait (ms, bucket upper bound)",
              ylabel="fraction of requests waiting at most this", title="Queue wait (CDF)",
              ylim=(0, 1.02))  # fmt: skip
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "batching.png", dpi=120)
    plt.close(fig)
    return True


def batching_table(results: list) -> list[str]:
    lines = [
        "| scenario | server | users | batches | mean images per batch | batch p50 / p99 "
        "(bucket) | queue wait p50 / p99 (bucket) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _batched(results):
        b = r.batching

        def ms(v):  # noqa: ANN001, ANN202
            return "–" if v is None else f"≤ {1e3 * v:g} ms"

        def n(v):  # noqa: ANN001, ANN202
            return "–" if v is None else f"≤ {v:g}"

        lines.append(f"| {r.scenario} | {r.server} | {r.users} | {b['batch_count']:,.0f} | "
                     f"{b['batch_mean']:.1f} | {n(b['batch_p50'])} / {n(b['batch_p99'])} | "
                     f"{ms(b['wait_p50'])} / {ms(b['wait_p99'])} |")  # fmt: skip
    return lines


def _find(results: list, scenario: str, server: str, users: int):  # noqa: ANN202
    return next(
        (r for r in results if r.scenario == scenario and r.server == server and r.users == users),
        None,
    )


def _goal(name: str, target: str, value: str, met: bool | None) -> str:
    verdict = "not measured" if met is None else ("met" if met else "**missed**")
    return f"| {name} | {target} | {value} | {verdict} |"


def _ratio_goal(results: list, users: int, peer: str, factor: float) -> str:
    ours, theirs = _find(results, SINGLE, "convserve", users), _find(results, SINGLE, peer, users)
    name = f"LeNet-5 single-image req/s, {users} users"
    if not (ours and theirs and theirs.requests_per_s):
        return _goal(name, f"≥ {factor:g}× {peer}", "–", None)
    ratio = ours.requests_per_s / theirs.requests_per_s
    value = f"{ours.requests_per_s:.0f} ÷ {theirs.requests_per_s:.0f} = {ratio:.2f}×"
    return _goal(name, f"≥ {factor:g}× {peer}", value, ratio >= factor)


def goals(results: list, limits: dict, probe: dict | None = None) -> list[str]:
    lines = ["| goal | target | measured | |", "|---|---|---|---|"]
    for users in (32, 64):
        for peer, factor in (("fastapi-ort", 1.5), ("fastapi-torch", 2.0), ("litserve-ort", 1.5)):
            lines.append(_ratio_goal(results, users, peer, factor))
    ours = _find(results, SINGLE, "convserve", 64)
    if ours:
        ok = ours.p99_ms <= 3 * ours.p50_ms
        lines.append(_goal("p99 at 64 users", "≤ 3 × p50",
                           f"{ours.p99_ms:.0f} ms vs 3 × {ours.p50_ms:.0f} ms", ok))  # fmt: skip
        peers = [
            r for r in results
            if r.scenario == SINGLE and r.users == 64 and not r.server.startswith("convserve")
        ]  # fmt: skip
        if peers:
            best = min(peers, key=lambda r: r.p99_ms)
            lines.append(_goal("p99 at 64 users", "≤ every peer's p99",
                               f"{ours.p99_ms:.0f} ms vs {best.server} {best.p99_ms:.0f} ms",
                               ours.p99_ms <= best.p99_ms))  # fmt: skip
    single = limits.get("lenet5", {}).get("single_image_with_decode")
    if probe and single:
        bound = single["p50_ms"] + 0.5
        lines.append(_goal("p50 at 1 user (sequential probe, keep-alive)",
                           "≤ in-process decode + classify + 0.5 ms",
                           f"{probe['p50_ms']:.2f} ms vs {single['p50_ms']:.2f} + 0.5 ms",
                           probe["p50_ms"] <= bound))  # fmt: skip
    multi = [r for r in results if r.scenario == MULTI and r.server == "convserve"]
    if multi:
        best = max(r.images_per_s for r in multi)
        lines.append(_goal("LeNet-5, 32 images per request", "≥ 15,000 images/s",
                           f"{best:,.0f} images/s", best >= 15_000))  # fmt: skip
    served = max((r.images_per_s for r in results if r.scenario == RESNET_MULTI), default=None)
    limit = max((b["images_per_s"] for b in limits.get("resnet20", {}).get("batches", [])),
                default=None)  # fmt: skip
    if served and limit:
        ratio = served / limit
        lines.append(_goal("ResNet-20, 32 images per request: served ÷ in-process", "≥ 0.90",
                           f"{served:,.0f} ÷ {limit:,.0f} images/s = {ratio:.2f}",
                           ratio >= 0.90))  # fmt: skip
    below = [r for r in results if r.server.startswith("convserve") and r.users < 64]
    failures = sum(r.failures for r in below)
    lines.append(
        _goal(
            "errors below saturation (convserve, < 64 users)",
            "0",
            f"{failures} of {sum(r.requests for r in below)} requests",
            failures == 0 if below else None,
        )
    )
    return lines


def cpu_table(results: list) -> list[str]:
    """Server CPU per request, LeNet-5 single image, by server and users."""
    single = [r for r in results if r.scenario == SINGLE]
    users = sorted({r.users for r in single})
    lines = ["| server | " + " | ".join(f"{u} users" for u in users) + " |",
             "|---" * (len(users) + 1) + "|"]  # fmt: skip
    for name in sorted({r.server for r in single}):
        cells = [_find(results, SINGLE, name, u) for u in users]
        lines.append(f"| {name} | " + " | ".join(
            f"{c.cpu_us_per_request:.0f} µs" if c else "–" for c in cells) + " |")  # fmt: skip
    return lines


def summary(
    results, limits, table, scenarios, seconds, server_prefix, load_prefix, quick, m, probe=None
) -> str:  # noqa: ANN001, PLR0913
    """`m`: the machine the run was on (cpu, cores, memory_gb, python, onnxruntime); `probe`:
    the sequential one-user latency probe of convserve (loadtest/probe.py), if it ran."""
    lines = [
        "# Benchmark run" + (" (quick mode: a smoke test, not a measurement)" if quick else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, "
        f"ONNX Runtime {m['onnxruntime']}. Each run: {seconds} s of headless Locust, closed "
        "loop (users send back to back), every response checked.",
        "",
        f"Pinning: server `{' '.join(server_prefix) or 'none'}`, load generator "
        f"`{' '.join(load_prefix) or 'none'}`; the in-process limit runs on the server's cores "
        "with the server's threads.",
        "",
        "## Servers",
        "",
        "| server | how it is tuned |",
        "|---|---|",
        *(
            f"| {s.name} | {s.how} |"
            for s in table.values()
            if any(sc.server == s.name for sc in scenarios)
        ),
        "",
        "## Goals",
        "",
        *goals(results, limits, probe),
        "",
        *(
            [
                f"One user, sequential, keep-alive ({probe['requests']} requests, "
                f"`loadtest/probe.py`): p50 {probe['p50_ms']:.2f} ms, "
                f"p99 {probe['p99_ms']:.2f} ms.",
                "",
            ]
            if probe
            else []
        ),
        "## Server CPU per request",
        "",
        "The server's process tree, CPU seconds over the run ÷ requests completed.",
        "",
        *cpu_table(results),
        "",
        "## Results",
        "",
        "| scenario | server | users | requests | failures | req/s | images/s | p50 ms | "
        "p95 ms | p99 ms | server CPU % | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r.scenario} | {r.server} | {r.users} | {r.requests} | {r.failures} | "
            f"{r.requests_per_s:.0f} | {r.images_per_s:.0f} | {r.p50_ms:.0f} | {r.p95_ms:.0f} | "
            f"{r.p99_ms:.0f} | {r.cpu_percent:.0f} | {r.peak_rss_mb:.0f} |"
            for r in results
        ),
        "",
        *(
            [
                "## Batching (from convserve's own /metrics)",
                "",
                "Scraped before and after each convserve run and subtracted: how many images "
                "each ONNX Runtime call took, and how long requests waited in the batcher.",
                "",
                *batching_table(results),
                "",
                "![batching](batching.png)",
                "",
            ]
            if _batched(results)
            else []
        ),
        "## In-process limit (ONNX Runtime, no HTTP)",
        "",
        "| model | batch | p50 ms per batch | images/s |",
        "|---|---|---|---|",
        *(
            f"| {model} | {b['batch']} | {b['p50_ms']:.2f} | {b['images_per_s']:.0f} |"
            for model, lim in limits.items()
            for b in lim["batches"]
        ),
        "",
        *(
            f"{model}: one PNG decoded, preprocessed and classified in-process: p50 "
            f"{lim['single_image_with_decode']['p50_ms']:.2f} ms "
            f"({lim['single_image_with_decode']['requests_per_s']:.0f} per second)."
            for model, lim in limits.items()
        ),
        "",
        "![throughput](throughput_vs_users.png)",
        "",
        "![latency](latency_vs_throughput.png)",
        "",
        "![p99](p99_vs_users.png)",
        "",
    ]
    return "\n".join(lines)
