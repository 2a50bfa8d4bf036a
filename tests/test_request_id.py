"""Request ids at the HTTP edge, in-process (the Ray graph's side is in tests/test_observability.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

PROMPT = "a red circle on the left, white background"


def test_request_id_is_made_and_returned(api_client):
    a = api_client.get("/healthz")
    b = api_client.get("/healthz")
    assert a.status_code == 200
    ids = [r.headers.get_list("x-request-id") for r in (a, b)]
    assert all(len(i) == 1 and len(i[0]) >= 16 for i in ids), ids
    assert ids[0] != ids[1]


def test_client_request_id_is_honoured_on_success_and_errors(api_client):
    ok = api_client.post("/v1/images/generations", headers={"X-Request-Id": "client-id-1"},
                         json={"prompt": PROMPT, "size": "64x64", "num_inference_steps": 1, "seed": 1})
    assert ok.status_code == 200, ok.text
    assert ok.headers.get_list("x-request-id") == ["client-id-1"]
    bad = api_client.post("/v1/images/generations", headers={"x-request-id": "client-id-2"},
                          json={"prompt": PROMPT, "size": "33x32"})
    assert bad.status_code == 400 and bad.headers.get_list("x-request-id") == ["client-id-2"]
    missing = api_client.get("/v1/models/nope", headers={"x-request-id": "client-id-3"})
    assert missing.status_code == 404 and missing.headers.get_list("x-request-id") == ["client-id-3"]


class _Broken:
    """A backend whose generation fails unexpectedly (a bug, not a client error)."""

    def __init__(self, preset):
        self.preset = preset

    async def generate(self, spec):
        raise ZeroDivisionError("boom")

    async def readiness(self):
        return {}


@pytest.fixture
def broken_client(preset, tmp_path):
    from serve_app.api import create_app
    from serve_app.settings import ServiceSettings

    settings = ServiceSettings(preset=preset.model_dump(), registry=str(tmp_path / "registry"),
                               image_store_dir=str(tmp_path / "images"), auth_enabled=False)
    with TestClient(create_app(_Broken(preset), settings), raise_server_exceptions=False, base_url="http://localhost") as client:
        yield client


def test_unexpected_error_is_500_with_request_id(broken_client):
    r = broken_client.post("/v1/images/generations", headers={"x-request-id": "boom-1"}, json={"prompt": PROMPT})
    assert r.status_code == 500
    assert r.headers.get_list("x-request-id") == ["boom-1"]
    assert r.json()["error"]["code"] == "internal_error" and "boom-1" in r.json()["error"]["message"]
    r = broken_client.post("/v1/images/generations", json={"prompt": PROMPT})
    assert r.status_code == 500 and len(r.headers["x-request-id"]) >= 16


def test_behind_serve_proxy_the_app_does_not_duplicate_the_header(broken_client):
    # Serve's proxy appends X-Request-ID itself; the Serve ingress sets this flag (serve_app/app.py).
    broken_client.app.state.request_id_echoed_by_proxy = True
    assert "x-request-id" not in broken_client.get("/healthz").headers
    assert "x-request-id" not in broken_client.post("/v1/images/generations", json={"prompt": PROMPT}).headers
