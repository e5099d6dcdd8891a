"""Model control at run time: load, reload and unload while serving (the repository API).

A load verifies as start-up does (files against their checksums, the spec inside the ONNX
file, the known answer), warms the model up, and only then swaps it in, in one assignment on
the event loop: requests that resolved the old version before the swap finish on it (each
served model counts the requests holding it), later ones reach the new one, and the old one is
freed once its last request is answered. A load that fails leaves what is served unchanged and
says why. An unload stops resolving the model at once, waits for its requests, then frees it.

Several workers: each worker serves its own copy of the models, and a request reaches one of
them. The worker that applied a change records the wanted state (each model's version, or
unloaded) in a small JSON file shared by the workers of one `bentoml serve` (beside the store,
named after their parent process), and every worker looks at the file on its clock's tick
(`POLL_S`) and applies what differs; all agree within a tick plus one load.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import json
import logging
import os
import tempfile
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from convserve.errors import ConvserveError, ErrorCode
from convserve.service.clock import Clock
from convserve.service.loading import ServedModel, StartupError, load_one, warm_up
from convserve.service.metrics import ServiceMetrics
from convserve.service.settings import ServiceSettings
from convserve.service.tasks.base import Task
from convserve.spec import TaskName

if TYPE_CHECKING:
    from convserve.service.server import Models
from convserve.store import StoreError, list_versions, stored_names

log = logging.getLogger("convserve.control")
POLL_S = 0.5  # how often a worker looks for another worker's change
DRAIN_POLL_S = 0.01


def shared_state() -> Path:
    """The wanted-state file of this `bentoml serve`'s workers: named after their parent
    process and its start time, so a later server reusing the process id starts afresh."""
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:  # no /proc (not Linux): the process id alone
        started = "0"
    return Path(tempfile.gettempdir()) / f"convserve-control-{parent}-{started}.json"


def rss_bytes() -> int:
    """This process's resident memory (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Control:
    """Load, reload and unload, for the repository API and the other workers' changes."""

    settings: ServiceSettings
    models: Models
    tasks: Mapping[TaskName, Task]
    clock: Clock
    metrics: ServiceMetrics | None
    shared: Path  # the workers' wanted state
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _seen: float = 0.0  # the shared file's mtime last applied

    def index(self) -> list[dict[str, str]]:
        """Every model version in the store, READY when served, else UNAVAILABLE."""
        served = {(m.stored.name, m.stored.version) for m in self.models.all}
        out: list[dict[str, str]] = []
        for name in stored_names():
            for stored in list_versions(name):
                state = "READY" if (name, stored.version) in served else "UNAVAILABLE"
                out.append({"name": name, "version": stored.version, "state": state,
                            "reason": ""})  # fmt: skip
        return out

    async def load(self, name: str, version: str | None, *, share: bool = True) -> None:
        async with self._lock:
            served = await self._open(name, version)
            old = self.models.replace(served)
            log.info("loaded %s (replacing %s)", served.stored.tag,
                     ", ".join(m.stored.tag for m in old) or "nothing")  # fmt: skip
            if share:
                self._share(name, served.stored.version)
        await self._retire(old)

    async def unload(self, name: str, *, share: bool = True) -> None:
        async with self._lock:
            before = rss_bytes()
            old = self.models.remove(name)
            if share:
                self._share(name, None)
        await self._retire(old)
        log.info("unloaded %s; RSS %+.1f MB", name, (rss_bytes() - before) / 1e6)

    async def _open(self, name: str, version: str | None) -> ServedModel:
        tag = f"{name}:{version or 'latest'}"
        loop = asyncio.get_running_loop()
        try:
            served = await loop.run_in_executor(
                None, load_one, tag, self.settings, self.metrics, self.tasks, self.clock
            )
        except (StartupError, StoreError) as exc:
            message = str(exc).replace("start-up self-test", "self-test")
            raise ConvserveError(ErrorCode.LOAD_FAILED, f"not loaded: {message}") from None
        await warm_up([served], self.settings)
        return served

    async def _retire(self, old: list[ServedModel]) -> None:
        """Each of `old` freed once the requests that reached it are answered."""
        for served in old:
            while served.active or served.batcher.pending_images:
                await asyncio.sleep(DRAIN_POLL_S)
            served.batcher.shutdown()
        if old:
            old.clear()
            gc.collect()

    # --- the other workers -----------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Generator[dict[str, str | None]]:
        """The wanted state, read and written under a lock shared with the other workers."""
        self.shared.parent.mkdir(parents=True, exist_ok=True)
        with open(self.shared.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state: dict[str, str | None] = (
                    json.loads(self.shared.read_text()) if self.shared.exists() else {}
                )
                yield state
                staged = self.shared.with_suffix(".tmp")
                staged.write_text(json.dumps(state))
                staged.replace(self.shared)
                self._seen = self.shared.stat().st_mtime
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _share(self, name: str, version: str | None) -> None:
        with self._locked() as state:
            state[name] = version

    async def follow(self) -> None:
        """Every POLL_S, apply what another worker changed (and, when this worker starts after
        changes were made, catch up with them)."""
        while True:
            try:
                mtime = self.shared.stat().st_mtime
            except FileNotFoundError:
                mtime = self._seen
            if mtime != self._seen and not self._lock.locked():
                self._seen = mtime
                await self._follow(json.loads(self.shared.read_text()))
            await asyncio.sleep(POLL_S)

    async def _follow(self, wanted: dict[str, str | None]) -> None:
        for name, version in wanted.items():
            try:
                if version is None:
                    if self.models.versions(name):
                        await self.unload(name, share=False)
                elif self.models.versions(name) != [version]:
                    await self.load(name, version, share=False)
            except ConvserveError as exc:  # it loaded in the worker that shared it
                log.error("could not follow %s's change: %s", name, exc.message)
