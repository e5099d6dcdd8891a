"""The Markdown summary of a benchmark run (loadtest/bench.py's `Run`): tables and verdicts.
The plots are `plots.py`'s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from convserve.loadtest import report_phone
from convserve.loadtest.scenarios import (
    AHEAD_AT,
    GOALS,
    RESNET_MULTI,
    SINGLE,
    SINGLE_OIP,
    SINGLE_RAW,
    goal_row,
)

if TYPE_CHECKING:
    from convserve.loadtest.bench import Result, Run

SHAPES = (SINGLE, SINGLE_RAW, SINGLE_OIP)  # one PNG per request, three ways of sending it


def batched(results: list[Result]) -> list[Result]:
    return [r for r in results if r.batching and r.batching.get("batch_count")]


def batching_table(results: list[Result]) -> list[str]:
    lines = [
        "| scenario | server | users | batches | mean images per batch | batch p50 / p99 "
        "(bucket) | queue wait p50 / p99 (bucket) |",
        "|---|---|---|---|---|---|---|",
    ]

    def ms(v: float | None) -> str:
        return "–" if v is None else f"≤ {1e3 * v:g} ms"

    def n(v: float | None) -> str:
        return "–" if v is None else f"≤ {v:g}"

    for r in batched(results):
        b = r.batching
        assert b is not None
        lines.append(
            f"| {r.scenario} | {r.server} | {r.users} | {b['batch_count']:,.0f} | "
            f"{b['batch_mean']:.1f} | {n(b['batch_p50'])} / {n(b['batch_p99'])} | "
            f"{ms(b['wait_p50'])} / {ms(b['wait_p99'])} |"
        )
    return lines


def _work_per_cpu(run: Run, users: int, factor: float) -> str:
    """Requests per server-CPU-second, convserve ÷ the lean FastAPI peer, on one request shape."""
    ours, lean = run.find(SINGLE, "convserve", users), run.find(SINGLE, "fastapi-lean", users)
    name = f"requests per server-CPU-second vs fastapi-lean, {users} users"
    if not (ours and lean and ours.cpu_us_per_request):
        return goal_row(name, f"≥ {factor:g}×", "–", None)
    ratio = lean.cpu_us_per_request / ours.cpu_us_per_request
    value = (
        f"{1e6 / ours.cpu_us_per_request:,.0f} ÷ {1e6 / lean.cpu_us_per_request:,.0f} "
        f"= {ratio:.2f}× ({ours.cpu_us_per_request:.0f} vs {lean.cpu_us_per_request:.0f} "
        "µs per request)"
    )
    return goal_row(name, f"≥ {factor:g}×", value, ratio >= factor)


def _ahead(run: Run, users: int) -> str:
    """convserve's req/s against every peer's at `users`, each on the peer's own request shape."""
    margins = []
    for r in run.results:
        if r.users != users or r.scenario not in SHAPES or r.server.startswith("convserve"):
            continue
        ours = run.find(r.scenario, "convserve", users)
        if ours:
            margins.append((ours.requests_per_s / max(r.requests_per_s, 1e-9), r, ours))
    name = f"ahead of every peer, {users} users (req/s, same request shape)"
    if not margins:
        return goal_row(name, "> 1× each", "–", None)
    ratio, peer, ours = min(margins, key=lambda m: m[0])
    value = (
        f"closest: {peer.server} ({peer.shape}) {peer.requests_per_s:,.0f} vs "
        f"{ours.requests_per_s:,.0f} req/s = {ratio:.2f}×; {len(margins)} peers"
    )
    return goal_row(name, "> 1× each", value, ratio > 1.0)


