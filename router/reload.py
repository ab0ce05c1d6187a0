"""Hot reload: build a new snapshot from routes.yaml and swap it in whole, or keep the old.

Triggers: a change under the file's directory (watchfiles; this catches in-place writes,
an editor's write-to-temp-and-rename, and Kubernetes' ``..data`` symlink swap), and SIGHUP.
The file is re-read and hashed; an unchanged hash is a no-op. A file that fails to parse
or validate is refused with one logged error naming the line, and the last good snapshot
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from watchfiles import awatch

from router import snapshot
from router.cluster import EndpointRegistry
from router.config import ConfigError, load_file
from router.snapshot import Snapshot

log = logging.getLogger("routeyard.reload")


class ConfigHolder:
    """Owns the current snapshot of one worker process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.registry = EndpointRegistry()
        self.current: Snapshot = snapshot.build(load_file(self.path), self.registry)
        self.reloads = {"ok": 0, "error": 0, "unchanged": 0}
        self.last_error: str | None = None

    def reload(self) -> bool:
        """Re-read the file; swap in a new snapshot if it changed and is valid."""
        try:
            config = load_file(self.path)
        except ConfigError as exc:
            self.reloads["error"] += 1
            self.last_error = str(exc)
            log.error("config reload refused, still serving sha256 %.12s: %s",
                      self.current.config.sha256, exc)
            return False
        if config.sha256 == self.current.config.sha256:
            self.reloads["unchanged"] += 1
            return False
        self.current = snapshot.build(config, self.registry)
        self.reloads["ok"] += 1
        self.last_error = None
        log.info("config reloaded: sha256 %.12s, %d models", config.sha256, len(config.models))
        return True

    async def watch(self) -> None:
        """Reload on every change in the file's directory, until cancelled."""
        directory = self.path.resolve().parent if not self.path.is_symlink() else self.path.parent
        async for _changes in awatch(directory, debounce=200, step=50, recursive=True):
            self.reload()

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)

    def close(self) -> None:
        self.registry.close()
