"""API keys → tenants, and adapter privacy between tenants, over the real FastAPI app with the
in-process backend; one test goes through a real HTTP server with the official openai client."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from lightray.registry_settings import open_registry
from testing.adapters import publish_lora_adapter
from testing.http_server import serve_in_thread
from recording_backend import recording_app, white_png_b64
from serve_app.api import create_app
from serve_app.local_backend import LocalBackend
from serve_app.settings import ServiceSettings

ACME_KEY = "sk-acme-3f9c2a7d5e1b4c8a9d0e"
GLOBEX_KEY = "sk-globex-8b1e6d2c4a7f9e3b"
ACME_BATCH_KEY = "sk-acme-batch-6e2d9c1f7a4b"
ACME_RAISABLE_KEY = "sk-acme-raisable-4c1e8f2a9b"
PROMPT = {"prompt": "a red circle on the left, white background", "model": "lightray-shapes-lightning-4",
          "seed": 3, "size": "64x64"}


@pytest.fixture(scope="module")
def tenant_registry(preset, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenant-registry")
    work = tmp_path_factory.mktemp("tenant-adapters")
    publish_lora_adapter(root, preset, "acme", "private-style", 1, work)
    publish_lora_adapter(root, preset, "acme", "shared-style", 2, work, manifest={"visibility": "public"})
    publish_lora_adapter(root, preset, "globex", "secret", 3, work)
    return root


@pytest.fixture(scope="module")
def settings(preset, tenant_registry, tmp_path_factory) -> ServiceSettings:
    # Tests publish through registry objects of their own and expect the next request to use the new version at
    # once: without a latest cache, the service sees them as soon as they are committed.
    return ServiceSettings(
        preset=preset.model_dump(), registry=str(tenant_registry), registry_cache_ttl_s=0,
        image_store_dir=str(tmp_path_factory.mktemp("tenant-images")),
        api_keys=[{"tenant": "acme", "key": ACME_KEY}, {"tenant": "globex", "key": GLOBEX_KEY},
                  {"tenant": "acme", "key": ACME_BATCH_KEY, "priority": "batch"},
                  {"tenant": "acme", "key": ACME_RAISABLE_KEY, "priority": "batch", "max_priority": "interactive"}],
    )


@pytest.fixture(scope="module")
def app(local_pipeline, settings):
    return create_app(LocalBackend(local_pipeline, settings.open_registry()), settings)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def as_(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _png(response) -> bytes:
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"][0]["b64_json"])


@pytest.mark.parametrize("headers", [{}, as_("sk-not-a-key-of-anyone-123"), {"Authorization": f"Basic {ACME_KEY}"},
                                     {"Authorization": "Bearer "}])
@pytest.mark.parametrize("method,path", [("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"),
                                         ("GET", "/v1/models"), ("GET", "/v1/adapters"),
                                         ("GET", "/v1/adapters/acme/shared-style"),
                                         ("DELETE", "/v1/adapters/acme/shared-style")])
def test_no_key_or_a_wrong_key_is_401(client, method, path, headers):
    r = client.request(method, path, headers=headers, json=PROMPT if method == "POST" else None)
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and error["param"] == "authorization"


def test_health_and_schema_need_no_key(client):
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"


def test_a_tenant_lists_its_own_and_public_adapters_only(client):
    def listed(key, **params):
        r = client.get("/v1/adapters", headers=as_(key), params=params)
        assert r.status_code == 200, r.text
        return sorted(a["id"] for a in r.json()["data"])

    assert listed(ACME_KEY) == ["acme/private-style@v1", "acme/shared-style@v1"]
    assert listed(GLOBEX_KEY) == ["acme/shared-style@v1", "globex/secret@v1"]
    assert listed(ACME_KEY, tenant="globex") == []
    shown = client.get("/v1/adapters/acme/shared-style", headers=as_(GLOBEX_KEY)).json()
    assert shown["visibility"] == "public" and shown["tenant"] == "acme" and shown["version"] == 1


def test_another_tenants_private_adapter_does_not_exist_for_you(client):
    for path in ("/v1/adapters/globex/secret", "/v1/adapters/globex/secret?version=1"):
        r = client.get(path, headers=as_(ACME_KEY))
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found", r.text
    used = client.post("/v1/images/generations", headers=as_(ACME_KEY), json={**PROMPT, "lora": "globex/secret"})
    missing = client.post("/v1/images/generations", headers=as_(ACME_KEY), json={**PROMPT, "lora": "globex/nothing"})
    assert used.status_code == missing.status_code == 404
    assert used.json()["error"]["param"] == "lora"
    # Indistinguishable from an adapter that does not exist: the same message but for the name.
    assert used.json()["error"]["message"].replace("secret", "X") == missing.json()["error"]["message"].replace(
        "nothing", "X")
    # The owner can use it.
    assert _png(client.post("/v1/images/generations", headers=as_(GLOBEX_KEY), json={**PROMPT, "lora": "globex/secret"}))


def test_every_entry_of_a_list_goes_through_the_acl(client):
    def error(key, lora) -> dict:
        r = client.post("/v1/images/generations", headers=as_(key), json={**PROMPT, "lora": lora})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "adapter_not_found"
        return r.json()["error"]

    hidden = error(ACME_KEY, ["acme/private-style", "globex/secret"])
    missing = error(ACME_KEY, ["acme/private-style", "globex/nothing"])
    assert hidden["param"] == missing["param"] == "lora[1]"
    assert hidden["message"].replace("secret", "X") == missing["message"].replace("nothing", "X")
    assert error(GLOBEX_KEY, ["acme/shared-style", "acme/private-style@v1:0.5"])["param"] == "lora[1]"
    assert error(GLOBEX_KEY, ["acme/private-style"])["param"] == "lora[0]"
    edit = client.post("/v1/images/edits", headers=as_(GLOBEX_KEY),
                       json={**PROMPT, "image": white_png_b64(), "lora": ["globex/secret", "acme/private-style"]})
    assert edit.status_code == 404 and edit.json()["error"]["param"] == "lora[1]", edit.text


@pytest.fixture(scope="module")
def recording(preset, settings):
    """(client, backend) of the real app with these keys over a backend that records the specs."""
    yield from recording_app(preset, settings)


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_priority_defaults_to_the_keys_up_to_its_ceiling_and_the_spec_names_the_tenant(recording, path):
    client, backend = recording
    body = {**PROMPT, **({"image": white_png_b64()} if path.endswith("edits") else {})}

    def spec_of(key, **fields):
        r = client.post(path, headers=as_(key), json={**body, **fields})
        assert r.status_code == 200, r.text
        return backend.specs[-1]

    assert (spec_of(ACME_KEY).priority, spec_of(ACME_KEY).tenant) == ("interactive", "acme")
    assert (spec_of(ACME_BATCH_KEY).priority, spec_of(ACME_BATCH_KEY).tenant) == ("batch", "acme")
    assert spec_of(ACME_KEY, priority="batch").priority == "batch"  # a key may always ask for less
    # A batch key's ceiling is batch: asking for interactive is 403 naming `priority`, and nothing is run.
    runs = len(backend.specs)
    r = client.post(path, headers=as_(ACME_BATCH_KEY), json={**body, "priority": "interactive"})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["param"] == "priority" and "'batch' at most" in r.json()["error"]["message"]
    assert len(backend.specs) == runs
    assert spec_of(ACME_RAISABLE_KEY).priority == "batch"  # max_priority lets a batch key ask for more
    assert spec_of(ACME_RAISABLE_KEY, priority="interactive").priority == "interactive"
    assert spec_of(GLOBEX_KEY, priority="batch").tenant == "globex"
    stacked = spec_of(GLOBEX_KEY, lora=["globex/secret:0.5", "acme/shared-style"])
    assert [(a.ref, a.scale) for a in stacked.adapters] == [("globex/secret@v1", 0.5), ("acme/shared-style@v1", 1.0)]


def test_url_images_are_kept_as_their_tenants(recording, settings):
    """A `url` response's image is stored in its tenant's folder of the image store (which evicts per tenant,
    tests/test_image_store.py), and the URL, which names no tenant, serves it."""
    client, _ = recording
    r = client.post("/v1/images/generations", headers=as_(GLOBEX_KEY), json={**PROMPT, "response_format": "url"})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    name = url.rsplit("/", 1)[-1]
    assert "globex" not in url
    assert client.get(f"/v1/files/images/{name}", headers=as_(GLOBEX_KEY)).status_code == 200
    assert (Path(settings.image_store_dir) / "tenants" / "globex" / name).is_file()


def test_own_and_public_adapters_are_applied(client):
    plain = _png(client.post("/v1/images/generations", headers=as_(GLOBEX_KEY), json=PROMPT))
    public = _png(client.post("/v1/images/generations", headers=as_(GLOBEX_KEY),
                              json={**PROMPT, "lora": "acme/shared-style"}))
    own = _png(client.post("/v1/images/generations", headers=as_(ACME_KEY),
                           json={**PROMPT, "lora": "acme/private-style@v1"}))
    assert len({plain, public, own}) == 3  # each adapter changes the image, and differently
    # Needs the in-process pipeline to apply spec.adapters (LocalPipeline taking GenerationSpec.adapters).
    stacked = _png(client.post("/v1/images/generations", headers=as_(GLOBEX_KEY),
                               json={**PROMPT, "lora": ["globex/secret", "acme/shared-style:0.7"]}))
    alone = _png(client.post("/v1/images/generations", headers=as_(GLOBEX_KEY),
                             json={**PROMPT, "lora": "globex/secret"}))
    assert len({plain, public, alone, stacked}) == 4  # the stack is neither adapter alone


def test_only_the_owner_deletes(client, local_pipeline, settings, tmp_path):
    registry = open_registry(settings.registry)
    for seed in (4, 5):
        publish_lora_adapter(settings.registry, local_pipeline.preset, "acme", "doomed", seed, tmp_path,
                             manifest={"visibility": "public"})

    r = client.delete("/v1/adapters/acme/doomed", headers=as_(GLOBEX_KEY))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    r = client.delete("/v1/adapters/globex/secret", headers=as_(ACME_KEY))
    assert r.status_code == 404, r.text
    assert registry.resolve("globex/secret").version == 1  # untouched

    r = client.delete("/v1/adapters/acme/doomed?version=1", headers=as_(ACME_KEY))
    assert r.status_code == 200 and r.json()["deleted"] == ["acme/doomed@v1"], r.text
    r = client.delete("/v1/adapters/acme/doomed", headers=as_(ACME_KEY))
    assert r.status_code == 200 and r.json()["deleted"] == ["acme/doomed@v2"], r.text
    assert client.get("/v1/adapters/acme/doomed", headers=as_(ACME_KEY)).status_code == 404
    r = client.post("/v1/images/generations", headers=as_(ACME_KEY), json={**PROMPT, "lora": "acme/doomed"})
    assert r.status_code == 404


def test_api_keys_are_never_logged_or_echoed(client, settings, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-but-close-" + ACME_KEY[-8:]
    r = client.post("/v1/images/generations", headers=as_(wrong), json=PROMPT)
    assert r.status_code == 401 and wrong not in r.text
    _png(client.post("/v1/images/generations", headers=as_(ACME_KEY), json=PROMPT))
    assert "rejected an unknown API key" in caplog.text  # the attempt is logged ...
    for secret in (ACME_KEY, GLOBEX_KEY, wrong):  # ... the keys are not
        assert secret not in caplog.text
        assert secret not in repr(settings) and secret not in settings.model_dump_json()


def test_settings_refuse_auth_without_keys_and_read_keys_from_the_environment(monkeypatch):
    with pytest.raises(ValidationError, match="api_keys"):
        ServiceSettings()
    with pytest.raises(ValidationError, match="key"):
        ServiceSettings(api_keys=[{"tenant": "acme", "key": "short"}])
    with pytest.raises(ValidationError, match="tenant"):
        ServiceSettings(api_keys=[{"tenant": "../etc", "key": ACME_KEY}])
    with pytest.raises(ValidationError, match="priority"):
        ServiceSettings(api_keys=[{"tenant": "acme", "key": ACME_KEY, "priority": "urgent"}])
    with pytest.raises(ValidationError, match="default_priority"):
        ServiceSettings(auth_enabled=False, default_priority="urgent")
    monkeypatch.setenv("LIGHTRAY_API_KEYS", f'[{{"tenant": "acme", "key": "{ACME_KEY}"}}]')
    settings = ServiceSettings()
    assert settings.auth_enabled and [k.tenant for k in settings.api_keys] == ["acme"]
    assert settings.api_keys[0].key.get_secret_value() == ACME_KEY


def test_auth_is_off_only_in_the_local_config(monkeypatch):
    from lightray.config import REPO_ROOT

    def args(name):
        return yaml.safe_load((REPO_ROOT / "configs/serve" / name).read_text())["applications"][0]["args"]

    assert args("local.yaml")["auth_enabled"] is False
    assert "auth_enabled" not in args("gpu.yaml") and "api_keys" not in args("gpu.yaml")  # on; keys from env only
    monkeypatch.delenv("LIGHTRAY_API_KEYS", raising=False)
    with pytest.raises(ValidationError, match="api_keys"):
        ServiceSettings(**args("gpu.yaml"))


def test_openai_client_with_an_api_key_over_http(app):
    with serve_in_thread(app) as url:
        base_url = f"{url}/v1"
        good = openai.OpenAI(api_key=ACME_KEY, base_url=base_url)
        result = good.images.generate(prompt=PROMPT["prompt"], model=PROMPT["model"], size="64x64",
                                      response_format="b64_json", extra_body={"seed": 3, "lora": "acme/shared-style"})
        assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="sk-not-a-key-of-anyone-123", base_url=base_url).models.list()
        assert httpx.get(f"{url}/healthz").status_code == 200
