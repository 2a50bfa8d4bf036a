"""The fingerprint of a preset's base weights: what an adapter's deltas were computed against.

The trainer records it in every manifest (`base_fingerprint`); every process that loads an adapter for serving
computes its own and compares (`lightray.registry.check_compatible`), so an adapter trained against other weights
published under the same `base_model_id` (re-distilled, re-quantised) is refused instead of applied.

It hashes file contents, not loaded tensors, so it needs no torch. The cost is one read of the transformer's
weight files per process (milliseconds for the embedded model; for a 40 GB transformer, the time to read it
once, paid by the first adapter load), cached on each file's (path, size, mtime).
"""

from __future__ import annotations

import functools
import hashlib

from lightray.config import ModelPreset, load_preset
from lightray.registry import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")
"""Files under `transformer/` that hold weights (configs and indexes are not part of the fingerprint)."""


@functools.lru_cache(maxsize=8)
def _fingerprint_files(files: tuple[tuple[str, str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, path, _size, _mtime in files:
        h.update(rel.encode() + b"\0")
        h.update(bytes.fromhex(sha256_file(path)))
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
