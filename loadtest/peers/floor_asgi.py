"""The floor: no framework at all. A raw ASGI app on uvicorn (uvloop, httptools), the body's one
file part cut out of the multipart form by hand, the same Pillow decode and numpy
normalization as the lean FastAPI peer, one ONNX Runtime call per request, the answer as JSON.
No batching, no limits, no checks: what a request costs at least on this stack.

    PEER_ONNX=model.onnx PEER_SPEC=spec.json \\
        uvicorn convserve.loadtest.peers.floor_asgi:app --port 3004 --log-level warning
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

spec = json.loads(Path(os.environ["PEER_SPEC"]).read_text())
SIZE = (spec["input"]["width"], spec["input"]["height"])
MODE = "L" if spec["input"]["channels"] == 1 else "RGB"
MEAN = np.array(spec["input"]["mean"], np.float32).reshape(-1, 1, 1)
STD = np.array(spec["input"]["std"], np.float32).reshape(-1, 1, 1)
LABELS = spec["labels"]

options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "1"))
session = ort.InferenceSession(os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name
JSON = [(b"content-type", b"application/json")]


def classify(body: bytes) -> bytes:
    data = body.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]  # the one file part
    img = Image.open(io.BytesIO(data)).convert(MODE).resize(SIZE)
    x = np.asarray(img, np.float32) / 255.0
    x = ((x[None] if x.ndim == 2 else x.transpose(2, 0, 1)) - MEAN) / STD
    logits = np.asarray(session.run(None, {INPUT: x[None]})[0])[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    i = int(p.argmax())
    answer = {
        "results": [{"predictions": [{"label": LABELS[i], "index": i, "probability": float(p[i])}]}]
    }
    return json.dumps(answer).encode()


async def app(scope, receive, send):  # noqa: ANN001, ANN201 - ASGI
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    payload = b'{"ok": true}' if scope["method"] == "GET" else classify(body)
    headers = [*JSON, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
