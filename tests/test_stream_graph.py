"""Streaming from the Ray Serve graph (a real local cluster, configs/serve/local.yaml), read by the official `openai`
client: generations and edits, previews through the VaeDecoder, the completed image equal to the non-streaming
one, and a client that goes away cancelling the Denoiser's work."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from openai.types import ImageEditCompletedEvent, ImageGenCompletedEvent, ImageGenPartialImageEvent
from PIL import Image

from lightray.edits import overlay_mask
from lightray.world.shapes import Scene, render
from sse import parse_sse, pixels

PROMPT = "a red circle on the left, white background"


@pytest.fixture(scope="module")
def client(service) -> OpenAI:
    return OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=300)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_openai_client_streams_a_generation_equal_to_the_plain_one(client):
    stream = client.images.generate(prompt=PROMPT, n=2, stream=True, partial_images=3,
                                    model="lightray-shapes-lightning-8", extra_body={"seed": 9})
    events = list(stream)
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    progress = [e for e in events if e.type == "lightray.progress"]
    assert all(isinstance(e, ImageGenPartialImageEvent) for e in partial)
    assert all(isinstance(e, ImageGenCompletedEvent) for e in completed)
    # 8 steps, 3 previews (after steps 2, 4, 6) and one final image for each of the two images.
    assert sorted((e.model_extra["image_index"], e.partial_image_index) for e in partial) == [
        (i, k) for i in (0, 1) for k in (0, 1, 2)]
    assert [e.model_extra["step"] for e in progress if e.model_extra["image_index"] == 0] == list(range(1, 9))
    assert [(e.model_extra["image_index"], e.model_extra["seed"]) for e in completed] == [(0, 9), (1, 10)]
    assert events[-2:] == completed
    assert {e.size for e in partial + completed} == {"128x128"}  # the default size
    plain = client.images.generate(prompt=PROMPT, n=2, model="lightray-shapes-lightning-8",
                                   extra_body={"seed": 9})
    assert [e.b64_json for e in completed] == [d.b64_json for d in plain.data]
    for e in partial:
        assert pixels(e.b64_json).shape == (32, 32, 3)  # fast previews (the default): a quarter of the side


def test_openai_client_streams_an_inpaint_equal_to_the_plain_one(client):
    picture = _png(render(Scene("red", "circle", "left", "white"), 64))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    kwargs = dict(image=("in.png", picture, "image/png"), mask=("mask.png", _png(mask), "image/png"),
                  prompt="a green triangle on the left, white background", extra_body={"seed": 4})
    events = list(client.images.edit(**kwargs, stream=True, partial_images=2))
    types = [e.type for e in events]
    assert types.count("image_edit.partial_image") == 2 and types[-1] == "image_edit.completed"
    assert types.count("lightray.progress") == 4
    completed = events[-1]
    assert isinstance(completed, ImageEditCompletedEvent)
    plain = client.images.edit(**kwargs)
    assert completed.b64_json == plain.data[0].b64_json
    # The graph's backend composes previews as the final image: outside the overlay's soft edge, the input.
    outside = np.asarray(overlay_mask(mask.getchannel("A").point(lambda a: 255 if a == 0 else 0), None)) == 0
    source = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"), dtype=np.int16)
    for e in events:
        if e.type in ("image_edit.partial_image", "image_edit.completed"):
            assert np.array_equal(pixels(e.b64_json)[outside], source[outside]), e.type


def test_a_streamed_padding_mask_crop_edit_through_the_graph_is_the_plain_one(client):
    """The graph's backend pastes the crop's final image back into the full picture, as its plain edit does, and
    its previews into the picture scaled down to the model's pixels (`lightray.edits.preview_frame`)."""
    picture = render(Scene("red", "circle", "left", "white"), 128)
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 40, 56, 88))
    kwargs = dict(image=("in.png", _png(picture), "image/png"), mask=("mask.png", _png(mask), "image/png"),
                  prompt="a blue square on the left, white background", size="64x64",
                  extra_body={"seed": 5, "padding_mask_crop": 8})
    events = [e for e in client.images.edit(**kwargs, stream=True, partial_images=1)
              if e.type in ("image_edit.partial_image", "image_edit.completed")]
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    for e, side in zip(events, (64, 128)):  # the preview at the model's 64x64 pixels, the final image in full
        source = np.asarray(picture.resize((side, side), Image.Resampling.BILINEAR).convert("RGB"), dtype=np.int16)
        got = pixels(e.b64_json)
        far = side * 80 // 128
        assert e.size == "128x128" and got.shape == (side, side, 3)
        assert np.array_equal(got[:, far:], source[:, far:])  # far from the mask: the input, exactly
    assert events[-1].b64_json == client.images.edit(**kwargs).data[0].b64_json