def goals(run: Run) -> list[str]:
    lines = ["| goal | target | measured | |", "|---|---|---|---|"]
    lines.append(_work_per_cpu(run, 64, GOALS["work_per_cpu_vs_lean_64"]))
    lines.append(_work_per_cpu(run, 32, GOALS["work_per_cpu_vs_lean_32"]))
    ours, floor = run.find(SINGLE, "convserve", 64), run.find(SINGLE, "floor", 64)
    bound = GOALS["cpu_vs_floor_64"]
    if ours and floor and floor.cpu_us_per_request:
        ratio = ours.cpu_us_per_request / floor.cpu_us_per_request
        lines.append(
            goal_row(
                "server CPU per request vs the floor, 64 users",
                f"≤ {bound:g}×",
                f"{ours.cpu_us_per_request:.0f} ÷ {floor.cpu_us_per_request:.0f} µs = {ratio:.2f}×",
                ratio <= bound,
            )
        )
    else:
        lines.append(
            goal_row("server CPU per request vs the floor, 64 users", f"≤ {bound:g}×", "–", None)
        )
    for users in AHEAD_AT:
        lines.append(_ahead(run, users))
    if ours:
        bound = GOALS["p99_over_p50_64"]
        lines.append(
            goal_row(
                "p99 at 64 users",
                f"≤ {bound:g} × p50",
                f"{ours.p99_ms:.0f} ms vs {bound:g} × {ours.p50_ms:.0f} ms",
                ours.p99_ms <= bound * ours.p50_ms,
            )
        )
    served = max((r.images_per_s for r in run.results if r.scenario == RESNET_MULTI), default=None)
    limit = max(
        (b["images_per_s"] for b in run.limits.get("resnet20", {}).get("batches", [])), default=None
    )
    bound = GOALS["resnet_served_over_limit"]
    if served and limit:
        lines.append(
            goal_row(
                "ResNet-20, 32 images per request: served ÷ in-process",
                f"≥ {bound:g}",
                f"{served:,.0f} ÷ {limit:,.0f} images/s = {served / limit:.2f}",
                served / limit >= bound,
            )
        )
    below = [r for r in run.results if r.server.startswith("convserve") and r.users < 64]
    failures = sum(r.failures for r in below)
    lines.append(
        goal_row(
            "errors below saturation (convserve, < 64 users)",
            "0",
            f"{failures} of {sum(r.requests for r in below)} requests",
            failures == 0 if below else None,
        )
    )
    return lines


def _has_headline(run: Run) -> bool:
    """The run measured the one-PNG scenarios the main goals are about (not `--only` others)."""
    return any(r.scenario in SHAPES for r in run.results) or run.quick


def cpu_table(run: Run) -> list[str]:
    """Server CPU per request and req/s, one PNG per request, by server and users; * marks a
    run whose server cores were not saturated."""
    rows = [r for r in run.results if r.scenario in SHAPES]
    users = sorted({r.users for r in rows})
    lines = [
        "| server | request shape | " + " | ".join(f"{u} users" for u in users) + " |",
        "|---|---" + "|---" * len(users) + "|",
    ]
    keys = sorted({(r.server, r.scenario) for r in rows}, key=lambda k: (k[1], k[0] != "convserve"))
    for server, scenario in keys:
        cells = []
        for u in users:
            r = run.find(scenario, server, u)
            cells.append(
                "–"
                if r is None
                else f"{r.cpu_us_per_request:,.0f} µs, "
                f"{r.requests_per_s:,.0f}/s{'' if r.saturated else ' *'}"
            )
        shape = next(r.shape for r in rows if r.server == server and r.scenario == scenario)
        lines.append(f"| {server} | {shape} | " + " | ".join(cells) + " |")
    return lines


