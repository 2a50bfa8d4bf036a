"""Image bytes in and out of the service."""

from __future__ import annotations

import dataclasses
import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lightray.contracts import PNG, OutputEncoding
from lightray.schemas import RequestError


def encode_image(image: Image.Image, encoding: OutputEncoding = PNG) -> bytes:
    """`image` as `encoding` asks (OpenAI's `output_format` and `output_compression`), the one encoder of the
    service's outputs. PNG at compress_level 1: PNGs of generated images barely shrink at higher levels and the
    encode is on every request's path. JPEG and WebP at quality = `encoding.compression` (PIL's scale, 0-100)."""
    buf = io.BytesIO()
    if encoding.format == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif encoding.format == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=encoding.compression)
    else:
        image.save(buf, format="WEBP", quality=encoding.compression)
    return buf.getvalue()


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of `image` (`encode_image` with the default encoding)."""
    return encode_image(image, PNG)


# ------------------------------------------------------------------------------- image inputs (edits)
# Uploads are untrusted: every failure is a RequestError naming the field ("image" or "mask"), and nothing is
# decoded before its header has been checked against the limits (a small file can declare a huge canvas).

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be. The input may be larger than the model's output limits when the request
    asks for a `size` to resize it to."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 8192


def open_image(data: bytes, param: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode an uploaded PNG/JPEG/WEBP (first frame), checking its size in bytes and pixels before decoding."""
    if not data:
        raise RequestError(param, f"{param} is empty")
    if len(data) > limits.max_bytes:
        raise RequestError(param, f"{param} is larger than {limits.max_bytes} bytes, the most accepted",
                           status=413, code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels or max(width, height) > limits.max_side:
                raise RequestError(
                    param, f"{param} is {width}x{height}; at most {limits.max_pixels} pixels and "
                    f"{limits.max_side} per side are accepted", code="image_too_large")
            image.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(param, f"{param} declares too many pixels (decompression bomb)",
                           code="image_too_large") from None
    except UnidentifiedImageError:
        found = _sniff_format(data)
        if found:
            raise RequestError(param, f"{param} is {found}; accepted formats are PNG, JPEG and WEBP",
                               code="unsupported_format") from None
        raise RequestError(param, f"{param} is not an image (PNG, JPEG or WEBP expected)",
                           code="invalid_image") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as e:
        raise RequestError(param, f"{param} could not be decoded ({type(e).__name__}: truncated or corrupt?)",
                           code="invalid_image") from None
    return ImageOps.exif_transpose(image)


def _sniff_format(data: bytes) -> str | None:
    """The format PIL would read `data` as, any format allowed (header only), for a precise error message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.format
    except Exception:
        return None


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
"""Modes PIL reads 16-bit grey PNGs as: their values run to 65535, and PIL's own conversion to RGB clips them at 255
(a picture comes out white), so they are scaled down to 8 bits first."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of an uploaded image; transparent areas are composited over white, 16-bit grey is scaled to 8."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def mask_from_alpha(mask: Image.Image, param: str = "mask") -> Image.Image:
    """OpenAI's mask convention → diffusers': fully transparent pixels (alpha == 0) mark the area to edit; the
    result is an "L" image, 255 there and 0 elsewhere (diffusers' white = repaint)."""
    if not mask.has_transparency_data:
        raise RequestError(param, f"{param} has no alpha channel: its fully transparent pixels (alpha 0) mark "
                                  f"the area to edit, so send a PNG or WEBP with transparency")
    edit = mask.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0)
    if edit.getbbox() is None:
        raise RequestError(param, f"{param} has no fully transparent pixels: it marks nothing to edit")
    return edit


def load_edit_inputs(image: bytes, mask: bytes | None = None,
                     limits: ImageLimits = ImageLimits()) -> tuple[Image.Image, Image.Image | None]:
    """Uploaded image (and optional OpenAI-style mask) → (RGB image, "L" mask with 255 = edit, or None)."""
    picture = to_rgb(open_image(image, "image", limits))
    if mask is None:
        return picture, None
    m = open_image(mask, "mask", limits)
    if m.size != picture.size:
        raise RequestError("mask", f"mask is {m.width}x{m.height}; it must have the image's size "
                                   f"({picture.width}x{picture.height})")
    return picture, mask_from_alpha(m)


def resize_for_model(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize as diffusers' VaeImageProcessor does before encoding (lanczos, no reducing gap), so that resizing here
    and letting the pipeline resize give the same pixels (its own resize to an unchanged size is a copy)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
