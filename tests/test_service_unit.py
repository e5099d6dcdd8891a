"""Service parts in isolation: batcher, admission, tensors, providers, pool, settings.

ONNX Runtime is replaced by fake sessions here, so each behaviour can be forced (slow
inference, a provider that does not come up); the other tiers run the real thing.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from convserve.errors import ConvserveError, InvalidInput
from convserve.runtime import OnnxClassifier, ProviderError, SessionConfig, make_session
from convserve.service.admission import CLOSE, Admission, BodyRefused, ClientGone
from convserve.service.batching import Batcher
from convserve.service.protocols.oip import types as oip
from convserve.service.protocols.rest import Rest, status_of
from convserve.service.settings import ServiceSettings
from convserve.service.tensors import parse_dtype, parse_shape, read_npy, read_raw, to_model_input
from convserve.spec import FASHION_MNIST_MEAN, FASHION_MNIST_STD, InputSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = InputSpec(channels=1, height=28, width=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


class FakeSession:
    """ONNX Runtime's session interface; 'logits' are each image's first 10 pixel values."""

    def __init__(self, delay_s: float = 0.0, providers=("CPUExecutionProvider",)) -> None:
        self.delay_s = delay_s
        self.batches: list[int] = []
        self._providers = list(providers)

    def get_inputs(self):
        return [type("Input", (), {"name": "x"})()]

    def get_providers(self):
        return self._providers

    def run(self, _outputs, feeds):
        x = feeds["x"]
        self.batches.append(len(x))
        time.sleep(self.delay_s)
        return [x.reshape(len(x), -1)[:, :10].copy()]


def _batcher(session: FakeSession, **kw) -> Batcher:
    classifier = OnnxClassifier(session)
    return Batcher(classifier.logits, **{"max_batch_size": 8, "max_latency_ms": 5000, **kw})


def _images(n: int, start: int = 0) -> np.ndarray:
    """Distinct images: image i holds the value i everywhere, so answers can be traced."""
    return np.arange(start, start + n, dtype=np.float32)[:, None, None, None] * np.ones(
        (1, 1, 28, 28), np.float32
    )


# --- batching --------------------------------------------------------------------------------


def test_batcher_counts_images_and_keeps_each_request_its_own_rows():
    session = FakeSession(delay_s=0.002)
    batcher = _batcher(session)

    async def main():
        await batcher.warm_up(_images(1), 4)
        session.batches.clear()
        sizes = [1, 16, 3, 5, 2, 7, 1, 12]
        starts = np.cumsum([0, *sizes[:-1]])
        outs = await asyncio.gather(
            *(batcher.submit(_images(n, s)) for n, s in zip(sizes, starts, strict=True))
        )
        for out, n, s in zip(outs, sizes, starts, strict=True):
            assert out.shape == (n, 10)
            assert np.array_equal(out[:, 0], np.arange(s, s + n, dtype=np.float32))
        return session.batches

    batches = asyncio.run(main())
    # A 16-image request takes 16 places: split over batches of at most 8 images.
    assert max(batches) <= 8 and sum(batches) == 47


def test_batcher_refuses_past_its_queue_limit_with_retry_after():
    session = FakeSession(delay_s=0.2)
    batcher = _batcher(session, max_queued_images=10)

    async def main():
        first = asyncio.ensure_future(batcher.submit(_images(8)))
        await asyncio.sleep(0.01)
        with pytest.raises(ConvserveError) as err:
            await batcher.submit(_images(4))
        assert (status_of(err.value), err.value.code) == (503, "queue_full")
        assert Rest.render_error(err.value, None).headers == {"Retry-After": "1"}
        assert (await first).shape == (8, 10)
        assert batcher.pending_images == 0

    asyncio.run(main())


def test_batcher_fails_fast_past_its_deadline():
    batcher = _batcher(FakeSession(delay_s=0.5), timeout_s=0.1)

    async def main():
        t0 = time.perf_counter()
        with pytest.raises(ConvserveError) as err:
            await batcher.submit(_images(1))
        assert time.perf_counter() - t0 < 0.45
        assert (status_of(err.value), err.value.code) == (504, "deadline_exceeded")

    asyncio.run(main())


def test_on_the_workers_clock_the_deadline_holds_to_a_tick_and_costs_no_timer():
    from convserve.service.clock import Clock

    clock = Clock(tick_s=0.05)
    batcher = _batcher(FakeSession(delay_s=0.5), timeout_s=0.1, clock=clock)

    async def main():
        loop = asyncio.get_running_loop()
        scheduled = len(loop._scheduled)  # type: ignore[attr-defined]  # the loop's timers
        t0 = time.perf_counter()
        pending = [asyncio.ensure_future(batcher.submit(_images(1))) for _ in range(5)]
        await asyncio.sleep(0.01)
        # Five requests waiting, and the clock's own sleep is the only new timer: none per
        # request (a timer each would add five).
        assert len(loop._scheduled) <= scheduled + 1  # type: ignore[attr-defined]
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert 0.1 <= time.perf_counter() - t0 < 0.1 + 0.05 + 0.45
        assert all(
            isinstance(r, ConvserveError) and r.code == "deadline_exceeded" for r in results[1:]
        )  # the first may have been running
        assert not clock._callbacks  # type: ignore[attr-defined]  # cleared once answered
        clock.stop()

    asyncio.run(main())


def test_batcher_reports_batch_sizes_and_queue_waits():
    seen: list[tuple[int, int]] = []

    class Observer:
        def on_batch(self, images, queue_waits_s, seconds):
            assert all(0 <= w < 5 for w in queue_waits_s) and 0 <= seconds < 5
            seen.append((images, len(queue_waits_s)))

        def on_dropped(self, images, reason):
            raise AssertionError("nothing is dropped here")

    batcher = _batcher(FakeSession(), observer=Observer())
    asyncio.run(batcher.submit(_images(3)))
    assert seen == [(3, 1)]


# --- execution providers ---------------------------------------------------------------------


def test_unavailable_provider_refuses_to_start(tmp_path):
    config = SessionConfig(intra_op_threads=1, providers=("CUDAExecutionProvider",))
    with pytest.raises(ProviderError, match="CUDAExecutionProvider"):
        make_session(str(tmp_path / "never-read.onnx"), config)


def test_provider_fallback_when_allowed(quick_stored):
    config = SessionConfig(
        intra_op_threads=1,
        providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        allow_provider_fallback=True,
    )
    session = make_session(str(quick_stored[0].path), config)
    assert OnnxClassifier(session).provider == "CPUExecutionProvider"


# --- tensors ---------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_tensor_uint8_is_normalized_like_an_image(fashion_test):
    from convserve.preprocess import from_pixels

    pixels = fashion_test.images[:3][:, None]
    x = to_model_input(read_npy(_npy(pixels)), SPEC, 64)
    assert np.array_equal(x, from_pixels(fashion_test.images[:3], SPEC))
    raw = read_raw(pixels.tobytes(), parse_shape("3,1,28,28"), parse_dtype("uint8"))
    assert np.array_equal(to_model_input(raw, SPEC, 64), x)


def test_tensor_float32_big_endian_npy_keeps_its_values():
    x = np.random.default_rng(0).normal(size=(2, 1, 28, 28)).astype(">f4")
    assert np.array_equal(to_model_input(read_npy(_npy(x)), SPEC, 64), x.astype(np.float32))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: read_npy(_npy(np.zeros((2, 28, 28), np.float32))), id="3-d"),
        pytest.param(lambda: read_npy(_npy(np.zeros((2, 3, 28, 28), np.float32))), id="channels"),
        pytest.param(lambda: read_npy(_npy(np.zeros((2, 1, 32, 32), np.float32))), id="size"),
        pytest.param(lambda: read_npy(_npy(np.zeros((0, 1, 28, 28), np.float32))), id="empty"),
        pytest.param(lambda: read_npy(_npy(np.zeros((1, 1, 28, 28), np.float64))), id="float64"),
        pytest.param(lambda: read_npy(_npy(np.array([{"a": 1}], dtype=object))), id="pickle"),
        pytest.param(lambda: read_npy(_npy(np.zeros((1, 1, 28, 28), np.float32))[:-8]), id="short"),
        pytest.param(lambda: read_npy(b"\x93NUMPY\x01\x00garbage"), id="bad header"),
        pytest.param(lambda: read_npy(_npy(np.full((1, 1, 28, 28), np.nan, np.float32))), id="nan"),
        pytest.param(lambda: read_npy(_npy(np.full((1, 1, 28, 28), np.inf, np.float32))), id="inf"),
        pytest.param(lambda: read_raw(b"\0" * 100, (1, 1, 28, 28), parse_dtype("uint8")), id="raw"),
        pytest.param(lambda: parse_dtype("int64"), id="dtype name"),
        pytest.param(lambda: parse_shape("1,one,28,28"), id="shape text"),
    ],
)
def test_bad_tensors_are_422(make):
    with pytest.raises(ConvserveError) as err:
        to_model_input(make(), SPEC, 64)
    assert (status_of(err.value), err.value.code) == (422, "invalid_tensor")


def test_too_many_tensor_images():
    with pytest.raises(ConvserveError) as err:
        to_model_input(np.zeros((65, 1, 28, 28), np.float32), SPEC, 64)
    assert err.value.code == "too_many_images"


# --- admission -------------------------------------------------------------------------------


class _Admitted:
    """ASGI: `app` behind `limits` as the server's front door applies them to an operation (the
    body read within the limits, an in-flight place taken, refusals rendered as REST errors;
    each refusal's code appended to `rejected`), the body then replayed to `app`."""

    def __init__(self, app, limits: Admission, rejected: list[str]) -> None:
        self.app, self.limits, self.rejected = app, limits, rejected

    async def _refuse(self, send, error, headers=None) -> None:
        from convserve.service.server import send_bytes

        self.rejected.append(error.code)
        wire = Rest.render_error(error, None)
        await send_bytes(send, wire.status, wire.body, {**wire.headers, **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self.limits.admit(scope, receive)
        except ClientGone:
            return
        except BodyRefused as refusal:
            await self._refuse(send, refusal.error, CLOSE if refusal.close else None)
            return
        except ConvserveError as error:
            await self._refuse(send, error)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only a disconnect can come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            await self.app(scope, replay, send)
        finally:
            self.limits.leave(body)


def _admission_app(
    limits: Admission, gate: asyncio.Event | None = None, rejected: list[str] | None = None
):
    reads: list[int] = []

    async def echo(request: Request) -> JSONResponse:
        body = b""
        async for chunk in request.stream():
            reads.append(len(chunk))
            body += chunk
        if gate is not None:
            await gate.wait()
        return JSONResponse({"bytes": len(body)})

    app = Starlette(routes=[Route("/x", echo, methods=["POST"])])
    return _Admitted(app, limits, [] if rejected is None else rejected), reads


def test_declared_body_over_the_limit_is_413_before_reading_it():
    app, reads = _admission_app(Admission(max_body_bytes=1000, max_in_flight=4))
    with TestClient(app) as client:
        resp = client.post("/x", content=b"x" * 5000)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
        assert reads == []
        assert client.post("/x", content=b"x" * 1000).json() == {"bytes": 1000}


def test_streamed_body_over_the_limit_is_cut_off_at_the_limit():
    app, reads = _admission_app(Admission(max_body_bytes=1000, max_in_flight=4))

    def chunks():
        for _ in range(100):
            yield b"y" * 300

    with TestClient(app) as client:
        resp = client.post("/x", content=chunks())  # no Content-Length: chunked
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
    assert sum(reads) <= 1000  # the app never saw more than the limit


def test_in_flight_limit_answers_503_busy_with_retry_after():
    rejected: list[str] = []

    async def main():
        import httpx

        gate = asyncio.Event()
        limits = Admission(max_body_bytes=10_000, max_in_flight=2)
        app, _ = _admission_app(limits, gate, rejected)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = [asyncio.ensure_future(client.post("/x", content=b"a")) for _ in range(2)]
            await asyncio.sleep(0.05)
            over = await client.post("/x", content=b"b")
            gate.set()
            done = await asyncio.gather(*held)
        return over, done

    over, done = asyncio.run(main())
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    assert over.json()["error"]["code"] == "busy"
    assert [r.status_code for r in done] == [200, 200]
    assert rejected == ["busy"]


def _call(limits: Admission, messages: list, *, declared: int | None = None, delay: float = 0):
    """One request straight through the admission limits: `messages` are what the client sends,
    one per receive(), `delay` seconds apart (the last one never comes when delay is huge)."""
    app, _ = _admission_app(limits)
    sent: list[dict] = []
    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": headers, "app": app,
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("t", 80), "client": ("c", 1)}  # fmt: skip
    pending = iter(messages)

    async def receive():
        await asyncio.sleep(delay)
        return next(pending)

    async def send(message):
        sent.append(message)

    async def main():
        await app(scope, receive, send)

    asyncio.run(main())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body)


