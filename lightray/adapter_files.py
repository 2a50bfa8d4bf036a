"""The local cache of fetched adapter files: one folder per adapter version and manifest checksum, bounded in bytes,
least recently used first out, never a folder in use.

`AdapterRegistry.fetch` and `checkout` download into it. Several processes on one machine (the Denoiser replicas
of a node, the CLI) share the folder, so "in use" is a lock every process sees: whoever uses an entry holds a
shared `flock` on its `.in-use` file (`hold`, released by `HeldFiles.release` or when the process dies), and
eviction takes the exclusive lock without waiting, so it passes over every entry someone holds. An evicted entry is
renamed out of the way before it is removed, and `hold` re-checks after locking that its lock file is still the
entry's, so a holder never ends up with a folder that is being removed (the usual lock-file pattern). Last use is
the lock file's modification time, set by every `hold`. Linux and macOS (`fcntl`).

This module has no Ray import.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILENAME = ".in-use"
"""In every entry: its holders' shared locks, and (its modification time) when it was last held."""
_HOLD_ATTEMPTS = 8


class HeldFiles:
    """An entry of the cache held in use: eviction passes over it until `release` (idempotent; also a context
    manager)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops this holder's shared lock

    def __enter__(self) -> "HeldFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class AdapterFileCache:
    """Entries are folders three levels under `root` (`<tenant>/<name>/<version>-<checksum>`, as
    `AdapterRegistry.cache_path` names them). `max_bytes` None: unbounded."""

    def __init__(self, root: Path, max_bytes: int | None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.root, self.max_bytes = root, max_bytes

    def hold(self, entry: Path) -> HeldFiles:
        """Create `entry` if needed and hold it (a shared lock) so that no process evicts it until released."""
        lock = entry / LOCK_FILENAME
        for _ in range(_HOLD_ATTEMPTS):
            try:
                entry.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # evicted between the two calls: again
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _same_file(lock, fd):
                os.utime(lock)  # last use, for the LRU order
                return HeldFiles(entry, fd)
            os.close(fd)  # evicted before we locked: again, with a fresh folder
        raise OSError(f"could not hold adapter cache entry {entry}: it kept being evicted")

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every entry, least recently used first."""
        out = []
        for lock in self.root.glob(f"*/*/*/{LOCK_FILENAME}"):
            try:
                used = lock.stat().st_mtime
            except FileNotFoundError:
                continue
            out.append((used, _folder_bytes(lock.parent), lock.parent))
        return sorted(out)

    def trim(self) -> list[Path]:
        """Evict least recently used entries nobody holds until the cache fits `max_bytes`; the folders evicted.
        Entries in use are passed over, so the cache can stay above the bound while they are held."""
        if self.max_bytes is None:
            return []
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        evicted = []
        for _, size, folder in entries:
            if total <= self.max_bytes:
                break
            if self._evict(folder):
                total -= size
                evicted.append(folder)
        if evicted:
            log.info("adapter file cache: evicted %d entries, %d bytes left (bound %d)", len(evicted), total,
                     self.max_bytes)
        return evicted

    def _evict(self, entry: Path) -> bool:
        lock = entry / LOCK_FILENAME
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # held
            if not _same_file(lock, fd):
                return False  # evicted by someone else meanwhile
            trash = self.root / f".evicted-{secrets.token_hex(6)}"
            os.rename(entry, trash)
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        return True


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _folder_bytes(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                continue
    return total
