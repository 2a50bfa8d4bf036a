"""Image bytes in and out of the service."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import struct
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lightray.contracts import PNG, OutputEncoding
from lightray.errors import RequestError, TooLarge


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
    max_request_pixels: int = 24 * 1024 * 1024
    """Pixels one request may have decoded, every upload (image, mask, each of an instruction edit's pictures)
    counted, checked from the headers before anything is decoded."""


@contextlib.contextmanager
def _decoding(param: str, data: bytes) -> Iterator[None]:
    """Every failure of PIL while reading `data` as a RequestError naming `param`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(param, f"{param} declares too many pixels (decompression bomb)",
                           code="image_too_large") from None
    except UnidentifiedImageError:
        found = sniff_format(data)
        if found:
            raise RequestError(param, f"{param} is {found}; accepted formats are PNG, JPEG and WEBP",
                               code="unsupported_format") from None
        raise RequestError(param, f"{param} is not an image (PNG, JPEG or WEBP expected)",
                           code="invalid_image") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as e:
        raise RequestError(param, f"{param} could not be decoded ({type(e).__name__}: truncated or corrupt?)",
                           code="invalid_image") from None


@dataclasses.dataclass
class Upload:
    """An upload whose header has been checked (`probe_image`) and that is not decoded yet."""

    param: str
    data: bytes
    image: Image.Image
    """PIL's lazily opened image: format, mode and size read from the header, no pixels."""

    @property
    def pixels(self) -> int:
        return self.image.width * self.image.height


def probe_image(data: bytes, param: str, limits: ImageLimits = ImageLimits()) -> Upload:
    """Check an upload from its header alone: size in bytes, format (PNG, JPEG or WEBP), pixels and sides, and
    a still picture (an animated PNG or WEBP is a 400: which frame to edit would be a guess). Nothing is decoded."""
    if not data:
        raise RequestError(param, f"{param} is empty")
    if len(data) > limits.max_bytes:
        raise TooLarge(param, f"{param} is larger than {limits.max_bytes} bytes, the most accepted",
                       code="image_too_large")
    with _decoding(param, data):
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        width, height = image.size
        if width * height > limits.max_pixels or max(width, height) > limits.max_side:
            raise RequestError(
                param, f"{param} is {width}x{height}; at most {limits.max_pixels} pixels and "
                f"{limits.max_side} per side are accepted", code="image_too_large")
        if getattr(image, "is_animated", False):
            raise RequestError(param, f"{param} is an animated {image.format} ({image.n_frames} frames); send a "
                                      "still picture", code="unsupported_format")
    return Upload(param, data, image)


def probe_uploads(uploads: Sequence[tuple[str, bytes]], limits: ImageLimits = ImageLimits()) -> list[Upload]:
    """`probe_image` for each (param, bytes) of a request, and the request's pixel budget
    (`limits.max_request_pixels`): the upload that takes the total past it is a 400 naming it. Nothing decoded."""
    probed, total = [], 0
    for param, data in uploads:
        upload = probe_image(data, param, limits)
        total += upload.pixels
        if total > limits.max_request_pixels:
            raise RequestError(param, f"{param} takes the request's uploads to {total} pixels; at most "
                                      f"{limits.max_request_pixels} are decoded per request", code="image_too_large")
        probed.append(upload)
    return probed


def decode_upload(upload: Upload) -> Image.Image:
    """The probed upload's pixels (its first and only frame), turned upright as its EXIF orientation says."""
    with _decoding(upload.param, upload.data):
        upload.image.load()
        return ImageOps.exif_transpose(upload.image)


def open_image(data: bytes, param: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode an uploaded still PNG/JPEG/WEBP, checking its size in bytes and pixels before decoding."""
    return decode_upload(probe_image(data, param, limits))


def sniff_format(data: bytes) -> str | None:
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
    uploads = [("image", image)] + ([("mask", mask)] if mask is not None else [])
    return decode_edit_inputs(*probe_uploads(uploads, limits))


def decode_edit_inputs(image: Upload, mask: Upload | None = None) -> tuple[Image.Image, Image.Image | None]:
    """`load_edit_inputs` for probed uploads: each turned upright by its own EXIF orientation (as any viewer
    shows it, so a mask drawn over the picture as shown lines up with it), then compared in size."""
    picture = to_rgb(decode_upload(image))
    if mask is None:
        return picture, None
    m = decode_upload(mask)
    if m.size != picture.size:
        raise RequestError("mask", f"mask is {m.width}x{m.height}; it must have the image's size "
                                   f"({picture.width}x{picture.height}, upright)")
    return picture, mask_from_alpha(m)


def resize_for_model(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize as diffusers' VaeImageProcessor does before encoding (lanczos, no reducing gap), so that resizing here
    and letting the pipeline resize give the same pixels (its own resize to an unchanged size is a copy)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
