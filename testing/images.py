"""Hostile and unusual pictures for upload tests and benchmarks (tests/test_upload_limits.py,
benchmarks/hostile.py): PNGs written chunk by chunk, for what PIL will not write itself."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only_png(width: int, height: int, color_type: int = 6) -> bytes:
    """A PNG that declares width×height pixels and carries almost no data: decoding it fails, so an answer that
    is about its size was decided from the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def png16(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of `pixels` (uint16, H×W×C; colour type 2 RGB, 6 RGBA), which PIL cannot write itself."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
