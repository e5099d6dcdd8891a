"""Slow request heads against a real `bentoml serve`: connections that send their head a byte
at a time are capped and closed by the deadline while normal requests are answered.

A module of its own: its server, with a short deadline and a small cap, must not run beside
test_reliability's (a second `bentoml serve` on the same store clears the first one's
multiprocess metrics files, which test_reliability reads)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serving import start_server, stop_server
from test_reliability import percentile, png


@pytest.fixture(scope="module")
def head_server(bentoml_home, quick_stored, tmp_path_factory):
    """Short head deadline and cap, so the test sees both act in seconds."""
    log = tmp_path_factory.mktemp("heads") / "server.log"
    proc, url = start_server(bentoml_home, log, models="quick-lenet5:latest",
                             header_timeout_s="3", max_pending_heads="100")  # fmt: skip
    yield url
    stop_server(proc)


async def _slow_head(host: str, port: int, opened: list, closed: list, answers: list) -> None:
    """A request line, then one header byte every half second, until the server hangs up."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /classify HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
    opened.append(time.monotonic())
    try:
        while True:
            writer.write(b"x")
            await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(4096), timeout=0.5)
            except TimeoutError:
                continue
            answers.append(chunk)
            break
    except ConnectionError:
        answers.append(b"")
    closed.append(time.monotonic())
    writer.close()


def test_slow_request_heads_are_capped_and_closed_while_normal_requests_are_answered(
    head_server, fashion_test
):
    """600 connections sending their head a byte at a time against a cap of 100 and a 3 s
    deadline: the oldest past the cap are closed at once, the rest at the deadline (with a
    408), and normal requests made while they are held are all answered."""
    host, port = head_server.removeprefix("http://").split(":")
    normal = [("images", ("g.png", png(fashion_test.images[0])))]

    async def main():
        opened: list[float] = []
        closed: list[float] = []
        answers: list[bytes] = []
        heads = [
            asyncio.ensure_future(_slow_head(host, int(port), opened, closed, answers))
            for _ in range(600)
        ]
        await asyncio.sleep(1.0)
        held_at_1s = len(opened) - len(closed)
        statuses, latencies = [], []
        async with httpx.AsyncClient(base_url=head_server, timeout=30) as http:

            async def one():
                t0 = time.perf_counter()
                resp = await http.post("/classify", files=normal, params={"top_k": 1})
                latencies.append(time.perf_counter() - t0)
                statuses.append(resp.status_code)

            for _ in range(5):  # 50 normal requests, 10 at a time, while the heads are held
                await asyncio.gather(*(one() for _ in range(10)))
        await asyncio.gather(*heads)
        return opened, closed, answers, held_at_1s, statuses, latencies

    opened, closed, answers, held_at_1s, statuses, latencies = asyncio.run(main())
    first = min(opened)
    print(
        f"600 slow heads, cap 100, deadline 3 s: {held_at_1s} held after 1 s; 50 normal "
        f"requests {sorted(set(statuses))}, p99 {1e3 * percentile(latencies, 99):.0f} ms; "
        f"the last head closed {max(closed) - first:.1f} s after the first opened"
    )
    assert statuses == [200] * 50
    assert held_at_1s <= 110  # the cap (and a few in flight to the client)
    assert max(closed) - first < 3.0 + 3.0  # every head gone by its deadline (and a tick)
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert timed_out and all(b'"header_timeout"' in a for a in timed_out)
    exposed = httpx.get(f"{head_server}/metrics").text
    closed = float(exposed.split("\nconvserve_heads_closed_total ")[1].split()[0])
    assert closed >= 600 - 100 - 10  # every head past the cap, and those that timed out
