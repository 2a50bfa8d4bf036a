"""Hostile and unusual uploads to /v1/images/edits (issue 30, finding 6): the request's decoded pixels are bounded
and decided from the headers before anything is decoded; decoding is charged to admission and runs within the
request's timeout; odd modes (16-bit RGB, CMYK, palette transparency), EXIF orientation and animated pictures.
Light: a backend that runs nothing (tests/recording_backend.py), pictures of a few pixels."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

import lightray.images
from lightray.images import ImageLimits, load_edit_inputs, open_image, probe_uploads, to_rgb
from lightray.errors import RequestError
from recording_backend import recording_app
from serve_app.admission import pixel_work, request_work
from serve_app.errors import http_status
from serve_app.settings import ServiceSettings
from testing.images import encoded, header_only_png, png16


def openai_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


# ------------------------------------------------------------------------------------- the pixel budget

def test_the_request_pixel_budget_is_decided_from_the_headers_and_names_the_upload_past_it():
    limits = ImageLimits(max_pixels=4096 * 4096, max_request_pixels=24 * 1024 * 1024)
    image, mask = header_only_png(4000, 4000), header_only_png(4000, 4000)
    with pytest.raises(RequestError) as refused:
        load_edit_inputs(image, mask, limits)
    assert (refused.value.param == "mask" and refused.value.code == "image_too_large"
            and http_status(refused.value) == 400)
    # An instruction edit's pictures count together too; the one past the budget is named.
    with pytest.raises(RequestError) as refused:
        probe_uploads([("image[0]", header_only_png(3000, 3000)), ("image[1]", header_only_png(3000, 3000)),
                       ("image[2]", header_only_png(3000, 3000))], limits)
    assert refused.value.param == "image[2]"
    # Within the budget the headers pass, and nothing has been decoded yet (these carry no pixel data).
    assert [u.pixels for u in probe_uploads([("image", image)], limits)] == [16_000_000]


@pytest.fixture(scope="module")
def app(preset):
    yield from recording_app(preset, ServiceSettings(
        preset=preset.model_dump(), auth_enabled=False, max_request_image_pixels=256 * 256, max_admitted_work=1000,
        request_timeout_s=30))


def _edit(client, image: bytes, mask: bytes | None = None, **fields):
    files = {"image": ("in.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return client.post("/v1/images/edits", data={"prompt": "a blue square", "num_inference_steps": "2", **fields},
                       files=files)


def test_an_edit_past_the_pixel_budget_is_a_400_naming_the_mask_before_decoding(app, monkeypatch):
    client, backend = app
    decoded = []
    monkeypatch.setattr(lightray.images, "to_rgb", lambda im: decoded.append(im) or to_rgb(im))
    r = _edit(client, header_only_png(200, 200), header_only_png(200, 200))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "mask" and r.json()["error"]["code"] == "image_too_large"
    assert not decoded


def test_decoding_and_composing_are_charged_to_admission(app, monkeypatch):
    """An inpainting edit holds its uploads' decoding (image + mask pixels) and its outputs' composition on top of
    its denoising work, while the backend runs it."""
    client, backend = app
    limit = client.app.state.admission
    held = []

    async def edit(spec, image, mask=None):
        held.append(limit.work_in_progress)
        return backend._answer(spec)

    monkeypatch.setattr(backend, "edit", edit)
    picture = encoded(Image.new("RGB", (64, 64), "red"))
    r = _edit(client, picture, encoded(openai_mask((64, 64), (8, 8, 32, 32))), size="64x64")
    assert r.status_code == 200, r.text
    spec = backend.specs[-1]
    assert held == [pytest.approx(request_work(spec.denoise_params()) + pixel_work(2 * 64 * 64 + 64 * 64))]
    assert limit.work_in_progress == 0


def test_an_edit_whose_decoding_does_not_fit_the_admitted_work_is_503_before_decoding(app, monkeypatch):
    client, backend = app
    decoded = []
    monkeypatch.setattr(lightray.images, "to_rgb", lambda im: decoded.append(im) or to_rgb(im))
    limit = client.app.state.admission
    with limit.slot() as other:
        other.charge(limit.max_work)
        r = _edit(client, encoded(Image.new("RGB", (64, 64), "red")))
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert not decoded


def test_decoding_runs_within_the_request_timeout(preset, monkeypatch):
    def slow(image):
        time.sleep(1.0)
        return to_rgb(image)

    monkeypatch.setattr(lightray.images, "to_rgb", slow)
    for client, _ in recording_app(preset, ServiceSettings(preset=preset.model_dump(), auth_enabled=False,
                                                           request_timeout_s=0.2)):
        r = _edit(client, encoded(Image.new("RGB", (64, 64), "red")))
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout"


# ---------------------------------------------------------------------------------------------- odd modes

def test_16_bit_rgb_and_rgba_keep_their_colours():
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 65535, 32896  # 32896 = 128 * 257
    assert to_rgb(open_image(png16(rgb, 2), "image")).getpixel((0, 0)) == (255, 128, 0)
    rgba = np.zeros((4, 4, 4), np.uint16)
    rgba[..., 2], rgba[0, 0, 3], rgba[1, 1, 3] = 65535, 65535, 0
    image = to_rgb(open_image(png16(rgba, 6), "image"))
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((1, 1)) == (255, 255, 255)  # over white


def test_a_cmyk_jpeg_is_converted_to_rgb():
    red = to_rgb(open_image(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100), "image"))
    assert red.mode == "RGB" and np.abs(np.asarray(red, dtype=int) - (255, 0, 0)).max() <= 2


def test_a_palette_png_with_a_transparent_entry_is_composited_over_white():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    rgb = to_rgb(open_image(encoded(image, transparency=1), "image"))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_animated_picture_is_a_400_naming_the_field(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(RequestError) as refused:
        load_edit_inputs(encoded(Image.new("RGB", (8, 8))), data)
    assert refused.value.param == "mask" and "animated" in refused.value.message


def _with_orientation(image: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, fmt, exif=exif.tobytes())


def test_exif_orientation_turns_the_picture_and_its_mask_the_same_way():
    """A phone's JPEG is stored sideways with orientation 6 (turn 90° clockwise to show it). The picture is edited
    upright; a mask drawn over it as shown (no EXIF) lines up with it, and a mask stored sideways with the same
    orientation is turned with it."""
    stored = Image.new("RGB", (64, 32), "white")
    stored.paste((255, 0, 0), (0, 0, 16, 32))  # the stored left edge: the top once turned
    image_bytes = _with_orientation(stored, 6, "JPEG")
    upright_mask = openai_mask((32, 64), (0, 0, 32, 16))  # the top quarter, as shown
    stored_mask = openai_mask((64, 32), (0, 0, 16, 32))  # the same area, stored sideways
    image, mask = load_edit_inputs(image_bytes, encoded(upright_mask))
    assert image.size == (32, 64)
    red = np.asarray(image, dtype=int)[..., 1] < 128
    assert red[:16].all() and not red[20:].any()
    assert np.array_equal(np.asarray(mask) > 0, np.arange(64)[:, None].repeat(32, 1) < 16)
    _, same = load_edit_inputs(image_bytes, _with_orientation(stored_mask, 6, "PNG"))
    assert np.array_equal(np.asarray(same), np.asarray(mask))
    with pytest.raises(RequestError) as refused:  # sideways without the orientation: not the picture's shape
        load_edit_inputs(image_bytes, encoded(stored_mask))
    assert refused.value.param == "mask"
