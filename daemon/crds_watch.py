"""The operational CRDS context of a local cache, and a watcher for its changes.

``crds sync`` (and :func:`calstream.steps.synth.crds_cache.sync_operational_context`) rewrites
``$CRDS_PATH/config/jwst/server_config`` atomically (temp file + rename) when a new context becomes
operational. The watcher polls the file's identity (inode, size, mtime) — cheap, and it works on
network file systems where inotify does not — and reads the new operational context from it the
way crds does (``ast.literal_eval`` of the dict; crds' ``load_server_info`` re-reads it on every call
too, but importing crds would cost the daemon's main process memory it does not otherwise need).
"""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path
from typing import Callable

import structlog

log = structlog.get_logger("calstream.daemon.crds_watch")

OBSERVATORY = "jwst"


def server_config_path(crds_path: str | os.PathLike) -> Path:
    return Path(crds_path) / "config" / OBSERVATORY / "server_config"


def operational_context(crds_path: str | os.PathLike) -> str | None:
    """The cache's operational context (None when the cache has no readable server_config)."""
    path = server_config_path(crds_path)
    try:
        info = ast.literal_eval(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    context = info.get("operational_context") or info.get("latest_context")
    return str(context) if context else None


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class CacheWatcher:
    """Calls ``on_change(context)`` when the cache's operational context changes (thread)."""

    def __init__(self, crds_path: str | os.PathLike, on_change: Callable[[str], None], *,
                 interval: float = 1.0, current: str | None = None) -> None:
        self.crds_path = Path(crds_path)
        self.path = server_config_path(crds_path)
        self.on_change = on_change
        self.interval = interval
        self.current = current if current is not None else operational_context(crds_path)
        self._seen = _identity(self.path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="crds-cache-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def poll(self) -> str | None:
        """Check once; returns the new context when it changed."""
        identity = _identity(self.path)
        if identity == self._seen:
            return None
        self._seen = identity
        context = operational_context(self.crds_path)
        if not context or context == self.current:
            return None
        log.info("CRDS cache: new operational context", context=context, previous=self.current,
                 server_config=str(self.path))
        self.current = context
        self.on_change(context)
        return context

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:
                log.exception("CRDS cache watch failed", server_config=str(self.path))


__all__ = ["CacheWatcher", "operational_context", "server_config_path"]
