"""Hot reload: build a new snapshot from routes.yaml and swap it in whole, or keep the old.

Triggers: a change under the file's directory (watchfiles; this catches in-place writes,
an editor's write-to-temp-and-rename, and Kubernetes' ``..data`` symlink swap), and SIGHUP.
The file is re-read and hashed; an unchanged hash is a no-op. A file that fails to parse
or validate is refused with one logged error naming the line, and the last good snapshot
keeps serving. DNS backends are re-resolved every ``dns_refresh`` under the same snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from watchfiles import awatch

from router import snapshot
from router.config import ConfigError, HealthChecks, OutlierDetection, RoutesConfig, load_file
from router.discovery import Resolver, apply_limits
from router.endpoint import EndpointRegistry
from router.snapshot import Snapshot

log = logging.getLogger("routeyard.reload")


class ConfigHolder:
    """Owns the current snapshot of one worker process."""

    def __init__(self, path: str | Path, registry: EndpointRegistry | None = None) -> None:
        self.path = Path(path)
        self.registry = registry or EndpointRegistry()
        self.resolver = Resolver()
        self.reloads = {"ok": 0, "error": 0, "unchanged": 0}
        self.last_error: str | None = None
        self.tasks: set[asyncio.Task[object]] = set()
        self._lock = asyncio.Lock()
        self.current: Snapshot
        #: Told every load: (result, snapshot now served); result is None for the first
        #: load, else "ok", "error" or "unchanged" (metrics and the batch service listen).
        self.listeners: list[Callable[[str | None, Snapshot], None]] = []

    def _loaded(self, result: str | None) -> None:
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
        """Re-read the file; swap in a new snapshot if it changed and is valid."""
        async with self._lock:
            try:
                config = load_file(self.path)
            except ConfigError as exc:
                self.reloads["error"] += 1
                self.last_error = str(exc)
                log.error("config reload refused, still serving sha256 %.12s: %s",
                          self.current.config.sha256, exc)
                self._loaded("error")
                return False
            fingerprint = (config.sha256, config.auth.fingerprint if config.auth else None)
            if fingerprint == self.current.fingerprint:
                self.reloads["unchanged"] += 1
                self._loaded("unchanged")
                return False
            self.current = await snapshot.build(config, self.registry, self.resolver)
            self.reloads["ok"] += 1
            self.last_error = None
            self._loaded("ok")
            log.info("config reloaded: sha256 %.12s, %d models",
                     config.sha256, len(config.models))
            return True

    def watched(self) -> set[Path]:
        """The directories to watch: the routes file's, and those of the key files its
        ``auth:`` block reads (a Secret volume is usually mounted apart)."""
        auth = self.current.config.auth
        files = [self.path, *(auth.watch_paths if auth else ())]
        return {f.absolute().parent for f in files}

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
                            model.cluster.set_members(members)
                apply_limits(m.cluster for m in current.models.values())
                self.registry.retain(current.endpoint_keys())

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_sighup() -> None:
            task = loop.create_task(self.reload())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)

    def close(self) -> None:
        self.registry.close()
