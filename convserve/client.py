"""`convserve classify`: send images to a running server and print its answer.

    convserve classify shoe.png shirt.jpg --url http://127.0.0.1:3000 --top-k 3

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


def classify(
    paths: list[Path], url: str = DEFAULT_URL, top_k: int = 1, model: str | None = None,
    batch: int = 64, timeout_s: float = 60.0,
) -> list[dict]:  # fmt: skip
    """One result per image, in order: the server's `results` entries."""
    params: dict[str, str | int] = {"top_k": top_k}
    if model:
        params["model"] = model
    results: list[dict] = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as http:
        for start in range(0, len(paths), batch):
            files = [("images", (p.name, p.read_bytes())) for p in paths[start : start + batch]]
            resp = http.post("/classify", params=params, files=files)
            if resp.status_code != 200:
                raise _refusal(resp)
            results.extend(resp.json()["results"])
    return results


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


def main(paths: list[str], url: str, top_k: int, model: str | None, as_json: bool) -> int:
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        results = classify(files, url, top_k, model)
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
        print_results(files, results, sys.stdout)
    return 0
