"""OpenAI's output options: `output_format` (png / jpeg / webp) with `output_compression`, `background`, and `quality`
choosing the preset's variant. Through the real FastAPI app over the in-process pipeline (LocalBackend), plus the
encoder and the edit composition as units; tests/test_graph.py runs the Ray graph's VaeDecoder path."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from openai.types import ImageEditCompletedEvent, ImageGenCompletedEvent, ImageGenPartialImageEvent, ImagesResponse
from PIL import Image

from lightray.contracts import PNG, OutputEncoding
from lightray.edits import compose_edit, compose_pngs, decoded_encoding, prepare_edit
from lightray.images import encode_image, encode_png
from lightray.schemas import ImageEditRequest, ImageGenerationRequest
from lightray.world.shapes import Scene, render
from recording_backend import recording_app
from serve_app.settings import ServiceSettings
from sse import parse_sse

PROMPT = "a red circle on the left, white background"
FAST = {"prompt": PROMPT, "size": "64x64", "model": "lightray-shapes-lightning-4", "seed": 11}
"""A cheap request: Lightning 4 at 64x64."""
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def b64_image(b64: str) -> bytes:
    return base64.b64decode(b64)


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def generate(client, **fields) -> dict:
    r = client.post("/v1/images/generations", json={**FAST, **fields})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def png_answer(api_client) -> bytes:
    """The default (PNG) answer to FAST."""
    body = generate(api_client)
    assert body["output_format"] == "png"
    return b64_image(body["data"][0]["b64_json"])


# ---------------------------------------------------------------------------------------------- the encoder

def test_encode_image_formats_and_compression():
    image = render(Scene("blue", "square", "right", "gray"), 128)
    for fmt in ("png", "jpeg", "webp"):
        best, worst = (encode_image(image, OutputEncoding(fmt, c)) for c in (100, 10))
        out = decoded(best)
        assert out.format == PIL_FORMATS[fmt] and out.mode == "RGB" and out.size == (128, 128)
        if fmt == "png":  # lossless: compression does not apply
            assert best == worst and np.array_equal(rgb(out), rgb(image))
        else:
            assert len(worst) < len(best)
            assert np.abs(rgb(out) - rgb(image)).mean() < np.abs(rgb(decoded(worst)) - rgb(image)).mean()
            assert np.abs(rgb(out) - rgb(image)).mean() < 2.0
    # PNG bytes are what they were before formats existed (compress_level 1).
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    assert encode_image(image) == encode_png(image) == buf.getvalue()


def test_output_encoding_refuses_what_the_api_refuses():
    with pytest.raises(ValueError):
        OutputEncoding("gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        OutputEncoding("jpeg", 101)
    assert OutputEncoding("webp").compression == 100  # OpenAI's documented default
    assert ImageGenerationRequest(prompt="x", output_format="jpeg").output_encoding == OutputEncoding("jpeg", 100)
    assert ImageGenerationRequest(prompt="x", output_format="webp", output_compression=0).output_encoding == \
        OutputEncoding("webp", 0)


# ------------------------------------------------------------------------------------- generations, over HTTP

@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_every_format_round_trips_close_to_the_png(api_client, png_answer, fmt):
    body = generate(api_client, output_format=fmt)
    ImagesResponse.model_validate(body)  # OpenAI's own type accepts the top-level fields
    assert body["output_format"] == fmt and body["size"] == "64x64" and body["background"] == "opaque"
    assert body["quality"] == "low" and body["model"] == "lightray-shapes-lightning-4"
    data = b64_image(body["data"][0]["b64_json"])
    out = decoded(data)
    assert out.format == PIL_FORMATS[fmt] and out.mode == "RGB" and out.size == (64, 64)
    reference = decoded(png_answer)
    assert np.abs(rgb(out) - rgb(reference)).mean() < 3.0
    # The same pixels, encoded once: exactly the PNG answer's pixels encoded as asked.
    assert data == encode_image(reference, OutputEncoding(fmt))


def test_png_is_the_default_and_unchanged(api_client, local_pipeline, png_answer):
    explicit = b64_image(generate(api_client, output_format="png")["data"][0]["b64_json"])
    assert explicit == png_answer
    spec = ImageGenerationRequest(**FAST).resolve(local_pipeline.preset, 0)
    assert png_answer == encode_png(local_pipeline.generate(spec)[0])  # the bytes the service answered before


def test_compression_shrinks_jpeg_and_webp(api_client):
    for fmt in ("jpeg", "webp"):
        sizes = [len(b64_image(generate(api_client, output_format=fmt, output_compression=c)["data"][0]["b64_json"]))
                 for c in (100, 10)]
        assert sizes[1] < sizes[0], (fmt, sizes)


@pytest.mark.parametrize("fmt, media_type, extension", [("jpeg", "image/jpeg", ".jpg"), ("webp", "image/webp", ".webp"),
                                                        ("png", "image/png", ".png")])
def test_url_responses_serve_the_format(api_client, fmt, media_type, extension):
    body = generate(api_client, output_format=fmt, response_format="url")
    url = body["data"][0]["url"]
    assert url.endswith(extension) and body["output_format"] == fmt
    r = api_client.get(url.replace("http://testserver", ""))
    assert r.status_code == 200 and r.headers["content-type"] == media_type
    assert decoded(r.content).format == PIL_FORMATS[fmt]


def test_streamed_events_carry_the_format(api_client):
    plain = generate(api_client, output_format="webp", output_compression=70)
    r = api_client.post("/v1/images/generations", json={**FAST, "output_format": "webp", "output_compression": 70,
                                                         "stream": True, "partial_images": 1})
    assert r.status_code == 200, r.text
    events = [d for _, d in parse_sse(r.text) if d["type"].startswith("image_generation.")]
    assert [d["type"] for d in events] == ["image_generation.partial_image", "image_generation.completed"]
    for d in events:
        (ImageGenPartialImageEvent if d["type"].endswith("partial_image") else ImageGenCompletedEvent).model_validate(d)
        assert d["output_format"] == "webp" and d["quality"] == "low" and d["background"] == "opaque"
        assert decoded(b64_image(d["b64_json"])).format == "WEBP"
    assert events[-1]["b64_json"] == plain["data"][0]["b64_json"]


def test_openai_client_asks_for_jpeg(api_client):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api_client, max_retries=0)
    result = client.images.generate(prompt=PROMPT, size="64x64", output_format="jpeg", output_compression=80,
                                    quality="low", background="opaque", extra_body={"seed": 3})
    assert result.output_format == "jpeg" and result.quality == "low" and result.size == "64x64"
    assert decoded(base64.b64decode(result.data[0].b64_json)).format == "JPEG"
    with pytest.raises(BadRequestError) as e:
        client.images.generate(prompt=PROMPT, background="transparent")
    assert e.value.param == "background"


# ---------------------------------------------------------------------------------------------------- edits

@pytest.fixture(scope="module")
def wide_picture() -> Image.Image:
    """A 128x96 input: with `padding_mask_crop` the model works at 64x64 and the answer has this size."""
    return render(Scene("red", "circle", "left", "white"), 128).resize((128, 96))


def _mask_b64(size: tuple[int, int], box: tuple[int, int, int, int]) -> str:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)  # transparent = edit (OpenAI's convention)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _edit_body(picture: Image.Image, **fields) -> dict:
    return {"prompt": "a green triangle on the left, white background", "image": base64.b64encode(
        encode_png(picture)).decode("ascii"), "mask": _mask_b64(picture.size, (8, 24, 56, 72)), "size": "64x64",
        "padding_mask_crop": 8, "model": "lightray-shapes-lightning-4", "seed": 5, **fields}


def test_a_composed_edit_is_encoded_once_after_a_lossless_composition(api_client, wide_picture):
    """Inpainting with `padding_mask_crop` is composed at the ingress: the JPEG answer is the PNG answer's pixels
    encoded as JPEG, byte for byte (the composition started from lossless pixels)."""
    answers = {}
    for fmt in ("png", "jpeg"):
        r = api_client.post("/v1/images/edits", json=_edit_body(wide_picture, output_format=fmt))
        assert r.status_code == 200, r.text
        assert r.json()["output_format"] == fmt and r.json()["size"] == "128x96"
        answers[fmt] = b64_image(r.json()["data"][0]["b64_json"])
    out = decoded(answers["jpeg"])
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (128, 96)
    assert answers["jpeg"] == encode_image(decoded(answers["png"]), OutputEncoding("jpeg"))


def test_a_streamed_form_edit_carries_the_format(api_client, wide_picture):
    fields = {k: str(v) for k, v in _edit_body(wide_picture).items() if k not in ("image", "mask")}
    files = {"image": ("in.png", encode_png(wide_picture), "image/png"),
             "mask": ("mask.png", base64.b64decode(_edit_body(wide_picture)["mask"]), "image/png")}
    plain = api_client.post("/v1/images/edits", files=files, data={**fields, "output_format": "webp",
                                                                   "output_compression": "60"})
    assert plain.status_code == 200, plain.text
    r = api_client.post("/v1/images/edits", files=files, data={**fields, "output_format": "webp",
                                                               "output_compression": "60", "stream": "true"})
    assert r.status_code == 200, r.text
    completed = [d for _, d in parse_sse(r.text) if d["type"] == "image_edit.completed"]
    assert len(completed) == 1
    ImageEditCompletedEvent.model_validate(completed[0])
    assert completed[0]["output_format"] == "webp" and completed[0]["size"] == "128x96"
    assert completed[0]["b64_json"] == plain.json()["data"][0]["b64_json"]
    assert decoded(b64_image(completed[0]["b64_json"])).format == "WEBP"


def test_compose_pngs_encodes_the_composition_as_asked(preset, wide_picture):
    spec = ImageEditRequest(prompt="x", size="64x64", padding_mask_crop=8).resolve(preset, 0, wide_picture.size,
                                                                                   inpaint=True)
    mask = Image.new("L", wide_picture.size, 0)
    mask.paste(255, (8, 24, 56, 72))
    prepared = prepare_edit(wide_picture, mask, spec)
    jpeg = OutputEncoding("jpeg", 90)
    assert decoded_encoding(prepared, jpeg) == PNG  # the VAE stage hands over lossless outputs to compose
    output = render(Scene("green", "triangle", "left", "white"), 64)
    composed = compose_pngs([encode_png(output)], prepared, jpeg)[0]
    assert composed == encode_image(compose_edit([output], prepared)[0], jpeg)
    img2img = prepare_edit(wide_picture, None, ImageEditRequest(prompt="x", size="64x64").resolve(preset, 0))
    assert not img2img.composes and decoded_encoding(img2img, jpeg) == jpeg  # encoded once, by the VAE stage


# ------------------------------------------------------------------------------------------ quality → model

@pytest.fixture(scope="module")
def recording(preset, tmp_path_factory):
    settings = ServiceSettings(preset=preset.model_dump(), auth_enabled=False,
                               registry=str(tmp_path_factory.mktemp("formats-registry")),
                               image_store_dir=str(tmp_path_factory.mktemp("formats-images")))
    yield from recording_app(preset, settings)


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
@pytest.mark.parametrize("quality, model, steps, cfg", [
    ("low", "lightray-shapes-lightning-4", 4, 1.0),
    ("medium", "lightray-shapes-lightning-8", 8, 1.0),
    ("high", "lightray-shapes", 30, 2.0),
    ("auto", "lightray-shapes-lightning-4", 4, 1.0),
    (None, "lightray-shapes-lightning-4", 4, 1.0),
])
def test_quality_picks_the_presets_variant(recording, path, quality, model, steps, cfg):
    client, backend = recording
    body = {"prompt": PROMPT, "size": "64x64", **({"quality": quality} if quality else {})}
    if path.endswith("edits"):
        body["image"] = base64.b64encode(encode_png(Image.new("RGB", (64, 64), "white"))).decode("ascii")
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    spec = backend.specs[-1]
    assert (spec.model, spec.num_inference_steps, spec.true_cfg_scale) == (model, steps, cfg)
    assert r.json()["model"] == model
    assert r.json()["quality"] == {"auto": "low", None: "low"}.get(quality, quality)


def test_a_named_model_wins_over_quality(recording):
    client, backend = recording
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "model": "lightray-shapes-lightning-8",
                                                    "quality": "high"})
    assert r.status_code == 200, r.text
    assert backend.specs[-1].model == "lightray-shapes-lightning-8" and backend.specs[-1].num_inference_steps == 8
    assert r.json()["quality"] == "medium"  # the tier of the model that drew


def test_models_say_the_quality_mapping(api_client, preset):
    cards = {m["id"]: m for m in api_client.get("/v1/models").json()["data"]}
    assert cards["lightray-shapes-lightning-4"]["qualities"] == ["low", "auto"]
    assert cards["lightray-shapes-lightning-8"]["qualities"] == ["medium"]
    assert cards["lightray-shapes"]["qualities"] == ["high"]
    assert all(preset.variant_for_quality(q).id == model for model, card in cards.items() for q in card["qualities"])


def test_a_preset_without_a_mapping_serves_its_default_for_every_quality(preset):
    bare = preset.model_copy(update={"quality_variants": {}})
    for quality in ("low", "medium", "high", "auto", None):
        spec = ImageGenerationRequest(prompt="x", quality=quality).resolve(bare, 0)
        assert spec.model == preset.model_ids[0] and spec.quality is None
    with pytest.raises(ValueError, match="quality_variants"):
        type(preset).model_validate({**preset.model_dump(), "quality_variants": {"high": "no-such-model"}})


# ------------------------------------------------------------------------------------------------ bad input

FORM_BAD = [
    # The generations' JSON cases are in tests/test_api_validation.py; these are the same as form fields.
    ({"output_format": "gif"}, "output_format"),
    ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
    ({"output_format": "jpeg", "output_compression": -1}, "output_compression"),
    ({"output_format": "webp", "output_compression": "high"}, "output_compression"),
    ({"output_format": "png", "output_compression": 50}, "output_compression"),
    ({"output_compression": 50}, "output_compression"),  # no output_format means png
    ({"background": "transparent"}, "background"),
    ({"quality": "ultra"}, "quality"),
]


@pytest.mark.parametrize("patch, param", FORM_BAD)
def test_bad_output_options_in_an_edit_form_are_400_naming_the_field(recording, patch, param):
    client, _ = recording
    files = {"image": ("in.png", encode_png(Image.new("RGB", (64, 64), "white")), "image/png")}
    r = client.post("/v1/images/edits", files=files, data={"prompt": PROMPT, **{k: str(v) for k, v in patch.items()}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err