def _trickle(n: int) -> list[dict]:
    return [{"type": "http.request", "body": b"x", "more_body": i < n - 1} for i in range(n)]


def test_a_body_slower_than_the_deadline_is_408_and_the_connection_closes():
    limits = Admission(max_body_bytes=10_000, max_in_flight=4, body_timeout_s=0.2)
    status, headers, body = _call(limits, _trickle(100), delay=0.05)
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert headers[b"connection"] == b"close"
    assert (limits.held_bytes, limits.pending_bodies, limits.in_flight) == (0, 0, 0)
    # The same trickle within the deadline is served.
    limits = Admission(max_body_bytes=10_000, max_in_flight=4, body_timeout_s=5)
    assert _call(limits, _trickle(5), delay=0.01)[:3:2] == (200, {"bytes": 5})
    assert (limits.held_bytes, limits.pending_bodies, limits.in_flight) == (0, 0, 0)


def test_slow_bodies_have_their_own_bound_and_whole_bodies_pass_it():
    limits = Admission(max_body_bytes=10_000, max_in_flight=4, max_pending_bodies=2)
    limits.pending_bodies = 2  # two uploads are trickling in
    status, headers, body = _call(limits, _trickle(30), delay=0.05)
    assert status == 503 and body["error"]["code"] == "too_many_uploads"
    assert headers[b"connection"] == b"close"
    # A body that arrives at network speed never needs one of those places.
    assert _call(limits, _trickle(30), delay=0.001)[0] == 200
    assert limits.pending_bodies == 2 and limits.held_bytes == 0


