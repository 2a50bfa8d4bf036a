"""Keeps generated PNGs for `response_format=url` and serves them back by an unguessable name."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9_-]{20,64}\.png$")


class ImageStore:
    def __init__(self, root: str, ttl_s: float = 3600.0, max_files: int = 2000):
        self.root = Path(root)
        self.ttl_s, self.max_files = ttl_s, max_files

    def put(self, png: bytes) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        self._expire()
        name = secrets.token_urlsafe(24) + ".png"
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(png)
        tmp.replace(self.root / name)
        return name

    def get(self, name: str) -> bytes | None:
        if not _NAME.match(name):
            return None
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def _expire(self) -> None:
        files = sorted(self.root.glob("*.png"), key=lambda p: p.stat().st_mtime)
        cutoff = time.time() - self.ttl_s
        for i, p in enumerate(files):
            if p.stat().st_mtime < cutoff or len(files) - i > self.max_files:
                p.unlink(missing_ok=True)