def _served_vs_limit(run: Run) -> list[str]:
    """Each compared scenario's served images/s against its model in-process, side by side:
    against one request end to end (decode, infer, answer: no HTTP), or the model alone at its
    best batch."""
    # (the phone photos have their own section: loadtest/report_phone.py)
    compared = {sc.name: sc for sc in run.scenarios if sc.against in ("one", "batch")}
    rows = [
        r
        for r in run.results
        if r.scenario in compared and compared[r.scenario].model in run.limits
    ]
    if not rows:
        return []
    lines = [
        "| scenario | users | served images/s | in-process images/s | ratio | mean batch |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        scenario = compared[r.scenario]
        limit = run.limits[scenario.model]
        if scenario.against == "batch":
            reference = max(b["images_per_s"] for b in limit["batches"])
            what = "best batch"
        else:
            reference = limit["single_image_with_decode"]["requests_per_s"]
            reference *= scenario.images_per_request
            what = "one request end to end, one at a time"
        mean = r.batching.get("batch_mean") if r.batching else None
        lines.append(
            f"| {r.scenario} | {r.users} | {r.images_per_s:,.1f} | {reference:,.1f} "
            f"({what}) | {r.images_per_s / reference:.2f} | "
            f"{'–' if mean is None else f'{mean:.1f}'} |"
        )
    return lines


def summary(run: Run) -> str:
    m = run.machine
    lines = [
        "# Benchmark run" + (" (quick mode: a smoke test, not a measurement)" if run.quick else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, "
        f"ONNX Runtime {m['onnxruntime']}. Each run: {run.seconds} s of headless Locust, closed "
        "loop (users send back to back), every response checked.",
        "",
        f"Pinning: server `{' '.join(run.server_prefix) or 'none'}`, load generator "
        f"`{' '.join(run.load_prefix) or 'none'}`; the in-process limit runs on the server's "
        "cores with the server's threads.",
        "",
        "## Servers",
        "",
        "| server | how it is tuned |",
        "|---|---|",
        *(
            f"| {s.name} | {s.how} |"
            for s in run.servers.values()
            if any(sc.server == s.name for sc in run.scenarios)
        ),
        "",
        *(
            [
                "## What did not run",
                "",
                *(f"- **{name}**: {why}" for name, why in run.unavailable.items()),
                "",
            ]
            if run.unavailable
            else []
        ),
        *(["## Goals", "", *goals(run), ""] if _has_headline(run) else []),
        *(
            [
                f"One user, sequential, keep-alive ({run.probe['requests']} requests, "
                f"`loadtest/probe.py`): p50 {run.probe['p50_ms']:.2f} ms, "
                f"p99 {run.probe['p99_ms']:.2f} ms.",
                "",
            ]
            if run.probe
            else []
        ),
        *report_phone.section(run),
        "## Server CPU per request, and requests/s",
        "",
        "The server's process tree, CPU seconds over the run ÷ requests completed; `*`: the "
        "server's core was not saturated (under 90 % busy), so the load generator, not the "
        "server, set the pace.",
        "",
        *cpu_table(run),
        "",
        "## Results",
        "",
        "| scenario | server | users | requests | failures | req/s | images/s | p50 ms | "
        "p95 ms | p99 ms | server CPU % | µs/request | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r.scenario} | {r.server} | {r.users} | {r.requests} | {r.failures} | "
            f"{r.requests_per_s:.0f} | {r.images_per_s:.0f} | {r.p50_ms:.0f} | {r.p95_ms:.0f} | "
            f"{r.p99_ms:.0f} | {r.cpu_percent:.0f} | {r.cpu_us_per_request:.0f} | "
            f"{r.peak_rss_mb:.0f} |"
            for r in run.results
        ),
        "",
        *(
            [
                "## Served against in-process (EfficientNet-Lite0 on photos, and the tasks)",
                "",
                *_served_vs_limit(run),
                "",
            ]
            if _served_vs_limit(run)
            else []
        ),
        *(
            [
                "## Batching (from convserve's own /metrics)",
                "",
                "Scraped before and after each convserve run and subtracted: how many images "
                "each ONNX Runtime call took, and how long requests waited in the batcher.",
                "",
                *batching_table(run.results),
                "",
                "![batching](batching.png)",
                "",
            ]
            if batched(run.results)
            else []
        ),
        "## In-process limit (ONNX Runtime, no HTTP)",
        "",
        "| model | batch | p50 ms per batch | images/s |",
        "|---|---|---|---|",
        *(
            f"| {model} | {b['batch']} | {b['p50_ms']:.2f} | {b['images_per_s']:.0f} |"
            for model, lim in run.limits.items()
            for b in lim["batches"]
        ),
        "",
        *(
            f"{model} ({lim.get('task', 'classify')}): one request ({lim.get('images', 'PNG')})"
            " end to end in-process: p50 {lim['single_image_with_decode']['p50_ms']:.2f} ms "
            f"({lim['single_image_with_decode']['requests_per_s']:.0f} per second)."
            for model, lim in run.limits.items()
        ),
        "",
        *(
            [
                "![throughput](throughput_vs_users.png)",
                "",
                "![server CPU per request](cpu_per_request_vs_users.png)",
                "",
                "![p99](p99_vs_users.png)",
                "",
            ]
            if any(r.scenario in SHAPES for r in run.results)
            else []
        ),
    ]
    return "\n".join(lines)