def test_bytes_held_at_once_are_bounded_and_given_back():
    limits = Admission(max_body_bytes=10_000, max_in_flight=4, max_held_bytes=12_000)
    limits.held_bytes = 5_000  # another request holds 5 kB
    whole = [{"type": "http.request", "body": b"z" * 8_000, "more_body": False}]
    status, headers, body = _call(limits, whole, declared=8_000)  # reserved up front
    assert status == 503 and body["error"]["code"] == "busy" and b"retry-after" in headers
    status, _, _ = _call(limits, whole)  # chunked: counted as it arrives
    assert status == 503
    assert limits.held_bytes == 5_000
    limits.held_bytes = 0
    assert _call(limits, whole, declared=8_000)[0] == 200 and limits.held_bytes == 0


def _pieces(
    n: int,
    size: int,
    *,
    active: list[int] | None = None,
    pause_after: int = -1,
    pause_s: float = 0.0,
):
    """An ASGI receive() sending `n` pieces of `size` bytes; `active` counts the receive()
    calls in progress after the first piece (the bulk reads), its peak in active[1]."""
    sent = 0

    async def receive():
        nonlocal sent
        counted = active is not None and sent > 0
        if counted:
            active[0] += 1
            active[1] = max(active[1], active[0])
        try:
            await asyncio.sleep(pause_s if sent == pause_after else 0.001)
        finally:
            if counted:
                active[0] -= 1
        sent += 1
        return {"type": "http.request", "body": bytes([sent]) * size, "more_body": sent < n}

    return receive


