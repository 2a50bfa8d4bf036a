"""The Ray Serve graph end to end: a real local Ray cluster, `serve deploy` of configs/serve/local.yaml, real
HTTP, the official `openai` client."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from lightray.schemas import ImageGenerationRequest

PROMPT = "a red circle on the left, white background"


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def client(service) -> OpenAI:
    return OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_client_gets_n_pngs_with_requested_seeds(client):
    result = client.images.generate(
        prompt=PROMPT, n=3, size="64x64", response_format="b64_json", extra_body={"seed": 100},
    )
    assert len(result.data) == 3
    seeds = [d.model_extra["seed"] for d in result.data]
    assert seeds == [100, 101, 102]
    for d in result.data:
        img = Image.open(io.BytesIO(base64.b64decode(d.b64_json)))
        assert img.format == "PNG" and img.size == (64, 64)


def test_same_seed_same_bytes_different_seed_different_image(client):
    def one(seed):
        return client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": seed}).data[0].b64_json

    a, b, c = one(7), one(7), one(8)
    assert a == b
    assert np.abs(_pixels(a) - _pixels(c)).max() > 30


def test_batch_image_equals_single_run_with_its_seed(client):
    batch = client.images.generate(prompt=PROMPT, n=3, size="64x64", extra_body={"seeds": [5, 77, 1234]}).data
    for d, seed in zip(batch, [5, 77, 1234]):
        single = client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": seed}).data[0]
        # Batched matmuls differ from single ones by float rounding only (≤ 5e-7 in latents); after 8-bit
        # quantisation that is at most one grey level.
        assert np.abs(_pixels(d.b64_json) - _pixels(single.b64_json)).max() <= 1


def test_chinese_prompt(client):
    d = client.images.generate(prompt="白色背景，左边有一个红色的圆形", size="64x64", extra_body={"seed": 3}).data[0]
    assert _pixels(d.b64_json).shape == (64, 64, 3)


def test_graph_equals_in_process_pipeline(service, local_pipeline, preset):
    for model in preset.model_ids:
        body = {"prompt": PROMPT, "n": 2, "seed": 11, "model": model, "size": "64x64"}
        if "lightning" not in model:
            body["num_inference_steps"] = 6  # keep the CFG case cheap
        r = httpx.post(f"{service}/v1/images/generations", json=body, timeout=300)
        assert r.status_code == 200, r.text
        spec = ImageGenerationRequest.model_validate(body).resolve(preset, 0)
        expected = local_pipeline.generate(spec)
        for d, im in zip(r.json()["data"], expected):
            assert np.array_equal(_pixels(d["b64_json"]), np.asarray(im, dtype=np.int16)), model


def test_graph_rejects_bad_input_with_named_field(service):
    r = httpx.post(f"{service}/v1/images/generations", json={"prompt": PROMPT, "size": "63x64"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    r = httpx.post(f"{service}/v1/images/generations", json={"prompt": PROMPT, "model": "nope"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    # the replicas are unharmed
    assert httpx.get(f"{service}/readyz", timeout=30).status_code == 200


def test_timings_header_and_models(service, preset):
    r = httpx.post(f"{service}/v1/images/generations", json={"prompt": PROMPT, "seed": 1}, timeout=300)
    timing = r.headers["server-timing"]
    for stage in ("encode", "denoise", "decode", "graph"):
        assert f"{stage};dur=" in timing
    ids = [m["id"] for m in httpx.get(f"{service}/v1/models").json()["data"]]
    assert ids == preset.model_ids
