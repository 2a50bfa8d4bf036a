"""The fingerprint of a preset's base weights: what an adapter's deltas were computed against.

The trainer records it in every manifest (`base_fingerprint`); every process that loads an adapter for serving
computes its own and compares (`lightray.registry.check_compatible`), so an adapter trained against other weights
published under the same `base_model_id` (re-distilled, re-quantised) is refused instead of applied.

It hashes file contents, not loaded tensors: no torch, and nothing is held in memory (files are read in chunks).
The training job computes it on a worker, which has the weights anyway, and hands it to the driver with the final
checkpoint, so the head node of a RayJob never needs the model. Reading a 40 GB transformer takes a while, so each
file's digest is cached on its (path, size, mtime): in the process, and in a small JSON file
(`$LIGHTRAY_HASH_CACHE`, default ~/.cache/lightray/file-hashes.json) that later processes on the node reuse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

from lightray.config import ModelPreset, load_preset
from lightray.registry import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")
"""Files under `transformer/` that hold weights (configs and indexes are not part of the fingerprint)."""


def hash_cache_path() -> Path:
    env = os.environ.get("LIGHTRAY_HASH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lightray" / "file-hashes.json"


def _read_hash_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Hex sha256 of a file, streamed, cached on disk under its (path, size, mtime): a changed file is rehashed."""
    cache_path = hash_cache_path()
    key = f"{path}|{size}|{mtime_ns}"
    cached = _read_hash_cache(cache_path).get(key)
    if isinstance(cached, str):
        return cached
    digest = sha256_file(path)
    try:  # best effort: a read-only home only costs the next process a re-read
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_read_hash_cache(cache_path), key: digest}
        with tempfile.NamedTemporaryFile("w", dir=cache_path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(entries, tmp)
        os.replace(tmp.name, cache_path)
    except OSError:
        pass
    return digest


@functools.lru_cache(maxsize=8)
def _fingerprint_files(files: tuple[tuple[str, str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, path, size, mtime in files:
        h.update(rel.encode() + b"\0")
        h.update(bytes.fromhex(file_digest(path, size, mtime)))
    return "sha256:" + h.hexdigest()


def fingerprint_model(preset: ModelPreset | str) -> str:
    """"sha256:<hex>" over the base transformer's weight files (names and contents, in name order)."""
    preset = load_preset(preset)
    folder = preset.root / "transformer"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no transformer weights under {folder}")
    key = tuple((p.relative_to(folder).as_posix(), str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    return _fingerprint_files(key)
