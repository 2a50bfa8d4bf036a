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


# ---------------------------------------------------------------------- auth off: this machine only (local_only.py)

def test_host_names_are_read_without_their_port():
    from serve_app.local_only import host_name

    def scope(host: str) -> dict:
        return {"headers": [(b"host", host.encode())]}

    assert host_name(scope("localhost:8000")) == "localhost"
    assert host_name(scope("127.0.0.1")) == "127.0.0.1"
    assert host_name(scope("[::1]:8000")) == "[::1]"
    assert host_name(scope("Evil.Example:80")) == "evil.example"
    assert host_name({"headers": []}) == ""


def test_without_api_keys_only_requests_to_this_machine_are_answered(api_client):
    """DNS rebinding: a page on another site that points its own name at 127.0.0.1 sends that name as Host."""
    body = {"prompt": "a red circle", "size": "64x64"}
    for host in ("evil.example", "evil.example:8000", "192.168.1.5:8000", ""):
        r = api_client.post("/v1/images/generations", json=body, headers={"host": host})
        assert r.status_code == 421, (host, r.text)
        assert r.json()["error"]["param"] == "host"
        assert api_client.get("/playground", headers={"host": host}).status_code == 421
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert api_client.get("/v1/models", headers={"host": host}).status_code == 200, host


def test_with_api_keys_any_host_is_answered_and_the_keys_decide(keyed_client):
    client, _ = keyed_client
    r = client.get("/v1/models", headers={"host": "lightray.example.com"})
    assert r.status_code == 401  # not 421: behind a load balancer the Host is the public name


def test_deleting_an_adapter_needs_a_key(api_client):
    r = api_client.delete("/v1/adapters/acme/style")
    assert r.status_code == 403 and r.json()["error"]["param"] == "authorization"
    assert "lightray adapters delete" in r.json()["error"]["message"]


def test_a_corrupt_pinned_manifest_is_a_422_naming_the_field_not_a_500(api_client, registry_root, preset, tmp_path):
    from testing.adapters import publish_placeholder_adapter

    manifest = publish_placeholder_adapter(registry_root, preset, "acme", "damaged", tmp_path)
    (registry_root / "acme" / "damaged" / f"v{manifest.version}" / "manifest.json").write_bytes(b"{not json")
    ref = f"acme/damaged@v{manifest.version}"
    r = api_client.post("/v1/images/generations", json={"prompt": "a red circle", "lora": [ref]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "lora[0]" and r.json()["error"]["code"] == "adapter_corrupt"
    r = api_client.get(f"/v1/adapters/acme/damaged?version={manifest.version}")
    assert r.status_code == 422 and r.json()["error"]["param"] == "name"


def test_a_corrupt_manifest_of_another_tenant_reads_as_absent():
    """Whether another tenant's damaged adapter is private cannot be read from its manifest: 404, as for any
    adapter that is not the caller's."""
    from lightray.adapters import find_adapter
    from lightray.registry import AdapterCorrupt
    from lightray.errors import RequestError
    from serve_app.errors import http_status

    class DamagedRegistry:
        def resolve(self, ref):
            raise AdapterCorrupt("unreadable manifest")

    with pytest.raises(RequestError) as other:
        find_adapter(DamagedRegistry(), "acme/style@v1", tenant="globex", param="lora")
    with pytest.raises(RequestError) as owner:
        find_adapter(DamagedRegistry(), "acme/style@v1", tenant="acme", param="lora")
    assert (http_status(other.value), http_status(owner.value)) == (404, 422)
