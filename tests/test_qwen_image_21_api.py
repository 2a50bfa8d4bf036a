"""Qwen-Image-2.1 through the stages and the HTTP API, in process: the real FastAPI app over the in-process backend
of a mini real-layout 2.1 Turbo (`tests/mini_real.py`, `build_mini_real_21`, with its preset from
configs/models/qwen-image-2.1-turbo.yaml). A generation and an edit with 1-2 images over HTTP give the whole
modular pipeline's images (`QwenImage21TurboAutoBlocks`) for the same prompt, pictures and seed, pixel for pixel;
`/v1/models` says what the model serves; bad input is a 4xx naming the field."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from sse import parse_sse, pixels
from mini_real import MINI_21_TURBO_SIGMAS, build_mini_real_21, mini_21_preset
from lightray.world.shapes import Scene, render
from testing.adapters import publish_placeholder_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL, BASE = "qwen-image-2.1-turbo", "qwen-image-2.1"
PROMPT_LIMIT = 24
"""The mini preset's `max_sequence_length`: prompt tokens its encoder reads."""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from lightray.pipeline import LocalPipeline

    root = build_mini_real_21(tmp_path_factory.mktemp("mini-21") / "Qwen-Image-2.1-Turbo", turbo=True)
    return LocalPipeline(mini_21_preset(root, "qwen-image-2.1-turbo.yaml", max_sequence_length=PROMPT_LIMIT))


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory):
    """The base (40 steps by default, CFG 4 with the negative " "), served beside Turbo."""
    from lightray.pipeline import LocalPipeline

    root = build_mini_real_21(tmp_path_factory.mktemp("mini-21") / "Qwen-Image-2.1", seed=1)
    return LocalPipeline(mini_21_preset(root, "qwen-image-2.1.yaml"))


@pytest.fixture(scope="module")
def client(pipeline, base_pipeline, tmp_path_factory):
    from serve_app.api import create_app
    from serve_app.local_backend import LocalBackend
    from serve_app.settings import ServiceSettings

    settings = ServiceSettings(preset=pipeline.preset.model_dump(), registry=str(tmp_path_factory.mktemp("registry")),
                               registry_cache_ttl_s=0, image_store_dir=str(tmp_path_factory.mktemp("images")),
                               auth_enabled=False)
    registry = settings.open_registry()
    app = create_app([LocalBackend(pipeline, registry), LocalBackend(base_pipeline, registry)], settings)
    with TestClient(app, base_url="http://localhost") as client:
        client.registry_root = Path(settings.registry)
        yield client


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pictures(count: int) -> list[Image.Image]:
    scenes = [Scene("red", "circle", "left", "white"), Scene("blue", "square", "top", "gray"),
              Scene("green", "triangle", "center", "black")]
    return [render(s, size) for s, size in zip(scenes[:count], [(96, 64), (64, 64), (64, 96)])]


