"""What the server's own /metrics say happened during a run: the batch-size and queue-wait
histograms, scraped before and after and subtracted (summed over models and versions)."""

from __future__ import annotations

import math
import re

import httpx

BATCH = "convserve_batch_size_images"
WAIT = "convserve_queue_wait_seconds"
_BUCKET = re.compile(r'^(\w+)_bucket\{(?:[^}]*,)?le="([^"]+)"[^}]*\} ([0-9.e+-]+)$')
_TOTAL = re.compile(r"^(\w+)_(sum|count)(?:\{[^}]*\})? ([0-9.e+-]+)$")


def scrape(url: str) -> dict[str, dict]:
    """{histogram: {"buckets": {le: cumulative count}, "sum": s, "count": n}} for the two
    histograms, every label set added up."""
    out = {name: {"buckets": {}, "sum": 0.0, "count": 0.0} for name in (BATCH, WAIT)}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if m := _BUCKET.match(line):
            if m.group(1) in out:
                le = math.inf if m.group(2) == "+Inf" else float(m.group(2))
                buckets = out[m.group(1)]["buckets"]
                buckets[le] = buckets.get(le, 0.0) + float(m.group(3))
        elif (m := _TOTAL.match(line)) and m.group(1) in out:
            out[m.group(1)][m.group(2)] += float(m.group(3))
    return out


def _quantile(cumulative: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q (Prometheus' rule, no interpolation)."""
    if not cumulative or cumulative[-1][1] == 0:
        return None
    target = q * cumulative[-1][1]
    found = next(le for le, count in cumulative if count >= target)
    return found if math.isfinite(found) else None  # past the last bound: unknown


def batching(before: dict, after: dict) -> dict:
    """Per run: batches, mean images per batch, the batch-size distribution (batches per
    bucket) and queue-wait percentiles (ms, bucket upper bounds)."""
    result: dict = {}
    for name, key in ((BATCH, "batch"), (WAIT, "wait")):
        b, a = before[name], after[name]
        cumulative = sorted(
            (le, a["buckets"][le] - b["buckets"].get(le, 0.0)) for le in a["buckets"]
        )
        count = a["count"] - b["count"]
        result[f"{key}_count"] = count
        result[f"{key}_mean"] = (a["sum"] - b["sum"]) / count if count else None
        result[f"{key}_cumulative"] = [
            [le if math.isfinite(le) else "+Inf", c] for le, c in cumulative
        ]
        result[f"{key}_p50"] = _quantile(cumulative, 0.5)
        result[f"{key}_p99"] = _quantile(cumulative, 0.99)
    return result