def test_bulk_bodies_are_read_a_few_at_a_time_and_arrive_whole():
    from convserve.service.admission import BULK_PIECE, BULK_READERS

    limits = Admission(max_body_bytes=10**8, max_in_flight=64, max_held_bytes=10**9)
    active = [0, 0]

    async def main():
        readers = [limits.read_body({"headers": []}, _pieces(6, BULK_PIECE, active=active))
                   for _ in range(4 * BULK_READERS)]  # fmt: skip
        return await asyncio.gather(*readers)

    bodies = asyncio.run(main())
    expected = b"".join(bytes([k]) * BULK_PIECE for k in range(1, 7))
    assert all(body == expected for body in bodies)
    assert active[1] == BULK_READERS  # never more bulk reads at once, and that many in turn
    assert limits.held_bytes == len(expected) * len(bodies)


def test_a_bulk_upload_that_pauses_gives_its_turn_to_the_others():
    from convserve.service.admission import BULK_PIECE, BULK_READERS

    limits = Admission(max_body_bytes=10**8, max_in_flight=64, max_held_bytes=10**9)
    finished: dict[str, float] = {}

    async def read(name: str, receive) -> None:
        await limits.read_body({"headers": []}, receive)
        finished[name] = time.monotonic()

    async def main():
        started = time.monotonic()
        paused = [read(f"paused {i}", _pieces(3, BULK_PIECE, pause_after=1, pause_s=1.0))
                  for i in range(BULK_READERS)]  # fmt: skip
        await asyncio.gather(*paused, read("steady", _pieces(6, BULK_PIECE)))
        return started

    started = asyncio.run(main())
    # Every turn was taken by an upload that then stopped sending for a second; the steady one
    # still finished long before they did.
    assert finished["steady"] - started < 0.5
    assert min(t for name, t in finished.items() if name != "steady") - started >= 1.0


