"""Hot reload: build a new snapshot from routes.yaml and swap it in whole, or keep the old.

Triggers: a change under the file's directory (watchfiles; this catches in-place writes,
an editor's write-to-temp-and-rename, and Kubernetes' ``..data`` symlink swap), and SIGHUP.
Before reading, a reload waits until the routes file and the key files it names are
stable: their size, mtime and inode unchanged over ``SETTLE_POLLS`` polls ``SETTLE_STEP``
apart (so a slow in-place writer, whose first half may be valid YAML, is never read
halfway); files still changing after ``SETTLE_LIMIT`` refuse the reload (the writes that
go on bring another one). The file is re-read and hashed; an unchanged hash is a no-op.
A file that fails to parse or validate is refused with one logged error naming the line,
and the last good snapshot keeps serving. DNS backends are re-resolved every
``dns_refresh`` under the same snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from watchfiles import awatch

from router import snapshot
from router.config import ConfigError, HealthChecks, OutlierDetection, RoutesConfig, load_file
from router.discovery import Resolver, apply_limits
from router.endpoint import Endpoint, EndpointRegistry, Member
from router.snapshot import Snapshot

if TYPE_CHECKING:
    from router.metrics import ModelSample

log = logging.getLogger("routeyard.reload")

#: A reload reads files that kept their size, mtime and inode for ``SETTLE_POLLS`` polls
#: ``SETTLE_STEP`` seconds apart, waiting at most ``SETTLE_LIMIT`` seconds for that.
SETTLE_STEP = 0.05
SETTLE_POLLS = 4
SETTLE_LIMIT = 3.0

#: How many loads ``ConfigHolder.history`` keeps.
HISTORY = 10

#: (size, mtime in ns, inode) of each file, None for one that is missing.
FileStates = tuple[tuple[int, int, int] | None, ...]


def file_states(paths: Iterable[Path]) -> FileStates:
    states: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            states.append(None)
        else:
            states.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(states)


async def settled(paths: Iterable[Path], step: float = SETTLE_STEP, polls: int = SETTLE_POLLS,
                  limit: float = SETTLE_LIMIT) -> bool:
    """Wait until no file of ``paths`` changed for ``polls`` polls ``step`` s apart; False
    if they were still changing after ``limit`` s."""
    files = tuple(paths)
    deadline = time.monotonic() + limit
    last = file_states(files)
    same = 0
    while same < polls:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)
        now = file_states(files)
        same = same + 1 if now == last else 0
        last = now
    return True


class ConfigHolder:
    """Owns the current snapshot of one worker process."""

    def __init__(self, path: str | Path, registry: EndpointRegistry | None = None) -> None:
        self.path = Path(path)
        self.registry = registry or EndpointRegistry()
        self.resolver = Resolver()
        self.reloads = {"ok": 0, "error": 0, "unchanged": 0}
        #: Why the last reload was refused; None once a load succeeds (or finds the file
        #: back to the snapshot served).
        self.last_error: str | None = None
        #: The latest loads, newest last: (Unix time, result, sha256 served after it,
        #: the refusal's reason); the first load's result is "start".
        self.history: deque[tuple[float, str, str, str | None]] = deque(maxlen=HISTORY)
        self.tasks: set[asyncio.Task[object]] = set()
        self._lock = asyncio.Lock()
        #: How a reload waits for the files to stop changing (see ``settled``).
        self.settle = (SETTLE_STEP, SETTLE_POLLS, SETTLE_LIMIT)
        self.current: Snapshot
        #: Whether this process logs reload outcomes and DNS membership changes at INFO and
        #: ERROR; with several workers only one does, the others at DEBUG (``router.app``).
        self.reports = True
        #: Told every load: (result, snapshot now served); result is None for the first
        #: load, else "ok", "error" or "unchanged" (metrics and the batch service listen).
        self.listeners: list[Callable[[str | None, Snapshot], None]] = []

    def _loaded(self, result: str | None) -> None:
        self.history.append((time.time(), result or "start", self.current.config.sha256,
                             self.last_error if result == "error" else None))
        for listener in self.listeners:
            listener(result, self.current)

    async def load(self, config: RoutesConfig | None = None) -> None:
        """The first load, of ``config`` when the file was parsed already; an invalid file
        is fatal here (``ConfigError`` propagates)."""
        config = config if config is not None else load_file(self.path)
        self.current = await snapshot.build(config, self.registry, self.resolver)
        self._loaded(None)

    def health_settings(self) -> tuple[HealthChecks, OutlierDetection]:
        """The health checks and outlier detection now in force."""
        config = self.current.config
        return config.health_checks, config.outlier_detection

    async def reload(self) -> bool:
        """Re-read the file once it is stable; swap in a new snapshot if it changed and
        is valid."""
        async with self._lock:
            step, polls, limit = self.settle
            try:
                if not await settled(self._files(), step, polls, limit):
                    raise ConfigError(str(self.path), f"still being written after {limit:g} s "
                                      "(its size or mtime kept changing); not read")
                config = load_file(self.path)
            except ConfigError as exc:
                self.reloads["error"] += 1
                self.last_error = str(exc)
                log.log(logging.ERROR if self.reports else logging.DEBUG,
                        "config reload refused, still serving sha256 %.12s: %s",
                        self.current.config.sha256, exc)
                self._loaded("error")
                return False
            fingerprint = (config.sha256, config.auth.fingerprint if config.auth else None)
            if fingerprint == self.current.fingerprint:
                self.reloads["unchanged"] += 1
                self.last_error = None  # back to the file served: nothing is refused now
                self._loaded("unchanged")
                return False
            previous = self.current.config
            self.current = await snapshot.build(config, self.registry, self.resolver)
            self.reloads["ok"] += 1
            self.last_error = None
            self._loaded("ok")
            log.log(logging.INFO if self.reports else logging.DEBUG,
                    "config reloaded: sha256 %.12s, %d models; %s",
                    config.sha256, len(config.models), changes(previous, config))
            return True

    def _files(self) -> list[Path]:
        """The routes file and the key files its ``auth:`` block reads."""
        auth = self.current.config.auth
        return [self.path, *(auth.watch_paths if auth else ())]

    def watched(self) -> set[Path]:
        """The directories to watch: the routes file's, and those of the key files its
        ``auth:`` block reads (a Secret volume is usually mounted apart)."""
        return {f.absolute().parent for f in self._files()}

    def _relevant(self, _change: object, path: str) -> bool:
        """A change to a watched file, or a Kubernetes volume swap (``..data``, ``..2026_``);
        other files in the same directory (logs, editors' swap files) are ignored."""
        name = Path(path).name
        if name.startswith(".."):
            return True
        auth = self.current.config.auth
        names = {self.path.name, *(p.name for p in (auth.watch_paths if auth else ()))}
        return name in names

    async def watch(self) -> None:
        """Reload on every relevant change, until cancelled; re-arms when the set of
        watched directories changes (a key file added to ``auth:``)."""
        while True:
            directories = self.watched()
            async for _changes in awatch(*directories, watch_filter=self._relevant,
                                         debounce=200, step=50):
                await self.reload()
                if self.watched() != directories:
                    break

    async def refresh_dns(self) -> None:
        """Re-resolve DNS backends of the current snapshot, forever."""
        while True:
            await asyncio.sleep(self.current.config.dns_refresh)
            async with self._lock:
                current = self.current
                for model in current.models.values():
                    config = current.config.models[model.name]
                    if any(b.discovery == "dns" for b in config.backends):
                        members = await self.resolver.members(config, self.registry)
                        if members != list(model.cluster.members):
                            self._log_membership(model.name, model.cluster.members, members)
                            model.cluster.set_members(members)
                apply_limits(m.cluster for m in current.models.values())
                self.registry.retain(current.endpoint_keys())

    def _log_membership(self, model: str, old: Iterable[Member], new: Iterable[Member]) -> None:
        before = [m.endpoint.key for m in old]
        after = [m.endpoint.key for m in new]
        added = [k for k in after if k not in before]
        removed = [k for k in before if k not in after]
        if added or removed:
            log.log(logging.INFO if self.reports else logging.DEBUG,
                    "model %s: DNS members now %d (added: %s; removed: %s)", model, len(after),
                    ", ".join(added) or "none", ", ".join(removed) or "none")

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_sighup() -> None:
            task = loop.create_task(self.reload())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)

    def sampled(self) -> tuple[Iterable[Endpoint], list[ModelSample]]:
        """What the metrics sample at each flush (``router.metrics.Sources``): every
        endpoint, and per model its name, queue length, backends that get traffic and
        the size of its prefix index (``cache_aware``)."""
        return (self.registry.by_key.values(),
                [(m.name, len(m.cluster.waiters), m.cluster.up_count(),
                  None if (index := m.cluster.prefix_index) is None else len(index))
                 for m in self.current.models.values()])

    def close(self) -> None:
        self.registry.close()


def changes(old: RoutesConfig, new: RoutesConfig) -> str:
    """What a reload changed, for its log line: models added, removed and changed (by
    name), and the other top-level blocks that differ."""
    added = sorted(new.models.keys() - old.models.keys())
    removed = sorted(old.models.keys() - new.models.keys())
    changed = sorted(n for n in new.models.keys() & old.models.keys()
                     if new.models[n] != old.models[n])
    parts = [f"{what}: {', '.join(names)}" for what, names in
             (("added", added), ("removed", removed), ("changed", changed)) if names]
    others = [name for name in ("health_checks", "outlier_detection", "dns_refresh", "batch")
              if getattr(new, name) != getattr(old, name)]
    if (old.auth.fingerprint if old.auth else None) != (
            new.auth.fingerprint if new.auth else None):
        others.insert(0, "auth")
    if others:
        parts.append(f"also changed: {', '.join(others)}")
    return "; ".join(parts) or "no model changed"
