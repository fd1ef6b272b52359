"""Watches a config file and hands each valid new version on; an invalid edit is logged and ignored.

A file written in place (truncated, then written) could be read half written, and half a
config is often valid YAML, with fewer runtimes and routes than the whole one. So an edit in
place is read once it has settled, its stamp (mtime, size) the same on two polls in a row, and
an empty file is refused, as the moment between a truncate and a write looks like that. A new
file renamed over the old one (a new inode: `mv`, and the symlink swap Kubernetes makes for a
ConfigMap) was complete when it appeared, and is read at once. Used by the proxy
(static_resources) and the control plane (its whole file).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable, Generic, TypeVar

log = logging.getLogger("meshproxy.config")
T = TypeVar("T")


class FileWatcher(Generic[T]):
    """Polls `path` every `interval` s; on a settled change, `load(path)` and, if it did not
    raise `errors`, `apply(result)`. The last good content stays in force; `last_error` says
    why the last edit was refused ('' once one applies), and `counted("applied" | "rejected")`
    is told of each outcome."""

    def __init__(self, path: str, load: Callable[[str], T], apply: Callable[[T], None],
                 errors: tuple[type[Exception], ...], interval: float = 1.0,
                 counted: Callable[[str], None] | None = None):
        self.path, self.load, self.apply, self.errors = path, load, apply, errors
        self.interval = interval
        self.counted = counted
        self.generation = 0
        self.rejected = 0
        self.last_error = ""
        self._seen = self._stamp()
        self._settling = None  # a new stamp seen once: read when the next poll sees it again
        self._task: asyncio.Task | None = None

    def _stamp(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="config-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - a bug applying one edit: keep watching
                self._refused(f"{type(e).__name__}: {e}")
                log.exception("config file %s failed to apply", self.path)

    def check(self) -> bool:
        """Reload if the file changed and has settled; True when a new version was applied."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            self._settling = None
            return False
        replaced = self._seen is None or stamp[2] != self._seen[2]
        if not replaced and stamp != self._settling:
            self._settling = stamp  # written in place since the last poll: it may still be
            return False
        self._seen, self._settling = stamp, None
        if stamp[1] == 0:
            self._refused("the file is empty")
            log.error("config file %s is empty; the last good version stays in force",
                      self.path)
            return False
        try:
            value = self.load(self.path)
        except self.errors as e:
            self._refused(str(e))
            log.error("config file %s rejected, the last good version stays in force: %s",
                      self.path, e)
            return False
        self.generation += 1
        self.last_error = ""
        self.apply(value)
        if self.counted is not None:
            self.counted("applied")
        log.info("config file %s applied (generation %d)", self.path, self.generation)
        return True

    def _refused(self, why: str) -> None:
        self.rejected += 1
        self.last_error = why
        if self.counted is not None:
            self.counted("rejected")
