"""What sizes are served: the embedded model draws exactly the sizes it was trained at (128x128 by default) and
refuses every other with a 400 naming `size`; `/v1/models` lists them; an edit without `size` works at the served
size nearest its input. A preset without a size list (the real model) accepts a range instead.

The pictures themselves are checked at every served size in tests/test_embedded_model.py."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from lightray.config import ModelPreset
from lightray.images import encode_png
from lightray.world.train import DEFAULT_SIZE, TRAIN_SIZES
from recording_backend import recording_app
from serve_app.settings import ServiceSettings

PROMPT = "a red circle on the left, white background"


def _client(preset: ModelPreset, tmp_path_factory):
    settings = ServiceSettings(preset=preset.model_dump(), registry=str(tmp_path_factory.mktemp("registry")),
                               auth_enabled=False, image_store_dir=str(tmp_path_factory.mktemp("images")))
    return recording_app(preset, settings)


@pytest.fixture(scope="module")
def recording(preset, tmp_path_factory):
    yield from _client(preset, tmp_path_factory)


@pytest.fixture(scope="module")
def range_preset(preset) -> ModelPreset:
    """The embedded preset as a range of sizes (the real model's kind of preset), for the rules it has."""
    return ModelPreset.model_validate({**preset.model_dump(), "sizes": None, "min_side": 32, "max_side": 256,
                                       "max_pixels": 128 * 128, "max_aspect_ratio": 2.0})


@pytest.fixture(scope="module")
def recording_range(range_preset, tmp_path_factory):
    yield from _client(range_preset, tmp_path_factory)


def test_the_preset_serves_exactly_the_trained_sizes(preset):
    assert preset.sizes == list(TRAIN_SIZES)
    assert tuple(preset.default_size) == DEFAULT_SIZE == (128, 128)
    training = json.loads((preset.root / "training.json").read_text())
    assert [tuple(s) for s in training["sizes"]] == list(TRAIN_SIZES)  # the shipped weights were trained at them


def test_default_size_is_128(recording):
    client, backend = recording
    r = client.post("/v1/images/generations", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    assert (backend.specs[-1].width, backend.specs[-1].height) == (128, 128)


@pytest.mark.parametrize("size", [f"{w}x{h}" for w, h in TRAIN_SIZES])
def test_every_served_size_is_accepted(recording, size):
    client, backend = recording
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": size})
    assert r.status_code == 200, r.text
    assert f"{backend.specs[-1].width}x{backend.specs[-1].height}" == size


@pytest.mark.parametrize("size", ["32x32", "160x160", "256x128", "128x256", "64x96", "224x224", "48x48", "100x100",
                                  "1024x1024", "127x128"])
def test_sizes_not_trained_are_refused_listing_the_served_ones(recording, size):
    client, backend = recording
    before = len(backend.specs)
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": size})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "size"
    assert size in error["message"] and all(f"{w}x{h}" in error["message"] for w, h in TRAIN_SIZES)
    assert len(backend.specs) == before  # refused before any work


def test_model_cards_list_exactly_the_served_sizes(recording, preset):
    client, _ = recording
    cards = client.get("/v1/models").json()["data"]
    assert {c["id"] for c in cards} == set(preset.model_ids)
    for card in cards:
        assert card["sizes_exact"] is True and card["default_size"] == "128x128"
        assert sorted(card["sizes"]) == sorted(f"{w}x{h}" for w, h in TRAIN_SIZES)
        assert "exactly" in card["size_rule"]


def _png(size: tuple[int, int]) -> bytes:
    return encode_png(Image.new("RGB", size, "white"))


@pytest.mark.parametrize("image_size, served", [
    ((128, 128), (128, 128)),   # served: kept
    ((100, 100), (96, 96)),     # square, between 96 and 128 pixels-wise: the nearer
    ((512, 512), (256, 256)),   # larger than any: the largest of its aspect ratio
    ((640, 480), (192, 128)),   # 4:3 -> 3:2, the nearest aspect ratio served
    ((300, 100), (128, 64)),    # 3:1 -> 2:1
    ((90, 160), (64, 128)),     # 9:16 -> 1:2 (0.5 is nearer 0.5625 than 2:3 on a log scale)
])
def test_an_edit_without_size_works_at_the_nearest_served_size(recording, image_size, served):
    client, backend = recording
    r = client.post("/v1/images/edits", data={"prompt": PROMPT},
                    files={"image": ("in.png", _png(image_size), "image/png")})
    assert r.status_code == 200, r.text
    assert (backend.specs[-1].width, backend.specs[-1].height) == served
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert out.size == served


def test_an_edit_with_an_unserved_size_is_refused(recording):
    client, _ = recording
    r = client.post("/v1/images/edits", data={"prompt": PROMPT, "size": "160x160"},
                    files={"image": ("in.png", _png((128, 128)), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"


@pytest.mark.parametrize("size, ok", [("128x128", True), ("96x48", True), ("48x96", True), ("128x32", False),
                                      ("256x256", False), ("16x16", False), ("272x64", False), ("200x96", False)])
def test_a_range_preset_checks_sides_pixels_and_aspect_ratio(recording_range, size, ok):
    client, _ = recording_range
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": size})
    assert (r.status_code == 200) is ok, r.text
    if not ok:
        assert r.json()["error"]["param"] == "size"


def test_a_range_preset_card_states_its_rule(recording_range, range_preset):
    client, _ = recording_range
    card = client.get("/v1/models").json()["data"][0]
    assert card["sizes_exact"] is False
    assert "aspect ratio at most 2:1" in card["size_rule"] and "16384 pixels" in card["size_rule"]
    for size in card["sizes"]:
        assert range_preset.size_refusal(*map(int, size.split("x"))) is None


@pytest.mark.parametrize("image_size, status", [((128, 128), 200), ((72, 64), 400), ((512, 512), 400)])
def test_a_range_preset_refuses_an_edit_input_outside_the_range(recording_range, image_size, status):
    """Without `size` the output takes the input's size, so one the preset does not accept is refused (naming
    `image`, and saying to pass `size`) rather than resized to a guess."""
    client, _ = recording_range
    r = client.post("/v1/images/edits", data={"prompt": PROMPT},
                    files={"image": ("in.png", _png(image_size), "image/png")})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "image" and "size" in r.json()["error"]["message"]


def test_preset_validation_rejects_an_unserved_default():
    with pytest.raises(ValueError, match="default_size"):
        ModelPreset.model_validate({"name": "x", "base_model_id": "x", "path": "x", "variants": [{"id": "v"}],
                                    "sizes": [[64, 64]], "default_size": [128, 128]})
