"""Hostile clients against a real `bentoml serve` on its default limits: trickling uploads,
huge images, hang-ups, a saturating burst with probes, SIGKILL of the worker. Each test says
what load it holds and what it asserts; docs/reliability.md collects the figures."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from serving import start_server, stop_server, wait_ready

from convserve.loadtest.processes import tree_rss

pytestmark = pytest.mark.slow


def png(image: np.ndarray, scale: int = 1) -> bytes:
    img = Image.fromarray(image)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def multipart(parts: list[tuple[str, bytes]], boundary: str = "convserve-test") -> bytes:
    out = b""
    for name, data in parts:
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
                f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split()[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.split()[-1])
    return total


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@pytest.fixture(scope="module")
def server(bentoml_home, quick_stored, tmp_path_factory):
    """The service on its default limits (only the model is the quick one)."""
    log = tmp_path_factory.mktemp("reliability") / "server.log"
    proc, url = start_server(bentoml_home, log, models="quick-lenet5:latest")
    yield proc, url, log
    stop_server(proc)


# --- 1. slow clients ---------------------------------------------------------------------------


async def _trickle(host: str, port: int, body: bytes, opened: list, closed: list) -> bytes:
    """Send the headers, then the body one byte a second, until the server hangs up."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: multipart/form-data; boundary=convserve-test\r\n\r\n"
    ).encode()
    writer.write(head)
    opened.append(time.monotonic())
    answer = b""
    try:
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                answer += await asyncio.wait_for(reader.read(4096), timeout=1.0)
            except TimeoutError:
                continue
            if answer or reader.at_eof():
                break
        while not reader.at_eof():  # the answer came: now the server must close
            chunk = await asyncio.wait_for(reader.read(4096), timeout=20)
            if not chunk:
                break
            answer += chunk
    except (ConnectionError, TimeoutError):
        pass
    closed.append(time.monotonic())
    writer.close()
    return answer


def test_300_trickling_uploads_neither_starve_normal_requests_nor_stay_open(server, fashion_test):
    _, url, _ = server
    host, port = url.removeprefix("http://").split(":")
    images = fashion_test.images
    body = multipart([("slow.png", png(images[0]))])
    body += b" " * max(0, 2048 - len(body))  # ~2 KB, like the reported attack
    normal = [("images", (f"{i}.png", png(images[i]))) for i in range(2)]

    async def main():
        opened: list[float] = []
        closed: list[float] = []
        trickles = [
            asyncio.ensure_future(_trickle(host, int(port), body, opened, closed))
            for _ in range(300)
        ]
        await asyncio.sleep(2.0)  # every trickle is connected and sending
        still_open_at_start = 300 - len(closed)
        latencies, statuses = [], []
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def one():
                t0 = time.perf_counter()
                resp = await http.post("/classify", files=normal, params={"top_k": 1})
                latencies.append(time.perf_counter() - t0)
                statuses.append(resp.status_code)

            for _ in range(10):  # 100 normal requests, 10 at a time
                await asyncio.gather(*(one() for _ in range(10)))
        answers = await asyncio.gather(*trickles)
        return opened, closed, still_open_at_start, latencies, statuses, answers

    opened, closed, open_at_start, latencies, statuses, answers = asyncio.run(main())
    held = [c - o for o, c in zip(sorted(opened), sorted(closed), strict=True)]
    codes = [m.group(1).decode() for a in answers if (m := re.search(rb'"code": ?"(\w+)"', a))]
    print(
        f"300 trickling uploads ({len(body)} B at 1 B/s), {open_at_start} still open after 2 s; "
        f"100 normal requests: statuses {sorted(set(statuses))}, p50 "
        f"{1e3 * percentile(latencies, 50):.0f} ms, p99 {1e3 * percentile(latencies, 99):.0f} ms; "
        f"trickles closed after at most {max(held):.1f} s, answered "
        f"{ {c: codes.count(c) for c in set(codes)} }"
    )
    assert open_at_start > 0  # the attack did hold connections
    assert statuses == [200] * 100
    assert percentile(latencies, 99) < 1.0
    assert max(held) < 15.0
    assert set(codes) <= {"body_timeout", "too_many_uploads"} and len(codes) == 300


# --- 2. memory bound ---------------------------------------------------------------------------


def _large_png(mode: str, seed: int) -> bytes:
    # A flat colour compresses ~1000:1: 64 of these fit one 10 MiB body, 1.6 G pixels decoded.
    colour = tuple(int(c) for c in np.random.default_rng(seed).integers(0, 255, len(mode)))
    buf = io.BytesIO()
    Image.new(mode, (4999, 4999), colour if len(mode) > 1 else colour[0]).save(buf, "PNG")
    return buf.getvalue()


