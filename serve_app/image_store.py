"""Keeps generated images (PNG, JPEG or WebP) for `response_format=url` and serves them back by an unguessable name
whose extension says the format.

The ingress calls `put` from its event loop, so `put` does no file I/O itself: the image is written on the store's
writer thread, and old files are expired by a timer thread rather than by listing the folder on every write.
A name `put` returned is readable through the same store at once (`get` waits for that file's write); other
ingress replicas sharing the folder see it once the write lands, within milliseconds.

Each tenant's images live in a folder of their own (`tenants/<tenant>/`; with auth off, the single local user's in
the root), so the sweep, on any replica, knows whose each file is and evicts fairly: past `max_files`, the oldest
file of the tenant holding the most goes first. One tenant's burst of `url` responses then evicts its own images,
never another tenant's while that one holds fewer: every tenant keeps at least its newest `max_files / tenants`
until their TTL. The URL names only the file, not the tenant.
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
from lightray.registry import validate_tenant

log = logging.getLogger(__name__)

_FORMAT_OF_EXTENSION: dict[str, OutputFormat] = {ext: fmt for fmt, ext in FILE_EXTENSIONS.items()}
TENANTS = "tenants"
"""The folder under the store's root that holds one folder per tenant."""
_NAME = re.compile(r"^[A-Za-z0-9_-]{20,64}\.(%s)$" % "|".join(_FORMAT_OF_EXTENSION))


def media_type_of(name: str) -> str:
    """The Content-Type of a stored image, from its name's extension (a name `put` returned)."""
    return MEDIA_TYPES[_FORMAT_OF_EXTENSION[name.rsplit(".", 1)[-1]]]


class ImageStore:
    """Image files under `root`, named by `put`, kept for `ttl_s` and at most `max_files` of them after each sweep
    (every `sweep_interval_s`), evicted per tenant fairly (above)."""

    def __init__(self, root: str, ttl_s: float = 3600.0, max_files: int = 2000, sweep_interval_s: float = 60.0):
        self.root = Path(root)
        self.ttl_s, self.max_files, self.sweep_interval_s = ttl_s, max_files, sweep_interval_s
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-store-writer")
        self._pending: dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def put(self, image: bytes, output_format: OutputFormat = "png", tenant: str | None = None) -> str:
        """Queue `image` (encoded as `output_format`) for writing as `tenant`'s (None: the single local user's)
        and return its name, whose extension is the format's (no file I/O on the caller's thread)."""
        name = f"{secrets.token_urlsafe(24)}.{FILE_EXTENSIONS[output_format]}"
        folder = self.root if tenant is None else self.root / TENANTS / validate_tenant(tenant)
        future = self._writer.submit(self._write, folder / name, image)
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
        for folder in self._folders():
            path = folder / name
            if path.is_file():
                return path.read_bytes()
        return None

    def sweep(self) -> None:
        """Delete files older than `ttl_s`; then, while more than `max_files` are left, the oldest file of the
        tenant with the most."""
        cutoff = time.time() - self.ttl_s
        kept: list[list[tuple[float, Path]]] = []  # per tenant, oldest first
        for folder in self._folders():
            files = []
            for path in folder.iterdir():
                if not _NAME.match(path.name):
                    continue
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:  # deleted meanwhile (another replica's sweep)
                    continue
                if mtime < cutoff:
                    path.unlink(missing_ok=True)
                else:
                    files.append((mtime, path))
            kept.append(sorted(files))
        for _ in range(sum(map(len, kept)) - self.max_files):
            largest = max(kept, key=lambda files: (len(files), -files[0][0] if files else 0.0))
            largest.pop(0)[1].unlink(missing_ok=True)

    def close(self) -> None:
        """Finish queued writes and stop the sweeper."""
        self._stop.set()
        self._writer.shutdown(wait=True)

    def _folders(self) -> list[Path]:
        """The root (the local user's images) and every tenant's folder that exists."""
        if not self.root.is_dir():  # nothing written yet
            return []
        tenants = self.root / TENANTS
        return [self.root, *(sorted(d for d in tenants.iterdir() if d.is_dir()) if tenants.is_dir() else [])]

    def _write(self, path: Path, image: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(image)
        tmp.replace(path)

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
