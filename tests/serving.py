"""Starting and stopping real `bentoml serve` processes for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
from convserve.defaults import SERVICE  # noqa: E402 - after the standard imports, as above


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, log_path: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` on a free port with CONVSERVE_* settings; returns once /readyz is 200.
    Tests stop servers with SIGTERM: no drain period unless a test asks for one."""
    settings = {"drain_s": "0", **settings}
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        **{f"CONVSERVE_{k.upper()}": v for k, v in settings.items()},
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", SERVICE]
            + ["--host", "127.0.0.1", "--port", str(port)],
            cwd=log_path.parent,  # not the repository: the service starts from anywhere
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, log_path)
    return proc, url


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 120) -> None:
    """Until `url`/readyz answers 200; fails with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"not ready in {timeout:g} s:\n" + log_path.read_text()
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
