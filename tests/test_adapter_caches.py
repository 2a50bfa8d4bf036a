"""Issue 30, findings 4 and 7 at the ingress: a deleted version is refused by every ingress within the cache TTL and
its number is never reused; a pin carries the manifest's checksum, which is what the loading side checks; another
tenant's private adapter and an absent one take the same path; `GET /v1/adapters` is paged, cached and admitted.
Over the real app with a backend that records specs (no stages run)."""

from __future__ import annotations

import shutil
import time

import pytest
from fastapi.testclient import TestClient

from lightray.adapters import checkout_for_preset, resolve_adapters
from lightray.contracts import AdapterUse
from lightray.registry import AdapterNotFound, AdapterRegistry
from recording_backend import RecordingBackend
from serve_app.api import create_app
from serve_app.settings import ServiceSettings
from testing.adapters import publish_placeholder_adapter

ACME_KEY = "sk-acme-0c5e9b27d4a1f6e3"
GLOBEX_KEY = "sk-globex-71d3a9c05b8e2f4a"
TTL_S = 0.5
PROMPT = {"prompt": "a red circle", "model": "lightray-shapes-lightning-4", "seed": 3, "size": "64x64"}


def as_(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def registry_root(tmp_path):
    return tmp_path / "registry"


def ingress(preset, registry_root, tmp_path, **settings) -> tuple[TestClient, RecordingBackend]:
    """One ingress (an app object of its own, with its own manifest cache) over the shared registry folder."""
    settings = ServiceSettings(**{
        "preset": preset.model_dump(), "registry": str(registry_root), "registry_cache_ttl_s": TTL_S,
        "image_store_dir": str(tmp_path / "images"),
        "api_keys": [{"tenant": "acme", "key": ACME_KEY}, {"tenant": "globex", "key": GLOBEX_KEY}], **settings})
    backend = RecordingBackend(preset)
    return TestClient(create_app(backend, settings), base_url="http://localhost"), backend


def generate(client, key, lora):
    return client.post("/v1/images/generations", headers=as_(key), json={**PROMPT, "lora": lora})


def test_a_deleted_version_is_refused_by_every_ingress_within_the_ttl(preset, registry_root, tmp_path):
    v1 = publish_placeholder_adapter(registry_root, preset, "acme", "style", tmp_path)
    (a, recorded), (b, _) = ingress(preset, registry_root, tmp_path), ingress(preset, registry_root, tmp_path)
    with a, b:
        assert generate(a, ACME_KEY, "acme/style@v1").status_code == 200
        assert recorded.specs[-1].adapters == (AdapterUse("acme/style@v1", 1.0, v1.checksum),)  # pinned to content
        r = b.delete("/v1/adapters/acme/style?version=1", headers=as_(ACME_KEY))
        assert r.status_code == 200, r.text
        time.sleep(TTL_S)
        for client in (a, b):  # a, which had v1 cached, too
            r = generate(client, ACME_KEY, "acme/style@v1")
            assert r.status_code == 404 and r.json()["error"]["param"] == "lora", r.text
            assert client.get("/v1/adapters/acme/style?version=1", headers=as_(ACME_KEY)).status_code == 404
        # Republished: a new number, never a second v1.
        v2 = publish_placeholder_adapter(registry_root, preset, "acme", "style", tmp_path, visibility="public")
        assert v2.version == 2
        time.sleep(TTL_S)
        for client in (a, b):
            assert generate(client, ACME_KEY, "acme/style@v1").status_code == 404
            assert generate(client, GLOBEX_KEY, "acme/style").status_code == 200
        assert recorded.specs[-1].adapters[0].ref == "acme/style@v2"


def test_a_pin_is_refused_where_adapters_load_once_its_ref_names_other_content(preset, registry_root, tmp_path):
    """Even a registry wiped by hand and rebuilt with the same numbers cannot make a pin load other weights: the
    loading side (Denoiser, in-process backend) checks the manifest checksum the ingress pinned."""
    publish_placeholder_adapter(registry_root, preset, "acme", "style", tmp_path)
    registry = AdapterRegistry(str(registry_root), cache_dir=tmp_path / "cache")
    [pinned] = resolve_adapters(registry, preset, [AdapterUse("acme/style")], ["lora"], tenant="acme")
    manifest, files = checkout_for_preset(registry, pinned.use, preset)
    files.release()
    assert manifest.checksum == pinned.use.checksum

    shutil.rmtree(registry_root / "acme")  # by hand, past the registry: tombstones gone too
    publish_placeholder_adapter(registry_root, preset, "acme", "style", tmp_path, trigger_words=["other"])
    fresh = AdapterRegistry(str(registry_root), cache_dir=tmp_path / "cache")
    with pytest.raises(AdapterNotFound):
        checkout_for_preset(fresh, pinned.use, preset)
    other, files = checkout_for_preset(fresh, AdapterUse("acme/style@v1"), preset)
    assert other.checksum != manifest.checksum
    assert files.path == fresh.cache_path(other) != registry.cache_path(manifest)  # each content its own folder
    files.release()


def test_a_private_ref_and_an_absent_one_take_the_same_path(preset, registry_root, tmp_path, monkeypatch):
    """Finding 7: probing another tenant's private adapter reads the store exactly as often as probing one that does
    not exist (once per TTL, both), and the answers differ only by the name asked for."""
    publish_placeholder_adapter(registry_root, preset, "acme", "private", tmp_path)
    client, _ = ingress(preset, registry_root, tmp_path, registry_cache_ttl_s=60)
    registry = client.app.state.registry
    reads: list[str] = []
    for method in ("cat_file", "ls", "find", "exists", "cat"):
        real = getattr(registry.fs, method)
        monkeypatch.setattr(registry.fs, method,
                            lambda path, *a, _real=real, **k: (reads.append(str(path)), _real(path, *a, **k))[1])

    def probe(ref: str) -> tuple[int, dict, int, dict]:
        counts, errors = [], []
        for _ in range(2):
            before = len(reads)
            r = generate(client, GLOBEX_KEY, ref)
            assert r.status_code == 404, r.text
            counts.append(len(reads) - before)
            errors.append(r.json()["error"])
        assert errors[0] == errors[1]
        return counts[0], errors[0], counts[1], client.get(f"/v1/adapters/{ref.replace('@v', '?version=')}",
                                                         headers=as_(GLOBEX_KEY)).json()["error"]

    with client:
        for hidden, absent in [("acme/private", "acme/absent"), ("acme/private@v1", "acme/absent@v1")]:
            first_hidden, error_hidden, again_hidden, shown_hidden = probe(hidden)
            first_absent, error_absent, again_absent, shown_absent = probe(absent)
            assert first_hidden == first_absent > 0
            assert again_hidden == again_absent == 0
            assert str(error_hidden).replace("private", "X") == str(error_absent).replace("absent", "X")
            assert str(shown_hidden).replace("private", "X") == str(shown_absent).replace("absent", "X")


def test_the_adapter_list_is_paged_cached_and_admitted(preset, registry_root, tmp_path):
    for tenant, name, visibility in [("acme", "a", "private"), ("acme", "b", "public"), ("acme", "c", "private"),
                                     ("globex", "d", "public"), ("globex", "e", "private")]:
        publish_placeholder_adapter(registry_root, preset, tenant, name, tmp_path, visibility=visibility)
    publish_placeholder_adapter(registry_root, preset, "acme", "a", tmp_path)  # acme/a@v2
    client, _ = ingress(preset, registry_root, tmp_path, registry_cache_ttl_s=60, max_concurrent_requests=1)

    def pages(key: str, **params) -> list[list[str]]:
        out, after = [], None
        while True:
            r = client.get("/v1/adapters", headers=as_(key), params={**params, **({"after": after} if after else {})})
            assert r.status_code == 200, r.text
            page = r.json()
            out.append([a["id"] for a in page["data"]])
            if not page["has_more"]:
                return out
            assert page["last_id"] == out[-1][-1] and page["first_id"] == out[-1][0]
            after = page["last_id"]

    with client:
        assert pages(ACME_KEY, limit=2) == [["acme/a@v2", "acme/b@v1"], ["acme/c@v1", "globex/d@v1"]]
        assert pages(GLOBEX_KEY, limit=2, all_versions=True) == [["acme/b@v1", "globex/d@v1"], ["globex/e@v1"]]
        assert pages(ACME_KEY, limit=1, all_versions=True)[:3] == [["acme/a@v1"], ["acme/a@v2"], ["acme/b@v1"]]
        assert pages(ACME_KEY, after="acme/b") == [["acme/b@v1", "acme/c@v1", "globex/d@v1"]]
        # Cached: a publish elsewhere shows once the TTL (here 60 s) has passed, not before.
        publish_placeholder_adapter(registry_root, preset, "acme", "new", tmp_path)
        assert "acme/new@v1" not in sum(pages(ACME_KEY), [])
        # Bad input: a 400 naming the field.
        for params, field in [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"after": "../etc"}, "after")]:
            r = client.get("/v1/adapters", headers=as_(ACME_KEY), params=params)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        # Admitted: with the ingress's one slot taken, the listing waits its turn like a generation.
        with client.app.state.admission.slot():
            r = client.get("/v1/adapters", headers=as_(ACME_KEY))
            assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        assert client.get("/v1/adapters", headers=as_(ACME_KEY)).status_code == 200