def edit(client, images: list[Image.Image], prompt="make the circle blue", **fields):
    files = [("image[]", (f"in{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    return client.post("/v1/images/edits", data={"model": MODEL, "prompt": prompt, "seed": "9", "size": "128x128",
                                                 **fields}, files=files)


def decoded(response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in response.json()["data"]]


def assert_error(response, status: int, param: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error


def modular_images(root: Path, prompt: str, images: list[Image.Image], seed: int, size: int = 128,
                   cfg: float | None = None, steps: int | None = None):
    """The whole modular pipeline's images (RGBA) for the prompt and pictures, at size², the condition pictures
    resized to the output's area (`output_resolution`): Turbo's, or with `cfg` the base's (`ClassifierFreeGuidance`,
    the negative " ")."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21 import QwenImage21AutoBlocks
    from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21_turbo import QwenImage21TurboAutoBlocks

    from lightray.models.qwen_image_21.conditioning import load_text_encoder

    text_encoder, processor = load_text_encoder(root, torch.bfloat16)
    pipe = (QwenImage21TurboAutoBlocks() if cfg is None else QwenImage21AutoBlocks()).init_pipeline()
    components = dict(
        text_encoder=text_encoder, processor=processor,
        vae=AutoencoderKLQwenImage21.from_pretrained(root / "vae", torch_dtype=torch.bfloat16),
        transformer=QwenImage21Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.bfloat16),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"))
    if cfg is not None:
        components["guider"] = ClassifierFreeGuidance(guidance_scale=cfg)
    pipe.update_components(**components)
    inputs = dict(prompt=prompt, height=size, width=size, output_resolution=size,
                  generator=[torch.Generator().manual_seed(seed)])
    if cfg is None:
        pipe.register_to_config(sample_sigmas=MINI_21_TURBO_SIGMAS)
        inputs.update(num_inference_steps=len(MINI_21_TURBO_SIGMAS))
    else:
        inputs.update(num_inference_steps=steps, negative_prompt=" ")
    if images:
        inputs["image"] = images
    return [np.asarray(im) for im in pipe(**inputs, output="images")]


def test_models_say_what_2_1_serves(client):
    card = client.get(f"/v1/models/{MODEL}").json()
    assert card["endpoints"] == ["generations", "edits"] and card["edit_mode"] == "instruction"
    assert card["input_images"] == [1, 3] and card["num_inference_steps"] == len(MINI_21_TURBO_SIGMAS)


def test_a_generation_over_http_equals_the_modular_pipeline(client, pipeline):
    response = client.post("/v1/images/generations", json={"model": MODEL, "prompt": "a red circle on the left",
                                                           "seed": 9, "size": "128x128"})
    ours = decoded(response)
    theirs = modular_images(pipeline.preset.root, "a red circle on the left", [], 9)
    assert ours[0].shape == theirs[0].shape == (128, 128, 4)
    assert np.array_equal(ours[0], theirs[0])


@pytest.mark.parametrize("count", [1, 2])
def test_an_edit_over_http_equals_the_modular_pipeline(client, pipeline, count):
    """1-2 pictures of other sizes and aspect ratios through `/v1/images/edits` (multipart `image[]`): the
    Qwen3-VL encoder reads them with the prompt and the VAE encodes them in the stages, as the pipeline does."""
    images = pictures(count)
    ours = decoded(edit(client, images))
    theirs = modular_images(pipeline.preset.root, "make the circle blue", images, 9)
    assert np.array_equal(ours[0], theirs[0])


def test_the_base_with_cfg_over_http_equals_the_modular_pipeline(client, base_pipeline):
    """The base model (its variant's CFG 4 and negative " "), a generation and an edit with a picture: both CFG
    branches encoded by the TextEncodeStage (the negative with the same picture), as the pipeline does."""
    for images in ([], pictures(1)):
        if images:
            response = edit(client, images, model=BASE, num_inference_steps="3")
        else:
            response = client.post("/v1/images/generations", json={
                "model": BASE, "prompt": "make the circle blue", "seed": 9, "size": "128x128",
                "num_inference_steps": 3})
        theirs = modular_images(base_pipeline.preset.root, "make the circle blue", images, 9, cfg=4.0, steps=3)
        assert np.array_equal(decoded(response)[0], theirs[0])


def test_streaming_an_edit_sends_fast_previews_then_the_image(client):
    """Fast previews of 2.1's unpatched latents (the projection fitted to its VAE: an eighth of the side), then
    the image the non-streaming edit gives."""
    with client.stream("POST", "/v1/images/edits", data={"model": MODEL, "prompt": "make the circle blue",
                                                         "seed": "9", "size": "128x128", "stream": "true",
                                                         "partial_images": "2"},
                       files=[("image", ("in.png", png(pictures(1)[0]), "image/png"))]) as response:
        assert response.status_code == 200
        events = parse_sse("".join(response.iter_text()))
    partials = [data for kind, data in events if kind == "image_edit.partial_image"]
    assert len(partials) == 2 and pixels(partials[0]["b64_json"]).shape[:2] == (16, 16)
    assert events[-1][0] == "image_edit.completed"
    # (`pixels` reads RGB: the image is RGBA, as the pipeline decodes it)
    assert np.array_equal(pixels(events[-1][1]["b64_json"]), decoded(edit(client, pictures(1)))[0][..., :3])


def test_three_images_are_taken_and_four_are_a_400_naming_image(client):
    assert len(decoded(edit(client, pictures(3)))) == 1
    assert_error(edit(client, pictures(3) + pictures(1)), 400, "image")


def test_a_prompt_past_the_encoders_limit_is_a_400_naming_prompt_with_the_limit(client):
    long_prompt = " ".join(["a red circle on the left"] * 20)
    for response in (client.post("/v1/images/generations", json={"model": MODEL, "prompt": long_prompt}),
                     edit(client, pictures(1), prompt=long_prompt)):
        error = assert_error(response, 400, "prompt")
        assert f"at most {PROMPT_LIMIT}" in error["message"], error


def test_an_adapter_of_another_family_is_a_400_naming_its_entry(client, pipeline, tmp_path):
    """An adapter trained for Qwen-Image (the embedded model: another transformer) on 2.1: refused before any
    replica work with a 400 naming the list entry (`lora[1]`), whichever endpoint."""
    from lightray.config import load_preset

    shapes = load_preset("lightray-shapes")
    ours = publish_placeholder_adapter(client.registry_root, shapes, "acme", "turbo-style", tmp_path,
                                       base_model_id=pipeline.preset.base_model_id, base_family="qwen-image-2.1")
    foreign = publish_placeholder_adapter(client.registry_root, shapes, "acme", "shapes-style", tmp_path)
    for response in (
        client.post("/v1/images/generations", json={"model": MODEL, "prompt": "a red circle",
                                                    "lora": [ours.ref, foreign.ref]}),
        edit(client, pictures(1), **{"lora[]": [ours.ref, foreign.ref]}),
    ):
        error = assert_error(response, 400, "lora[1]")
        assert error["code"] == "adapter_wrong_family", error
        assert "qwen-image family" in error["message"] and "qwen-image-2.1" in error["message"], error


def test_turbo_serves_an_adapter_of_the_base_and_the_base_refuses_turbos(client, tmp_path):
    """Turbo is distilled from the base, so an adapter trained on the base (`adapter_base_model_ids`) changes
    Turbo's image; the base refuses an adapter trained on Turbo (422, another base model)."""
    from mini_real import write_mini_21_lora

    from lightray.registry_settings import open_registry

    folder = tmp_path / "base-style"
    write_mini_21_lora(folder / "adapter_model.safetensors", seed=81)
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 4, "peft_type": "LORA"}')
    registry = open_registry(str(client.registry_root))
    of_base = registry.publish("acme", "base-style", folder, base_model_id=BASE, base_family="qwen-image-2.1")
    of_turbo = registry.publish("acme", "turbo-only", folder, base_model_id=MODEL, base_family="qwen-image-2.1")
    request = {"model": MODEL, "prompt": "a red circle", "seed": 5, "size": "128x128"}
    plain = decoded(client.post("/v1/images/generations", json=request))[0]
    styled = decoded(client.post("/v1/images/generations", json={**request, "lora": of_base.ref}))[0]
    assert np.abs(plain.astype(int) - styled.astype(int)).max() > 0
    error = assert_error(client.post("/v1/images/generations", json={**request, "model": BASE, "lora": of_turbo.ref,
                                                                     "num_inference_steps": 2}), 422, "lora")
    assert error["code"] == "adapter_incompatible" and MODEL in error["message"], error


def test_the_text_deployment_refuses_a_long_2_1_prompt_alone_and_the_refusal_crosses_a_handle(pipeline):
    """The TextEncoder's batch (`deployments.text_encoder.encode_batch`) on 2.1: a request whose prompt is past the
    limit fails alone with a `RequestError` naming it, the other gets the stage's own embeddings. That error
    pickles whole, and the ingress finds it inside Ray's wrapping (`RayTaskError`) and answers it as is."""
    import asyncio
    import pickle

    from ray.exceptions import RayTaskError

    from deployments.text_encoder import PromptPair, encode_batch
    from lightray.errors import RequestError
    from lightray.schemas import GenerationSpec
    from serve_app.errors import http_status
    from serve_app.graph_failures import as_client_error

    long_prompt = " ".join(["a red circle on the left"] * 20)
    out = encode_batch(pipeline.text, [PromptPair(long_prompt), PromptPair("a red circle", "a blue square")])
    assert isinstance(out[0], RequestError) and out[0].param == "prompt"
    assert np.array_equal(out[1].prompt, pipeline.text.encode(["a red circle"])[0])
    with pytest.raises(RequestError, match="^negative_prompt is 120 tokens; .* at most 24") as alone:
        encode_batch(pipeline.text, [PromptPair("a red circle", long_prompt)])
    assert alone.value.param == "negative_prompt"

    refused = pickle.loads(pickle.dumps(RequestError("prompt", "too long")))
    assert (refused.param, refused.message, http_status(refused)) == ("prompt", "too long", 400)
    wrapped = RayTaskError("encode", "traceback", refused).as_instanceof_cause()
    spec = GenerationSpec(prompt="p", negative_prompt=None, model=MODEL, seeds=[1], width=128, height=128,
                          num_inference_steps=8, true_cfg_scale=1.0)
    assert asyncio.run(as_client_error(spec, wrapped)) is refused


def test_the_vae_deployment_decodes_2_1_latents_as_the_stage(pipeline):
    """The VaeDecoder's batch (`deployments.vae.decode_batch`) on 2.1's unpatched latents: each request alone (no
    stacking is measured exact for the 2.1 VAE), the stage's own images."""
    from deployments.vae import DecodeItem, decode_batch

    latents = [np.random.default_rng(seed).standard_normal((n, 64, 64)).astype(np.float32)
               for seed, n in ((1, 1), (2, 2))]
    out = decode_batch(pipeline.vae, [DecodeItem(x, 128, 128) for x in latents])
    for item, x in zip(out, latents):
        assert item.call_images == len(x)
        expected = pipeline.vae.decode(x, 128, 128)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(item.images, expected))


def test_the_2_1_stages_health_probes_compute(pipeline):
    pipeline.text.check_health(timeout_s=30)
    pipeline.vae.check_health(timeout_s=30)