# --- settings --------------------------------------------------------------------------------


def test_settings_from_environment_and_toml_file(tmp_path, monkeypatch):
    config = tmp_path / "convserve.toml"
    config.write_text('max_batch_size = 32\nproviders = ["cuda", "cpu"]\nmax_in_flight = 7\n')
    monkeypatch.setenv("CONVSERVE_CONFIG_FILE", str(config))
    monkeypatch.setenv("CONVSERVE_MODELS", "a:latest, b:v1")
    monkeypatch.setenv("CONVSERVE_MAX_IN_FLIGHT", "9")  # environment wins over the file
    s = ServiceSettings()
    assert s.models == ["a:latest", "b:v1"] and s.default_model == "a:latest"
    assert s.max_batch_size == 32 and s.max_in_flight == 9
    assert s.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_settings_file_with_an_unknown_key_is_refused(tmp_path, monkeypatch):
    config = tmp_path / "convserve.toml"
    config.write_text("max_batchsize = 32\n")
    monkeypatch.setenv("CONVSERVE_CONFIG_FILE", str(config))
    with pytest.raises(ValueError, match="max_batchsize"):
        ServiceSettings()


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `CONVSERVE_([A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    fields = {name.upper() for name in ServiceSettings.model_fields}
    assert documented == fields | {"CONFIG_FILE"}


def test_pool_is_ready_only_after_warm_up(quick_stored):
    from convserve.service.server import Server

    settings = ServiceSettings(
        models=[quick_stored[1].tag], warmup_requests=2, max_batch_size=4, grpc_port=0
    )
    server = Server.start(settings)
    pool = server.models
    assert not pool.ready
    asyncio.run(server.warm_up())
    assert pool.ready
    server.shutdown()


# --- Open Inference Protocol wire format ---------------------------------------------------------


def test_binary_bytes_elements_and_leftover_bytes():
    payload = b"".join(struct.pack("<I", len(b)) + b for b in (b"ab", b"", b"xyz"))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    parsed = oip.parse_infer_request(header + payload, str(len(header)))
    assert parsed.inputs[0].value == [b"ab", b"", b"xyz"]
    with pytest.raises(ConvserveError, match="belong to no input"):
        oip.parse_infer_request(header + payload + b"extra", str(len(header)))
    short = struct.pack("<I", 10) + b"ab"  # claims 10 bytes, holds 2
    header = header.replace(str(len(payload)).encode(), str(len(short)).encode())
    with pytest.raises(ConvserveError, match="truncated"):
        oip.parse_infer_request(header + short, str(len(header)))


@pytest.mark.parametrize("shape", [(1, 10), (3, 10), (64, 10), (2, 1000)])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_lists_match_numpy_top_k_ties_included(shape, k):
    from convserve.service.tasks.classify import top_k, top_k_lists

    p = np.random.default_rng(k).random(shape).astype(np.float32)
    p[0, 1] = p[0, 2] = p[0].max()  # a tie at the top: the lower index first
    indices, values = top_k(p, k)
    assert top_k_lists(p, k) == (indices.tolist(), values.tolist())
    assert top_k_lists(p, k)[0][0][:2] == [1, 2][:k]


def test_a_star_serves_every_stored_model_and_stands_alone(quick_stored):
    """`CONVSERVE_MODELS=*`, as the container image sets it: every stored model's latest
    version, in name order, so an image built from a directory serves what it holds."""
    import bentoml

    from convserve.service.loading import served_tags

    tags = served_tags(ServiceSettings(models=["*"]))
    names = sorted({m.tag.name for m in bentoml.models.list()})
    assert tags == [f"{name}:latest" for name in names] and "quick-lenet5:latest" in tags
    with pytest.raises(ValueError, match="stands alone"):
        ServiceSettings(models=["*", "quick-lenet5:latest"])


def test_the_default_top_k_is_capped_at_the_class_count(quick_stored):
    """A default of 15 on a 10-class model answers 10 predictions (an imported 3-class model
    with the default of 5 answers 3); an explicit top_k past the classes is still refused."""
    from convserve.service.server import Server
    from convserve.service.tasks.classify import ClassifyTask
    from convserve.spec import TaskName

    settings = ServiceSettings(models=[quick_stored[1].tag], default_top_k=15)
    server = Server.start(settings)
    try:
        classify = server.tasks[TaskName.CLASSIFY]
        assert isinstance(classify, ClassifyTask)
        served = server.models.get(None, None, TaskName.CLASSIFY)
        k = classify.top_k(served, None)
        assert (served.spec.num_classes, k) == (10, 10)
        with pytest.raises(InvalidInput) as err:
            classify.top_k(served, 11)
        assert err.value.code == "invalid_top_k"
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("name", "model", "images"),
    [("lenet", "lenet", False), ("lenet.image", "lenet", True), (".image", ".image", False),
     ("a.image.image", "a.image", True), ("lenet.images", "lenet.images", False)],
)  # fmt: skip
def test_a_name_ending_in_image_names_the_encoded_image_view(name, model, images):
    from convserve.service.protocols.oip.types import ModelRef

    ref = ModelRef.named(name, "3")
    assert (ref.model, ref.version, ref.images, ref.name) == (model, "3", images, name)


def test_every_error_code_has_a_grpc_status_and_a_retryable_one_is_unavailable():
    import grpc

    from convserve.errors import ErrorCode
    from convserve.service.protocols.oip.grpc import STATUS

    assert set(STATUS) == set(ErrorCode)
    assert STATUS[ErrorCode.BUSY] is grpc.StatusCode.UNAVAILABLE
    assert STATUS[ErrorCode.MODEL_NOT_FOUND] is grpc.StatusCode.NOT_FOUND
    assert STATUS[ErrorCode.UNAUTHENTICATED] is grpc.StatusCode.UNAUTHENTICATED
