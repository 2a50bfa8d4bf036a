"""Response headers (serve_app/security_headers.py): nosniff everywhere, a Content-Security-Policy and no framing
on every HTML page, and Swagger UI (a CDN script without SRI) only on a service without API keys."""

from __future__ import annotations

import pytest

from recording_backend import recording_app
from serve_app.settings import ServiceSettings


@pytest.fixture(scope="module")
def keyed_client(preset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keyed")
    settings = ServiceSettings(preset=preset.model_dump(), api_keys=[{"tenant": "acme", "key": "k" * 32}],
                               registry=str(tmp / "registry"), image_store_dir=str(tmp / "images"))
    yield from recording_app(preset, settings)


def test_the_playground_page_cannot_be_framed_or_load_other_origins(api_client):
    r = api_client.get("/playground")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy and "connect-src 'self' " in policy
    assert "http" not in policy  # no other origin at all
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"


def test_every_response_says_nosniff(api_client):
    for r in (api_client.get("/v1/models"), api_client.get("/healthz"), api_client.post("/v1/images/generations",
                                                                                          json={"prompt": ""})):
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert "content-security-policy" not in r.headers  # JSON is never rendered as a page


def test_swagger_ui_is_served_only_without_api_keys(api_client, keyed_client):
    client, _ = keyed_client
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert "/v1/images/generations" in client.get("/openapi.json").json()["paths"]
    r = api_client.get("/docs")  # auth off: a loopback, single-user service
    assert r.status_code == 200 and "cdn.jsdelivr.net" in r.headers["content-security-policy"]
