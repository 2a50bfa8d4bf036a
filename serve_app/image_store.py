"""Keeps generated images (PNG, JPEG or WebP) for `response_format=url` and serves them back by an unguessable name
whose extension says the format.

The ingress calls `put` from its event loop, so `put` does no file I/O itself: the image is written on the store's
writer thread, and old files are expired by a timer thread rather than by listing the folder on every write.
A name `put` returned is readable through the same store at once (`get` waits for that file's write); other
ingress replicas sharing the folder see it once the write lands, within milliseconds.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lightray.contracts import FILE_EXTENSIONS, MEDIA_TYPES, OutputFormat

log = logging.getLogger(__name__)

_FORMAT_OF_EXTENSION: dict[str, OutputFormat] = {ext: fmt for fmt, ext in FILE_EXTENSIONS.items()}
_NAME = re.compile(r"^[A-Za-z0-9_-]{20,64}\.(%s)$" % "|".join(_FORMAT_OF_EXTENSION))


def media_type_of(name: str) -> str:
    """The Content-Type of a stored image, from its name's extension (a name `put` returned)."""
    return MEDIA_TYPES[_FORMAT_OF_EXTENSION[name.rsplit(".", 1)[-1]]]


class ImageStore:
    """Image files under `root`, named by `put`, kept for `ttl_s` and at most `max_files` of them after each sweep
    (every `sweep_interval_s`)."""

    def __init__(self, root: str, ttl_s: float = 3600.0, max_files: int = 2000, sweep_interval_s: float = 60.0):
        self.root = Path(root)
        self.ttl_s, self.max_files, self.sweep_interval_s = ttl_s, max_files, sweep_interval_s
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-store-writer")
        self._pending: dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def put(self, image: bytes, output_format: OutputFormat = "png") -> str:
        """Queue `image` (encoded as `output_format`) for writing and return its name, whose extension is the
        format's (no file I/O on the caller's thread)."""
        name = f"{secrets.token_urlsafe(24)}.{FILE_EXTENSIONS[output_format]}"
        future = self._writer.submit(self._write, name, image)
        with self._lock:
            self._pending[name] = future
            if self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep_periodically, name="image-store-sweeper",
                                                 daemon=True)
                self._sweeper.start()
        future.add_done_callback(lambda done: self._written(name, done))
        return name

    def get(self, name: str) -> bytes | None:
        """The image called `name` (`media_type_of(name)` says its format), or None (never stored, expired, or its
        write failed). Blocking: call it off the event loop."""
        if not _NAME.match(name):
            return None
        with self._lock:
            pending = self._pending.get(name)
        if pending is not None and pending.exception() is not None:
            return None
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def sweep(self) -> None:
        """Delete files older than `ttl_s`, then the oldest beyond `max_files`."""
        if not self.root.is_dir():  # nothing written yet
            return
        files = sorted(((p.stat().st_mtime, p) for p in self.root.iterdir() if _NAME.match(p.name)),
                       key=lambda item: item[0])
        cutoff = time.time() - self.ttl_s
        for i, (mtime, p) in enumerate(files):
            if mtime < cutoff or len(files) - i > self.max_files:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        """Finish queued writes and stop the sweeper."""
        self._stop.set()
        self._writer.shutdown(wait=True)

    def _write(self, name: str, image: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(image)
        tmp.replace(self.root / name)

    def _written(self, name: str, future: Future[None]) -> None:
        error = future.exception()
        if error is None:
            with self._lock:
                self._pending.pop(name, None)
        else:  # kept pending, so `get` answers None for it at once instead of looking for the file
            log.error("could not store image %s in %s: %s", name, self.root, error)

    def _sweep_periodically(self) -> None:
        """Sweep at start (files left by an earlier process) and then every `sweep_interval_s`."""
        while True:
            try:
                self.sweep()
            except OSError:
                log.exception("image store sweep of %s failed", self.root)
            if self._stop.wait(self.sweep_interval_s):
                return