def test_output_formats_through_the_graph(client, service):
    """The VaeDecoder encodes as the request asks (previews too); an edit the ingress composes is composed from
    lossless PNGs and encoded once; url answers are served with the format's content type. `quality` without a
    model picks the preset's variant."""
    from lightray.contracts import OutputEncoding
    from lightray.images import encode_image

    def image(b64: str) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(b64)))

    kwargs = dict(prompt=PROMPT, size="64x64", quality="medium", extra_body={"seed": 12})
    png = client.images.generate(**kwargs)
    assert png.output_format == "png" and png.quality == "medium" and png.model_extra["model"] == \
        "lightray-shapes-lightning-8"
    events = [e for e in client.images.generate(**kwargs, output_format="jpeg", output_compression=90, stream=True,
                                                partial_images=1) if e.type.startswith("image_generation.")]
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert {e.output_format for e in events} == {"jpeg"} and {image(e.b64_json).format for e in events} == {"JPEG"}
    assert events[-1].b64_json == base64.b64encode(
        encode_image(image(png.data[0].b64_json), OutputEncoding("jpeg", 90))).decode()

    url = client.images.generate(**kwargs, output_format="webp", response_format="url").data[0].url
    served = httpx.get(url, timeout=60)
    assert served.headers["content-type"] == "image/webp" and url.endswith(".webp")
    assert Image.open(io.BytesIO(served.content)).format == "WEBP"

    picture = render(Scene("red", "circle", "left", "white"), 128)
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 40, 56, 88))
    edit = dict(image=("in.png", _png(picture), "image/png"), mask=("mask.png", _png(mask), "image/png"),
                prompt="a blue square on the left, white background", size="64x64",
                extra_body={"seed": 5, "padding_mask_crop": 8})
    composed_png = client.images.edit(**edit).data[0].b64_json
    composed_webp = client.images.edit(**edit, output_format="webp")
    assert composed_webp.size == "128x128" and composed_webp.output_format == "webp"
    assert composed_webp.data[0].b64_json == base64.b64encode(
        encode_image(image(composed_png), OutputEncoding("webp"))).decode()


def _denoiser_log(cluster) -> str:
    logs = Path(cluster.temp_dir, "session_latest", "logs", "serve").glob("replica_lightray_Denoiser_*.log")
    return "".join(p.read_text(errors="replace") for p in logs)


def test_a_client_that_goes_away_mid_stream_cancels_the_denoise(service, ray_cluster):
    # Minutes of work on this CPU (256x256, base model with CFG, 100 steps): it can only end by cancellation.
    body = {"prompt": PROMPT, "model": "lightray-shapes", "size": "256x256", "num_inference_steps": 100,
            "stream": True, "seed": 77}
    before = _denoiser_log(ray_cluster).count("of 100 (request cancelled)")
    with httpx.stream("POST", f"{service}/v1/images/generations", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and '"lightray.progress"' in line:
                break  # the first step is done: hang up
    deadline = time.time() + 60
    while _denoiser_log(ray_cluster).count("of 100 (request cancelled)") == before and time.time() < deadline:
        time.sleep(0.5)
    log = _denoiser_log(ray_cluster)
    assert log.count("of 100 (request cancelled)") == before + 1, log[-3000:]
    # The engine is free again: a short request is served at once.
    fast = httpx.post(f"{service}/v1/images/generations", json={"prompt": PROMPT, "size": "64x64"}, timeout=60)
    assert fast.status_code == 200


def test_a_bad_streamed_request_is_a_json_400_from_the_service(service):
    r = httpx.post(f"{service}/v1/images/generations", json={"prompt": PROMPT, "stream": True, "partial_images": 7},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "partial_images"


def test_an_adapter_failing_after_the_stream_started_is_an_error_event(client, service, registry_root, preset,
                                                                         tmp_path):
    """The ingress pins the adapter (its manifest is fine), so the stream starts; the Denoiser then finds its weights
    corrupt: the stream ends with an OpenAI-shaped error event, and the openai client raises it."""
    from test_faults import _publish_broken_adapters

    ref = _publish_broken_adapters(registry_root, tmp_path, preset)["corrupt"]
    body = {"prompt": PROMPT, "size": "64x64", "seed": 2, "stream": True, "partial_images": 2, "lora": ref}
    r = httpx.post(f"{service}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    name, last = parse_sse(r.text)[-1]
    assert name == "error" and last["type"] == "error"
    assert last["error"]["code"] == "adapter_corrupt" and last["error"]["param"] == "lora"
    assert ref in last["error"]["message"] and "checksum mismatch" in last["error"]["message"]
    with pytest.raises(openai.APIError, match="checksum mismatch"):
        list(client.images.generate(prompt=PROMPT, size="64x64", stream=True, extra_body={"lora": ref, "seed": 2}))
