"""Image bytes in and out of the service."""

from __future__ import annotations

import io

from PIL import Image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of `image`. compress_level 1: PNGs of generated images barely shrink at higher levels and the
    encode is on every request's path."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
