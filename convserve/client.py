"""`convserve classify`, `convserve detect` and `convserve verify`: send images to a running
server and print its answer.

    convserve classify shoe.png shirt.jpg --url http://127.0.0.1:3000 --top-k 3
    convserve detect scene.png --score-threshold 0.5
    convserve verify claimed.png reference.png

Images go as one multipart request (split into requests of at most `--batch` images), so the
server's own decoding, limits and errors apply exactly as for any client. Exit status: 0 when
every image was classified, 1 when the server refused a request (its status and error code
are printed), 2 when the server could not be reached.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:3000"


class ServerRefused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def post_images(
    route: str,
    paths: list[Path],
    url: str,
    params: dict[str, str | int | float],
    batch: int = 64,
    timeout_s: float = 60.0,
) -> list[dict]:
    """One result per image, in order: the `results` of the server's answers on `route`."""
    results: list[dict] = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as http:
        for start in range(0, len(paths), batch):
            files = [("images", (p.name, p.read_bytes())) for p in paths[start : start + batch]]
            resp = http.post(route, params=params, files=files)
            if resp.status_code != 200:
                raise _refusal(resp)
            results.extend(resp.json()["results"])
    return results


def classify(
    paths: list[Path],
    url: str = DEFAULT_URL,
    top_k: int = 1,
    model: str | None = None,
    batch: int = 64,
    timeout_s: float = 60.0,
) -> list[dict]:
    """One result per image, in order: the server's `results` entries."""
    params: dict[str, str | int | float] = {"top_k": top_k}
    if model:
        params["model"] = model
    return post_images("/classify", paths, url, params, batch, timeout_s)


def _refusal(resp: httpx.Response) -> ServerRefused:
    try:
        error = resp.json()["error"]
        return ServerRefused(resp.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return ServerRefused(resp.status_code, "unknown", resp.text[:200])


def print_results(paths: list[Path], results: list[dict], out: TextIO) -> None:
    """`path` then `label probability` lines, best first."""
    for path, result in zip(paths, results, strict=True):
        predictions = result["predictions"]
        if len(predictions) == 1:
            p = predictions[0]
            print(f"{path}\t{p['label']}\t{p['probability']:.4f}", file=out)
            continue
        print(path, file=out)
        width = max(len(p["label"]) for p in predictions)
        for p in predictions:
            print(f"  {p['label']:<{width}}  {p['probability']:.4f}", file=out)


def print_detections(paths: list[Path], results: list[dict], out: TextIO) -> None:
    """`path width x height: N detection(s)`, then one line per detection, best first."""
    for path, result in zip(paths, results, strict=True):
        found = result["detections"]
        print(f"{path}\t{result['width']}x{result['height']}\t{len(found)} detection(s)", file=out)
        for d in found:
            b = d["box"]
            print(
                f"  {d['label']:<12} {d['score']:.3f}  ({b['x1']:.1f}, {b['y1']:.1f}) - "
                f"({b['x2']:.1f}, {b['y2']:.1f})",
                file=out,
            )


def _run(paths: list[str], url: str, as_json: bool, call, show) -> int:  # noqa: ANN001
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        results = call(files)
    except ServerRefused as refused:
        print(f"error: {refused}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    if as_json:
        json.dump({"results": results}, sys.stdout, indent=2)
        print()
    else:
        show(files, results, sys.stdout)
    return 0


def main(paths: list[str], url: str, top_k: int, model: str | None, as_json: bool) -> int:
    """`convserve classify`."""
    return _run(paths, url, as_json, lambda f: classify(f, url, top_k, model), print_results)


def detect_main(
    paths: list[str],
    url: str,
    model: str | None,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    as_json: bool,
) -> int:
    """`convserve detect`."""
    params: dict[str, str | int | float] = {
        "score_threshold": score_threshold,
        "iou_threshold": iou_threshold,
        "max_detections": max_detections,
    }
    if model:
        params["model"] = model
    return _run(
        paths, url, as_json, lambda f: post_images("/detect", f, url, params), print_detections
    )


def verify(a: Path, b: Path, url: str, model: str | None, timeout_s: float = 60.0) -> dict:
    """The server's answer to "are `a` and `b` the same identity?" (POST /verify)."""
    files = [("a", (a.name, a.read_bytes())), ("b", (b.name, b.read_bytes()))]
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as http:
        resp = http.post("/verify", params={"model": model} if model else {}, files=files)
    if resp.status_code != 200:
        raise _refusal(resp)
    return resp.json()


def print_verification(paths: list[Path], results: list[dict], out: TextIO) -> None:
    """`a b same|different distance d threshold t`."""
    (answer,) = results
    verdict = "same" if answer["same"] else "different"
    print(
        f"{paths[0]}\t{paths[1]}\t{verdict}\tdistance {answer['distance']:.4f}\t"
        f"threshold {answer['threshold']:.4f}",
        file=out,
    )


def verify_main(paths: list[str], url: str, model: str | None, as_json: bool) -> int:
    """`convserve verify A B`: exit 0 whatever the verdict (it is printed), 1 when refused."""
    return _run(paths, url, as_json, lambda f: [verify(f[0], f[1], url, model)],
                print_verification)  # fmt: skip
