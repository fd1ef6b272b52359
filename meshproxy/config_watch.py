"""Watches a config file and hands each valid new version on; an invalid edit is logged and ignored."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable, Generic, TypeVar

log = logging.getLogger("meshproxy.config")
T = TypeVar("T")


class FileWatcher(Generic[T]):
    """Polls `path` (mtime, size, inode) every `interval` s; on a change, `load(path)` and,
    if it did not raise `errors`, `apply(result)`. The last good content stays in force."""

    def __init__(self, path: str, load: Callable[[str], T], apply: Callable[[T], None],
                 errors: tuple[type[Exception], ...], interval: float = 1.0):
        self.path, self.load, self.apply, self.errors = path, load, apply, errors
        self.interval = interval
        self.generation = 0
        self.rejected = 0
        self._seen = self._stamp()
        self._task: asyncio.Task | None = None

    def _stamp(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a bug applying one edit: keep watching
                self.rejected += 1
                log.exception("config file %s failed to apply", self.path)

    def check(self) -> bool:
        """Reload if the file changed; True when a new version was applied."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            value = self.load(self.path)
        except self.errors as e:
            self.rejected += 1
            log.error("config file %s rejected, the last good version stays in force: %s",
                      self.path, e)
            return False
        self.generation += 1
        self.apply(value)
        log.info("config file %s applied (generation %d)", self.path, self.generation)
        return True
