"""The phone-photo part of a benchmark run's report: 12 MP JPEGs to EfficientNet-Lite0 on every
peer, against the in-process limit (loadtest/inprocess.py --phone), with its goals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from convserve.loadtest.scenarios import GOALS, PHONE, PHONE_ONE, goal_row

if TYPE_CHECKING:
    from convserve.loadtest.bench import Result, Run

LITE0 = "efficientnet-lite0"
LIMIT_WAYS = {
    "cheapest": "cheapest decode (DCT 1/8: at least the 256 px resize)",
    "recipe": "convserve's decode (DCT 1/4: twice the resize)",
    "full": "full decode",
}


def ms_per_image(r: Result) -> float:
    """Server CPU per image, in ms (its process tree over the run): per request, divided by
    the images a request carries (images/s over requests/s)."""
    return r.cpu_us_per_request / 1000 * r.requests_per_s / max(r.images_per_s, 1e-9)


def rows(run: Run) -> list[Result]:
    return [r for r in run.results if r.scenario in PHONE]


def in_process_limit(run: Run) -> dict | None:
    return run.limits.get(LITE0, {}).get("phone")


def goals(run: Run) -> list[str]:
    lines = ["| goal | target | measured | |", "|---|---|---|---|"]
    factor, bound = GOALS["phone_work_per_cpu_vs_lean"], GOALS["phone_cpu_vs_limit"]
    limit = in_process_limit(run)
    for scenario in PHONE:
        ours, lean = run.find(scenario, "convserve", 8), run.find(scenario, "fastapi-lean", 8)
        short = "one per request" if scenario == PHONE_ONE else "4 per request"
        name = f"photos per server-CPU-second vs fastapi-lean ({short}, 8 users)"
        if ours and lean and ours.cpu_us_per_request:
            a, b = ms_per_image(ours), ms_per_image(lean)
            value = f"{1000 / a:.1f} ÷ {1000 / b:.1f} = {b / a:.2f}× ({a:.1f} vs {b:.1f} ms)"
            lines.append(goal_row(name, f"≥ {factor:g}×", value, b / a >= factor))
        else:
            lines.append(goal_row(name, f"≥ {factor:g}×", "–", None))
        for way in ("cheapest", "recipe"):
            name = f"server CPU per photo vs in-process, {LIMIT_WAYS[way]} ({short})"
            if ours and limit:
                a, ref = ms_per_image(ours), limit[f"{way}_ms_per_photo"]
                value = f"{a:.1f} ÷ {ref:.1f} ms = {a / ref:.2f}×"
                lines.append(goal_row(name, f"≤ {bound:g}×", value, a / ref <= bound))
            else:
                lines.append(goal_row(name, f"≤ {bound:g}×", "–", None))
    ours, lean = run.answers.get("convserve"), run.answers.get("fastapi-lean")
    name = "the same top-1 as fastapi-lean on every photo"
    if ours and lean:
        same = sum(a == b for a, b in zip(ours, lean, strict=True))
        lines.append(goal_row(name, "all", f"{same} of {len(lean)}", same == len(lean)))
    else:
        lines.append(goal_row(name, "all", "–", None))
    return lines


def table(run: Run) -> list[str]:
    lines = [
        "| scenario | server | request shape | users | photos/s | server CPU ms per photo | "
        "p50 ms | p99 ms | failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(run):
        lines.append(
            f"| {r.scenario} | {r.server} | {r.shape} | {r.users} | {r.images_per_s:.1f} | "
            f"{ms_per_image(r):.1f}{'' if r.saturated else ' *'} | {r.p50_ms:.0f} | "
            f"{r.p99_ms:.0f} | {r.failures} |"
        )
    limit = in_process_limit(run)
    if limit:
        lines += [
            "",
            f"In-process on the server's core ({limit['threads']} thread, batch "
            f"{limit['batch']}, {limit['photos']} photos, CPU time): "
            + "; ".join(
                f"{what} + resize + crop + the model {limit[f'{way}_ms_per_photo']:.1f} ms"
                for way, what in LIMIT_WAYS.items()
            )
            + f"; the model alone {limit['model_ms_per_photo']:.1f} ms per photo.",
        ]
    return lines


def section(run: Run) -> list[str]:
    """The report's phone-photo section, or nothing when the run had none."""
    if not rows(run):
        return []
    return [
        "## Phone photos: 12 MP JPEGs to EfficientNet-Lite0",
        "",
        "scikit-image's six colour photos scaled to 4000 x 3000 with sensor grain, JPEG "
        "quality 90 (about 1.9 MB each, `convserve.models.data.phone_photos`), made for the "
        "run. Server CPU per photo: its process tree's CPU over the run ÷ photos answered; "
        "`*`: the server's core was not saturated.",
        "",
        *goals(run),
        "",
        *table(run),
        "",
        "![CPU per phone photo](phone_cpu_per_photo.png)",
        "",
    ]
