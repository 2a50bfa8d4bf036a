"""The HTTP contract: every malformed request gets a 4xx whose error names the field, before any replica work.

Runs against the real FastAPI app over the in-process pipeline (no cluster needed for the contract); the
Ray graph serves the same app (tests/test_graph.py)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

OK = {"prompt": "a red circle on the left, white background", "n": 1, "size": "64x64", "num_inference_steps": 2}


@pytest.mark.parametrize(
    "patch, status, param",
    [
        ({"size": "65x64"}, 400, "size"),
        ({"size": "64"}, 400, "size"),
        ({"size": "4096x4096"}, 400, "size"),
        ({"size": "16x16"}, 400, "size"),
        ({"n": 0}, 400, "n"),
        ({"n": 11}, 400, "n"),
        ({"n": "two"}, 400, "n"),
        ({"num_inference_steps": 0}, 400, "num_inference_steps"),
        ({"num_inference_steps": 1000}, 400, "num_inference_steps"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "   "}, 400, "prompt"),
        ({"prompt": "x" * 5000}, 400, "prompt"),
        ({"prompt": 123}, 400, "prompt"),
        ({"negative_prompt": "y" * 5000}, 400, "negative_prompt"),
        ({"model": "dall-e-9"}, 404, "model"),
        ({"seeds": [1, 2]}, 400, "seeds"),
        ({"seeds": [-1]}, 400, "seeds"),
        ({"seed": -5}, 400, "seed"),
        ({"true_cfg_scale": 0.5}, 400, "true_cfg_scale"),
        ({"response_format": "jpeg"}, 400, "response_format"),
        ({"unknown_field": 1}, 400, "unknown_field"),
    ],
)
def test_bad_input_is_4xx_naming_the_field(api_client, patch, status, param):
    r = api_client.post("/v1/images/generations", json={**OK, **patch})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert param.split(".")[0] in err["message"]


def test_missing_prompt_and_bad_json(api_client):
    r = api_client.post("/v1/images/generations", json={"n": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = api_client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_generation_contract(api_client):
    r = api_client.post("/v1/images/generations", json={**OK, "n": 2, "seed": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [40, 41]
    for d in body["data"]:
        im = Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))
        assert im.format == "PNG" and im.size == (64, 64)
    assert "denoise" in r.headers["server-timing"] or "graph" in r.headers["server-timing"]


def test_url_response_format_serves_the_png(api_client):
    r = api_client.post("/v1/images/generations", json={**OK, "response_format": "url", "seed": 3})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    png = api_client.get(url.replace("http://testserver", ""))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert api_client.get("/v1/files/images/..%2Fetc%2Fpasswd").status_code == 404


def test_models_and_health(api_client, preset):
    ids = [m["id"] for m in api_client.get("/v1/models").json()["data"]]
    assert ids == preset.model_ids
    assert api_client.get(f"/v1/models/{ids[0]}").status_code == 200
    assert api_client.get("/v1/models/nope").status_code == 404
    assert api_client.get("/healthz").json() == {"status": "ok"}
    assert api_client.get("/readyz").status_code == 200
    assert api_client.get("/docs").status_code == 200
    assert "/v1/images/generations" in api_client.get("/openapi.json").json()["paths"]
