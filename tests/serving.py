"""Starting and stopping real `bentoml serve` processes for the tests, with the harness's own
process plumbing (convserve.loadtest.processes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from convserve.defaults import SERVICE
from convserve.loadtest.processes import PY, NotReady, Server, free_port, start, stop

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "SERVICE", "free_port", "start_server", "stop_server", "wait_ready"]


def start_server(home: Path, log_path: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` on a free port with CONVSERVE_* settings; returns once /readyz is 200.
    Tests stop servers with SIGTERM: no drain period unless a test asks for one; no gRPC port
    unless a test gives one (`grpc_port=str(free_port())`)."""
    settings = {"drain_s": "0", "grpc_port": "0", **settings}  # gRPC where a test asks for it
    server = Server("convserve", [PY, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1",
                                  "--port", "{port}"], "/readyz")  # fmt: skip
    env = {"BENTOML_HOME": str(home), **{f"CONVSERVE_{k.upper()}": v for k, v in settings.items()}}
    try:
        # Started from the log's folder, not the repository: the service starts from anywhere.
        return start(server, log_path, env=env, cwd=log_path.parent, timeout=120)
    except NotReady as exc:
        raise AssertionError(str(exc)) from None


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 120) -> None:
    """Until `url`/readyz answers 200; fails with the server's log if it exits or times out."""
    from convserve.loadtest.processes import wait_ready as ready

    try:
        ready(proc, f"{url}/readyz", log_path, timeout)
    except NotReady as exc:
        raise AssertionError(str(exc)) from None


def stop_server(proc: subprocess.Popen) -> int:
    return stop(proc)
