"""`stream: true` through the real FastAPI app over the in-process pipeline (LocalBackend): OpenAI's event types and
fields, previews spread over the steps, per-image events for n > 1, the completed image equal to the
non-streaming one, progress events, validation before any event, and failures as an error event."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from openai.types import ImageEditCompletedEvent, ImageGenCompletedEvent, ImageGenPartialImageEvent
from PIL import Image

from lightray.edits import overlay_mask
from lightray.schemas import ImageGenerationRequest, parse_size, preview_steps
from lightray.world.shapes import Scene, render
from serve_app.api import create_app
from serve_app.backend import StepUpdate
from serve_app.settings import ServiceSettings
from sse import parse_sse, pixels

PROMPT = "a red circle on the left, white background"


def stream(api_client, path: str = "/v1/images/generations", **kwargs) -> list[tuple[str | None, dict]]:
    """POST and parse the event stream (`kwargs`: httpx's json= or data=/files=)."""
    r = api_client.post(path, **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return parse_sse(r.text)


def test_preview_steps_are_spread_over_the_run_and_never_the_last():
    assert preview_steps(4, 3) == (1, 2, 3)
    assert preview_steps(8, 3) == (2, 4, 6)
    assert preview_steps(30, 3) == (8, 15, 22)
    assert preview_steps(4, 1) == (2,)
    assert preview_steps(4, 0) == ()
    assert preview_steps(2, 3) == (1,)  # a run of T steps has at most T - 1 previews
    assert preview_steps(1, 3) == ()


def test_a_stream_has_openai_events_per_image_and_equals_the_plain_response(api_client):
    body = {"prompt": PROMPT, "n": 2, "seed": 21}  # the default size
    plain = api_client.post("/v1/images/generations", json=body).json()["data"]
    events = stream(api_client, json={**body, "stream": True, "partial_images": 3})

    for name, data in events:
        assert name == data["type"]  # every event is named after its type, as OpenAI's streams are
    partial = [d for _, d in events if d["type"] == "image_generation.partial_image"]
    completed = [d for _, d in events if d["type"] == "image_generation.completed"]
    progress = [d for _, d in events if d["type"] == "lightray.progress"]
    assert [d["type"] for _, d in events][-2:] == ["image_generation.completed"] * 2  # the images come last

    # Lightning 4 with 3 previews: after steps 1, 2 and 3, for each of the two images, in order.
    for index, seed in ((0, 21), (1, 22)):
        mine = [d for d in partial if d["image_index"] == index]
        assert [d["partial_image_index"] for d in mine] == [0, 1, 2]
        assert {d["seed"] for d in mine} == {seed}
        steps = [d["step"] for d in progress if d["image_index"] == index]
        assert steps == [1, 2, 3, 4] and {d["total_steps"] for d in progress} == {4}
    for d in partial:
        ImageGenPartialImageEvent.model_validate(d)  # OpenAI's own types accept every field
        assert d["size"] == "128x128" and d["output_format"] == "png"  # the requested image's size
        assert pixels(d["b64_json"]).shape == (32, 32, 3)  # a fast preview: a quarter of the side
    for d in completed:
        ImageGenCompletedEvent.model_validate(d)
    assert [(d["image_index"], d["seed"]) for d in completed] == [(0, 21), (1, 22)]
    # The completed image is the non-streaming request's image, byte for byte.
    assert [d["b64_json"] for d in completed] == [d["b64_json"] for d in plain]
    # Previews are x0-predictions from before the end: not the final image, and getting closer to it.
    for index in (0, 1):
        final = pixels(completed[index]["b64_json"]).reshape(32, 4, 32, 4, 3).mean((1, 3))  # at the preview's size
        gaps = [np.abs(pixels(d["b64_json"]) - final).mean() for d in partial if d["image_index"] == index]
        assert gaps[0] > 0 and gaps[-1] <= gaps[0]


def test_partial_images_zero_still_streams_progress_and_the_image(api_client):
    events = stream(api_client, json={"prompt": PROMPT, "size": "64x64", "seed": 3, "stream": True,
                                      "model": "lightray-shapes-lightning-8"})
    types = [d["type"] for _, d in events]
    assert "image_generation.partial_image" not in types
    assert types == ["lightray.progress"] * 8 + ["image_generation.completed"]


@pytest.mark.parametrize("field, value", [
    ("partial_images", 4), ("partial_images", -1), ("partial_images", True), ("partial_images", "many"),
    ("stream", "yes"), ("stream", 1), ("stream", "true"), ("stream", None),
])
def test_bad_stream_fields_are_a_400_naming_the_field(api_client, field, value):
    body = {"prompt": PROMPT, "stream": True, field: value}
    r = api_client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["param"] == field


def test_partial_images_without_stream_and_url_with_stream_are_refused(api_client):
    r = api_client.post("/v1/images/generations", json={"prompt": PROMPT, "partial_images": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "partial_images"
    r = api_client.post("/v1/images/generations", json={"prompt": PROMPT, "stream": True, "response_format": "url"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_an_invalid_streamed_request_is_a_json_error_before_any_event(api_client):
    r = api_client.post("/v1/images/generations", json={"prompt": " ", "stream": True, "partial_images": 2})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["param"] == "prompt"
    r = api_client.post("/v1/images/generations", json={"prompt": PROMPT, "stream": True, "size": "65x64"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    r = api_client.post("/v1/images/generations", json={"prompt": PROMPT, "stream": True, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_a_streamed_inpaint_sends_image_edit_events_equal_to_the_plain_edit(api_client):
    picture = _png(render(Scene("red", "circle", "left", "white"), 64))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent: repaint the left half
    files = {"image": ("in.png", picture, "image/png"), "mask": ("mask.png", _png(mask), "image/png")}
    fields = {"prompt": "a green triangle on the left, white background", "seed": "4"}
    plain = api_client.post("/v1/images/edits", data=fields, files=files)
    assert plain.status_code == 200, plain.text
    events = stream(api_client, "/v1/images/edits", files=files,
                    data={**fields, "stream": "true", "partial_images": "2"})
    types = [d["type"] for _, d in events]
    assert types.count("image_edit.partial_image") == 2 and types[-1] == "image_edit.completed"
    completed = events[-1][1]
    ImageEditCompletedEvent.model_validate(completed)
    assert completed["b64_json"] == plain.json()["data"][0]["b64_json"]
    # Previews are composed as the final image is: outside the overlay's soft edge, the input exactly.
    outside = np.asarray(overlay_mask(mask.getchannel("A").point(lambda a: 255 if a == 0 else 0), None)) == 0
    source = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"), dtype=np.int16)
    for _, d in events:
        if d["type"] == "image_edit.partial_image":
            assert np.array_equal(pixels(d["b64_json"])[outside], source[outside])


def test_a_streamed_padding_mask_crop_edit_sends_pasted_back_images_and_previews_at_the_models_pixels(api_client):
    """With `padding_mask_crop` the model works on a crop around the mask; the final image is pasted back into the
    full input, as the plain answer is. Previews are pasted back into the input scaled down to the model's pixels
    (`lightray.edits.preview_frame`), so a large picture is not recomposed and re-encoded in full per preview."""
    picture = render(Scene("red", "circle", "left", "white"), 128)
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 40, 56, 88))
    files = {"image": ("in.png", _png(picture), "image/png"), "mask": ("mask.png", _png(mask), "image/png")}
    fields = {"prompt": "a blue square on the left, white background", "seed": "5", "size": "64x64",
              "padding_mask_crop": "8"}
    plain = api_client.post("/v1/images/edits", data=fields, files=files)
    assert plain.status_code == 200, plain.text
    events = stream(api_client, "/v1/images/edits", files=files,
                    data={**fields, "stream": "true", "partial_images": "1"})
    images = [d for _, d in events if d["type"] in ("image_edit.partial_image", "image_edit.completed")]
    assert [d["type"] for d in images] == ["image_edit.partial_image", "image_edit.completed"]
    for d, side in zip(images, (64, 128)):  # the preview at the model's 64x64 pixels, the final image in full
        assert d["size"] == "128x128"
        source = np.asarray(picture.resize((side, side), Image.Resampling.BILINEAR).convert("RGB"), dtype=np.int16)
        got = pixels(d["b64_json"])
        assert got.shape == (side, side, 3)
        far = side * 80 // 128
        assert np.abs(got[:, far:] - source[:, far:]).max() == 0  # far from the mask: the input, exactly
    assert images[-1]["b64_json"] == plain.json()["data"][0]["b64_json"]


def test_a_form_stream_field_must_be_true_or_false(api_client):
    picture = _png(render(Scene("red", "circle", "left", "white"), 64))
    r = api_client.post("/v1/images/edits", data={"prompt": PROMPT, "stream": "yes"},
                        files={"image": ("in.png", picture, "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


class _FailingBackend:
    """Streams two steps, then fails as a replica would."""

    def __init__(self, preset, error: Exception):
        self.preset, self.error = preset, error

    async def generate_stream(self, spec):
        yield StepUpdate(1, 4)
        yield StepUpdate(2, 4)
        raise self.error

    async def readiness(self):
        return {}


@pytest.fixture
def failing_client(local_pipeline, tmp_path):
    def make(error: Exception) -> TestClient:
        settings = ServiceSettings(preset=local_pipeline.preset.model_dump(), registry=str(tmp_path / "registry"),
                                   image_store_dir=str(tmp_path / "images"), auth_enabled=False)
        return TestClient(create_app(_FailingBackend(local_pipeline.preset, error), settings), base_url="http://localhost")
    return make


def test_a_failure_after_the_stream_started_is_an_openai_error_event(failing_client):
    with failing_client(RuntimeError("boom: the transformer broke")) as client:
        r = client.post("/v1/images/generations", json={"prompt": PROMPT, "stream": True},
                        headers={"x-request-id": "req-42"})
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [d["type"] for _, d in events] == ["lightray.progress", "lightray.progress", "error"]
    name, error = events[-1]
    assert name == "error"
    assert error["error"]["code"] == "internal_error" and error["error"]["type"] == "server_error"
    assert "req-42" in error["error"]["message"] and "boom" not in error["error"]["message"]  # no internals leak


def test_an_unavailable_stage_mid_stream_is_an_error_event_saying_so(failing_client):
    from serve_app.errors import ServiceUnavailable

    with failing_client(ServiceUnavailable("the Denoiser stage is unavailable; retry shortly")) as client:
        r = client.post("/v1/images/generations", json={"prompt": PROMPT, "stream": True})
    error = parse_sse(r.text)[-1][1]["error"]
    assert error["code"] == "unavailable" and "Denoiser" in error["message"]


def test_closing_a_local_stream_cancels_the_engine_request(local_pipeline):
    """LocalBackend: a stream closed after its first step stops the engine run (`cancel`) within a step."""
    from lightray.contracts import DenoiseCancelled
    from lightray.schemas import ImageGenerationRequest
    from serve_app.local_backend import LocalBackend

    backend = LocalBackend(local_pipeline)
    spec = ImageGenerationRequest(prompt=PROMPT, model="lightray-shapes", num_inference_steps=100,
                                  size="256x256").resolve(local_pipeline.preset, default_seed=0)
    finished = threading.Event()
    outcome: list[BaseException | None] = []
    original = local_pipeline.generate

    def generate(*args, **kwargs):
        try:
            result = original(*args, **kwargs)
            outcome.append(None)
            return result
        except BaseException as err:
            outcome.append(err)
            raise
        finally:
            finished.set()

    async def first_step_then_close():
        items = backend.generate_stream(spec)
        first = await anext(items)
        await items.aclose()
        return first

    local_pipeline.generate = generate
    try:
        first = asyncio.run(first_step_then_close())
        assert finished.wait(60)
    finally:
        local_pipeline.generate = original
    assert isinstance(first, StepUpdate) and first.total_steps == 100
    assert isinstance(outcome[0], DenoiseCancelled), outcome


def test_playground_page_is_served_and_root_points_to_it(api_client):
    r = api_client.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/playground"
    page = api_client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for uses in ("/v1/models", "/v1/adapters", "/v1/images/generations", "/v1/images/edits", "Authorization"):
        assert uses in page.text


def test_model_cards_offer_the_served_sizes_and_defaults(api_client, preset):
    cards = {m["id"]: m for m in api_client.get("/v1/models").json()["data"]}
    w, h = preset.default_size
    assert set(cards) == set(preset.model_ids)
    for model_id, card in cards.items():
        variant = preset.variant(model_id)
        assert card["default_size"] == f"{w}x{h}" and card["default_size"] in card["sizes"]
        assert card["num_inference_steps"] == variant.num_inference_steps
        assert card["true_cfg_scale"] == variant.true_cfg_scale
        assert len(card["sizes"]) > 1
        for size in card["sizes"]:  # every suggested size is one the API accepts
            assert parse_size(size, preset) == tuple(int(v) for v in size.split("x"))


def test_fast_and_full_previews_leave_the_completed_image_as_the_plain_one(api_client):
    """3 fast previews, 3 full previews, and no stream at all: the same final PNG bytes for the same seed."""
    body = {"prompt": PROMPT, "seed": 31}
    plain = api_client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    sizes, finals = {}, {}
    for preview in ("fast", "full"):
        events = stream(api_client, json={**body, "stream": True, "partial_images": 3, "preview": preview})
        partial = [d for _, d in events if d["type"] == "image_generation.partial_image"]
        assert [d["partial_image_index"] for d in partial] == [0, 1, 2]
        sizes[preview] = {pixels(d["b64_json"]).shape for d in partial}
        finals[preview] = events[-1][1]["b64_json"]
        assert events[-1][1]["type"] == "image_generation.completed"
    assert sizes == {"fast": {(32, 32, 3)}, "full": {(128, 128, 3)}}
    assert finals["fast"] == finals["full"] == plain


def test_a_fast_preview_shows_the_full_previews_layout(api_client):
    """The projection stands in for the VAE: the fast preview of a step is bright where the full preview of the
    same step, downsampled, is bright (on the embedded model's VAE it gets the layout and the brightness, not the
    shape's hue; docs/streaming.md)."""
    body = {"prompt": "a blue square at the top, black background", "seed": 8, "stream": True, "partial_images": 1}
    fast, full = (next(pixels(d["b64_json"]) for _, d in stream(api_client, json={**body, "preview": p})
                       if d["type"] == "image_generation.partial_image") for p in ("fast", "full"))
    full_small = full.reshape(32, 4, 32, 4, 3).mean((1, 3))
    correlation = np.corrcoef(fast.mean(-1).ravel(), full_small.mean(-1).ravel())[0, 1]
    print(f"fast vs full preview: mean abs {np.abs(fast - full_small).mean():.1f}, brightness correlation "
          f"{correlation:.2f}")
    # 0.67 measured (seed 8): a weak but real likeness; the projection keeps this VAE's brightness, not its hue.
    assert correlation > 0.5


@pytest.mark.parametrize("value", ["slow", "FULL", "", 1, True, ["full"]])
def test_a_bad_preview_is_a_400_naming_it(api_client, value):
    r = api_client.post("/v1/images/generations",
                        json={"prompt": PROMPT, "stream": True, "partial_images": 1, "preview": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "preview"
    picture = _png(render(Scene("red", "circle", "left", "white"), 64))
    if isinstance(value, str):  # a form field is text
        r = api_client.post("/v1/images/edits", data={"prompt": PROMPT, "stream": "true", "preview": value},
                            files={"image": ("in.png", picture, "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "preview"


def test_the_preset_sets_the_default_preview_and_a_request_overrides_it(preset):
    full_preset = preset.model_copy(update={"default_preview": "full"})
    assert preset.default_preview == "fast"
    request = ImageGenerationRequest(prompt=PROMPT, stream=True, partial_images=2)
    assert request.resolve(preset, 0).preview == "fast"
    assert request.resolve(full_preset, 0).preview == "full"
    assert request.model_copy(update={"preview": "fast"}).resolve(full_preset, 0).preview == "fast"


def test_streamed_edit_previews_are_composed_at_the_output_size(api_client):
    """A fast preview is a quarter of the side: an inpaint's is resized to the model's size before it is composed
    (so it is the output's size, with the input outside the mask); an img2img's, which composes nothing, keeps its
    quarter size, as a generation's does."""
    picture = _png(render(Scene("red", "circle", "left", "white"), 64))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))  # repaint the right half
    fields = {"prompt": "a red circle on the left, white background", "seed": "6", "stream": "true",
              "partial_images": "2", "preview": "fast"}
    inpaint = stream(api_client, "/v1/images/edits", data=fields, files={
        "image": ("in.png", picture, "image/png"), "mask": ("mask.png", _png(mask), "image/png")})
    img2img = stream(api_client, "/v1/images/edits", data=fields, files={"image": ("in.png", picture, "image/png")})
    source = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"), dtype=np.int16)
    outside = np.asarray(overlay_mask(mask.getchannel("A").point(lambda a: 255 if a == 0 else 0), None)) == 0
    previews = [pixels(d["b64_json"]) for _, d in inpaint if d["type"] == "image_edit.partial_image"]
    assert len(previews) == 2
    for got in previews:
        assert got.shape == (64, 64, 3)
        assert np.array_equal(got[outside], source[outside])
        assert np.abs(got[~outside] - source[~outside]).mean() > 0  # the model's preview under the mask
    shapes = {pixels(d["b64_json"]).shape for _, d in img2img if d["type"] == "image_edit.partial_image"}
    assert shapes == {(16, 16, 3)}