def _flood(url: str, clients: int, parts: list[tuple[str, bytes]], pid: int):
    body = multipart(parts)
    headers = {"Content-Type": "multipart/form-data; boundary=convserve-test"}
    peak = [tree_rss(pid)]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak.append(tree_rss(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(
                *(http.post("/classify", content=body, headers=headers) for _ in range(clients))
            )

    try:
        answers = asyncio.run(main())
    finally:
        done.set()
        sampler.join()
    return answers, max(peak), len(body)


def test_64_requests_of_64_huge_pngs_keep_memory_bounded(server):
    proc, url, _ = server
    pngs = [_large_png("RGBA", i) for i in range(4)]
    rss_before = tree_rss(proc.pid)
    # 64 at once, each 64 images of 4999 x 4999: refused from the headers, never decoded.
    flood, peak_flood, size = _flood(
        url, 64, [(f"{i}.png", pngs[i % 4]) for i in range(64)], proc.pid
    )
    statuses = [r.status_code for r in flood]
    # Then requests the limits let through, decoded for real: 4 such images each (100 M px).
    decoded, peak_decoded, _ = _flood(url, 6, [(f"{i}.png", pngs[i]) for i in range(4)], proc.pid)
    print(
        f"64 requests x 64 PNGs of 4999x4999 RGBA ({size / 1e6:.1f} MB each): "
        f"{ {s: statuses.count(s) for s in set(statuses)} }, "
        f"peak RSS {peak_flood / 2**20:.0f} MiB; "
        f"6 requests x 4 decoded: {[r.status_code for r in decoded]}, peak RSS "
        f"{peak_decoded / 2**20:.0f} MiB (idle {rss_before / 2**20:.0f} MiB)"
    )
    assert set(statuses) <= {200, 413, 503}
    assert {r.json()["error"]["code"] for r in flood} <= {"too_many_pixels", "busy"}
    assert [r.status_code for r in decoded] == [200] * 6
    assert max(peak_flood, peak_decoded) < 1.5 * 2**30
    assert httpx.get(f"{url}/readyz").status_code == 200


# --- 5. cancel on disconnect ---------------------------------------------------------------------


def test_a_client_that_hangs_up_costs_no_inference_and_keep_alive_is_unaffected(
    server, fashion_test
):
    _, url, _ = server
    host, port = url.removeprefix("http://").split(":")
    images = fashion_test.images
    heavy = [("images", (f"{i}.png", png(images[i], 16))) for i in range(64)]  # 448 px each
    inferred_before = metric(url, "convserve_batch_size_images_sum")
    gone_before = metric(url, "convserve_client_gone_requests_total")
    answered: list[int] = []
    stop = threading.Event()

    def load():  # saturate: 64-image requests back to back from 6 clients
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                resp = http.post("/classify", files=heavy, params={"top_k": 1})
                assert resp.status_code == 200, resp.text
                answered.append(len(resp.json()["results"]))

    keep_alive: list[int] = []

    def steady():  # one keep-alive connection, small requests throughout
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                resp = http.post("/classify", files=heavy[:1], params={"top_k": 1})
                keep_alive.append(resp.status_code)

    threads = [threading.Thread(target=load) for _ in range(6)] + [threading.Thread(target=steady)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    body = multipart([(f"{i}.png", png(images[i], 16)) for i in range(64)])
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=convserve-test\r\n\r\n".encode()
            + body
        )
        time.sleep(0.05)  # the request is in: decoding or queued behind the load
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    inferred = metric(url, "convserve_batch_size_images_sum") - inferred_before
    gone = metric(url, "convserve_client_gone_requests_total") - gone_before
    dropped = metric(url, "convserve_dropped_images_total", reason="cancelled")
    print(
        f"saturated by 6 x 64-image clients ({len(answered)} answers); one 64-image request hung "
        f"up: client_gone +{gone:g}, dropped(cancelled) {dropped:g}; images inferred "
        f"{inferred:g} = answered {sum(answered) + len(keep_alive)}; keep-alive requests "
        f"{len(keep_alive)}, all 200: {set(keep_alive) == {200}}"
    )
    assert gone == 1
    # Every image ONNX Runtime saw belongs to an answered request: none of the 64.
    assert inferred == sum(answered) + len(keep_alive)
    assert set(keep_alive) == {200} and len(keep_alive) > 5


# --- 7. probes under a saturating burst -----------------------------------------------------------


def _refusals(log: Path) -> dict[str, int]:
    """The server's error codes in its log, counted: what the server said where a client saw
    its connection end."""
    codes: dict[str, int] = {}
    for code in re.findall(r'"error": ?"([a-z_]+)"', log.read_text(errors="replace")):
        codes[code] = codes.get(code, 0) + 1
    return codes


def _probe_latencies(url: str, path: str, seconds: float) -> tuple[list[float], list[int]]:
    """Runs in its own process, so the load generator's event loop cannot delay it."""
    latencies, statuses = [], []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            statuses.append(http.get(path).status_code)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    return latencies, statuses


def test_probes_answer_within_100_ms_at_p99_during_a_saturating_burst(server, fashion_test):
    import concurrent.futures
    import multiprocessing

    _, url, _ = server
    images = fashion_test.images[:64]
    heavy = [("images", (f"{i}.png", png(img, 16))) for i, img in enumerate(images)]
    # Encoded once: 300 clients re-encoding 64 parts each would starve this one process, and its
    # bodies would trickle in like a slow client's, which is another test's subject.
    encoded = httpx.Request("POST", url, files=heavy)
    body, headers = encoded.read(), {"content-type": encoded.headers["content-type"]}

    async def burst(seconds: float) -> list[int]:
        # Idle connections are dropped before the server's 5 s keep-alive ends: reusing one the
        # server is closing that instant is HTTP/1.1's keep-alive race, not this test's subject.
        limits = httpx.Limits(max_connections=400, keepalive_expiry=2)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            deadline = time.monotonic() + seconds

            async def client():
                codes = []
                while time.monotonic() < deadline:
                    try:
                        answer = await http.post("/classify", content=body, headers=headers)
                        codes.append(answer.status_code)
                    except httpx.TransportError as error:  # counted, so the summary names it
                        codes.append(type(error).__name__)
                return codes

            answers = await asyncio.gather(*(client() for _ in range(300)))
        return [c for a in answers for c in a]

    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn) as pool:
        probes = {p: pool.submit(_probe_latencies, url, p, 8.0) for p in ("/readyz", "/livez")}
        time.sleep(1.0)  # the probers are up (spawned interpreters) before the burst
        # The burst's 300 clients share two cores with the server and the probers: at a lower
        # priority they load the server without starving the probers' own measurements (on a
        # real network the load comes from other machines).
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, before + 15)  # below the decode threads too
        try:
            answers = asyncio.run(burst(8.0))
        finally:
            os.setpriority(os.PRIO_PROCESS, tid, before)
        results = {p: f.result() for p, f in probes.items()}
    counts = {s: answers.count(s) for s in set(answers)}
    summary = ", ".join(
        f"{p} n={len(v)} p50 {1e3 * statistics.median(v):.1f} ms "
        f"p99 {1e3 * percentile(v, 99):.1f} ms"
        for p, (v, _) in results.items()
    )
    print(f"burst of 300 clients x 64-image requests for 8 s: {counts}; {summary}")
    # 503 is admission shedding; 504 a request admitted while the decode backlog grew past its
    # deadline (CONVSERVE_REQUEST_TIMEOUT_MS), answered as documented. Nothing else.
    assert set(answers) <= {200, 503, 504}, (counts, _refusals(server[2]))
    assert counts.get(200, 0) > 0
    assert counts.get(503, 0) > 0, "the burst did not saturate admission"
    for path, (latencies, statuses) in results.items():
        assert set(statuses) == {200}
        # when it fails: which probes were slow (their order in the run), in ms
        slow = [(i, round(1e3 * t)) for i, t in enumerate(latencies) if t > 0.05]
        assert len(latencies) > 20 and percentile(latencies, 99) < 0.1, (path, slow)


