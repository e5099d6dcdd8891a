"""Process plumbing every measurement shares (the benchmark, the soak, the profile, the tests):
start a server on a free port pinned to its cores, wait until it is ready, stop it and its
children, and measure its process tree's CPU time and memory.

The machine's cores are split in two halves: the server takes the first, the load generator the
second (`cores`), so the load never competes with what it measures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]  # {port} is filled in
    health: str  # a path answering 200 once the server is ready
    env: dict[str, str] = field(default_factory=dict)
    how: str = ""  # how it is tuned, for the summary


class NotReady(RuntimeError):
    """A server exited, or did not become ready in time; its log is named."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores() -> tuple[list[str], list[str]]:
    """taskset prefixes for the server and the load generator (none on a single core)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return [], []
    half = len(cpus) // 2
    server, load = cpus[:half], cpus[half:]
    return (
        ["taskset", "-c", ",".join(map(str, server))],
        ["taskset", "-c", ",".join(map(str, load))],
    )


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    """Until `url` answers 200; `NotReady` with the log's tail if the process exits first or
    the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise NotReady(f"the server exited ({proc.returncode}); its log:\n{_tail(log)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise NotReady(f"not ready in {timeout:g} s; its log:\n{_tail(log)}")
        time.sleep(0.3)


def _tail(log: Path, chars: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-chars:]
    return "(no log)"


def start(
    server: Server,
    log: Path,
    *,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 180,
) -> tuple[subprocess.Popen, str]:
    """`server` on a free port (pinned by `prefix`), in its own session so that it and its
    children stop together; returns once its health path answers 200."""
    port = free_port()
    cmd = [*(prefix or []), *(c.replace("{port}", str(port)) for c in server.command)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd or ROOT,
            env={**os.environ, **(env or {}), **server.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url + server.health, log, timeout)
    except NotReady:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM to the server's whole session, SIGKILL after `timeout`; its exit status."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(timeout=timeout)
    except ProcessLookupError:
        return proc.wait()
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants so far."""
    total = 0.0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now."""
    total = 0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


class Sampler:
    """While in use: CPU (percent of one core, summed over the process tree, every 0.5 s), peak
    RSS, and the CPU seconds used in all (`cpu_used`, set on exit)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu: list[float] = []
        self.peak_rss = 0
        self.cpu_used = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        procs = {p.pid: p for p in _tree(self.pid)}
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(None)
        while not self._stop.wait(0.5):
            for p in _tree(self.pid):
                if p.pid not in procs:
                    procs[p.pid] = p
                    with contextlib.suppress(psutil.Error):
                        p.cpu_percent(None)
            total, rss = 0.0, 0
            for p in list(procs.values()):
                try:
                    total += p.cpu_percent(None)
                    rss += p.memory_info().rss
                except psutil.Error:
                    procs.pop(p.pid, None)
            self.cpu.append(total)
            self.peak_rss = max(self.peak_rss, rss)

    def __enter__(self) -> Sampler:
        self._cpu_at_start = tree_cpu_seconds(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_used = tree_cpu_seconds(self.pid) - self._cpu_at_start
        self._stop.set()
        self._thread.join()
