"""One user's latency, measured finely: sequential requests on one keep-alive connection,
each timed with perf_counter (Locust rounds response times to whole milliseconds).

    taskset -c 1 python -m convserve.loadtest.probe --url http://127.0.0.1:3000 --requests 2000
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
import uuid
from urllib.parse import urlsplit

import numpy as np

from convserve.loadtest.locustfile import pngs


def _form(png: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def probe(url: str, requests: int, path: str = "/classify?top_k=1") -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    forms = [_form(png) for png in pngs()[:64]]
    times = []
    for i in range(requests + 100):
        body, ctype = forms[i % len(forms)]
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        resp.read()
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            raise SystemExit(f"HTTP {resp.status} from {url}{path}")
        if i >= 100:  # the first hundred warm the connection and the server
            times.append(elapsed)
    ms = 1000 * np.asarray(times)
    return {
        "requests": requests,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(probe(args.url, args.requests)))


if __name__ == "__main__":
    main()