# --- 10. worker crash ---------------------------------------------------------------------------


def _worker_pids(arbiter: int) -> list[int]:
    return [
        p.pid
        for p in psutil.Process(arbiter).children(recursive=True)
        if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    ]


def test_a_killed_worker_is_replaced_and_no_client_waits_past_its_timeout(
    bentoml_home, quick_stored, fashion_test, tmp_path
):
    log = tmp_path / "crash.log"
    proc, url = start_server(bentoml_home, log, models="quick-lenet5:latest")
    try:
        files = [
            ("images", (f"{i}.png", png(img, 8))) for i, img in enumerate(fashion_test.images[:32])
        ]
        timeout = 10.0
        outcomes: list[tuple[str, float]] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    code = str(
                        httpx.post(f"{url}/classify", files=files, timeout=timeout).status_code
                    )
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                outcomes.append((code, time.monotonic() - t0))
                if code != "200":
                    time.sleep(0.1)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        (worker,) = _worker_pids(proc.pid)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        time.sleep(0.5)
        wait_ready(proc, url, log, timeout=30)
        back = time.monotonic() - killed
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        (replacement,) = _worker_pids(proc.pid)
        kinds = {c: sum(1 for k, _ in outcomes if k == c) for c, _ in outcomes}
        print(
            f"SIGKILL of worker {worker} under 8 clients: replaced by {replacement}, /readyz 200 "
            f"again after {back:.1f} s; outcomes {kinds}, longest wait "
            f"{max(s for _, s in outcomes):.2f} s (timeout {timeout:g} s)"
        )
        assert replacement != worker and back < 30
        assert max(s for _, s in outcomes) < timeout + 1
        assert outcomes[-1][0] == "200"
    finally:
        assert stop_server(proc) == 0
