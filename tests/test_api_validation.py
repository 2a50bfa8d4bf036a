"""The HTTP contract: every malformed request gets a 4xx whose error names the field, before any replica work.

Runs against the real FastAPI app over the in-process pipeline (no cluster needed for the contract); the
Ray graph serves the same app (tests/test_graph.py)."""

from __future__ import annotations

import base64
import dataclasses
import io

import pytest
from PIL import Image

from testing.adapters import publish_lora_adapter, publish_placeholder_adapter
from lightray.adapters import resolve_adapters
from lightray.registry_settings import open_registry
from lightray.contracts import AdapterUse
from lightray.errors import RequestError
from lightray.schemas import EditSpec, parse_lora_field
from serve_app.errors import http_status
from recording_backend import recording_app, white_png_b64
from serve_app.settings import ServiceSettings

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
        ({"priority": "urgent"}, 400, "priority"),
        ({"priority": 1}, 400, "priority"),
        ({"seeds": ["one"]}, 400, "seeds[0]"),
        ({"seed": True}, 400, "seed"),  # pydantic would read true as 1
        ({"n": False}, 400, "n"),
        ({"seeds": [True]}, 400, "seeds[0]"),
        ({"output_format": "gif"}, 400, "output_format"),
        ({"output_format": "jpeg", "output_compression": 101}, 400, "output_compression"),
        ({"output_format": "jpeg", "output_compression": -1}, 400, "output_compression"),
        ({"output_format": "webp", "output_compression": True}, 400, "output_compression"),
        ({"output_format": "png", "output_compression": 50}, 400, "output_compression"),
        ({"output_compression": 50}, 400, "output_compression"),  # no output_format means png
        ({"background": "transparent"}, 400, "background"),
        ({"quality": "ultra"}, 400, "quality"),
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


# ------------------------------------------------------------------------------ stacked adapters, priority

STACK = "stacking"
"""Tenant of this module's adapters in the session's registry (no other test publishes under it)."""


@pytest.fixture(scope="module")
def stack_adapters(preset, registry_root, tmp_path_factory) -> None:
    """In the api_client's registry: stacking/style and stacking/subject for the served model, stacking/foreign for
    another base model (placeholders: these tests only resolve them)."""
    work = tmp_path_factory.mktemp("stack-adapters")
    publish_placeholder_adapter(registry_root, preset, STACK, "style", work)
    publish_placeholder_adapter(registry_root, preset, STACK, "subject", work)
    publish_placeholder_adapter(registry_root, preset, STACK, "foreign", work, base_model_id="someone/other-base")


BAD_LORA = [
    # (lora, status, param, code)
    ([], 400, "lora", "invalid_value"),  # an empty list is not "no adapter" (the field's description says so)
    ([f"{STACK}/a{i}" for i in range(5)], 400, "lora", "invalid_value"),  # more than MAX_STACKED_ADAPTERS
    (7, 400, "lora", "invalid_value"),
    ({"ref": f"{STACK}/style"}, 400, "lora", "invalid_value"),
    ("", 400, "lora", "invalid_value"),
    ("no-slash", 400, "lora", "invalid_value"),
    (f"{STACK}/style:9", 400, "lora", "invalid_value"),
    ([f"{STACK}/style", 3], 400, "lora[1]", "invalid_value"),
    ([f"{STACK}/style", ""], 400, "lora[1]", "invalid_value"),
    ([f"{STACK}/style", None], 400, "lora[1]", "invalid_value"),
    ([f"{STACK}/style", "no-slash"], 400, "lora[1]", "invalid_value"),
    ([f"{STACK}/style", f"{STACK}/subject:9"], 400, "lora[1]", "invalid_value"),  # scale beyond ±4
    ([f"{STACK}/style", f"{STACK}/sub ject"], 400, "lora[1]", "invalid_value"),
    # the same adapter twice, whatever its version and scale: named at its second occurrence
    ([f"{STACK}/style:0.5", f"{STACK}/style@v1"], 400, "lora[1]", "invalid_value"),
    ([f"{STACK}/style", f"{STACK}/subject", f"{STACK}/style:2"], 400, "lora[2]", "invalid_value"),
    (f"{STACK}/none-such", 404, "lora", "adapter_not_found"),
    ([f"{STACK}/none-such"], 404, "lora[0]", "adapter_not_found"),
    ([f"{STACK}/style", f"{STACK}/none-such"], 404, "lora[1]", "adapter_not_found"),
    ([f"{STACK}/style", f"{STACK}/subject@v9"], 404, "lora[1]", "adapter_not_found"),
    (f"{STACK}/foreign", 422, "lora", "adapter_incompatible"),
    ([f"{STACK}/style", f"{STACK}/foreign"], 422, "lora[1]", "adapter_incompatible"),
]


def _assert_error(r, status: int, param: str, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    return err


@pytest.mark.parametrize("lora, status, param, code", BAD_LORA)
def test_bad_lora_is_4xx_naming_the_entry(api_client, stack_adapters, lora, status, param, code):
    err = _assert_error(api_client.post("/v1/images/generations", json={**OK, "lora": lora}), status, param, code)
    if status == 404:  # as for a single adapter: it names the ref only (another tenant's looks the same)
        assert err["message"].startswith(f"adapter '{STACK}/") and err["message"].endswith("' does not exist")
    else:
        assert param in err["message"]


@pytest.mark.parametrize("lora, status, param, code", BAD_LORA)
def test_bad_lora_in_an_edit_is_4xx_naming_the_entry(api_client, stack_adapters, lora, status, param, code):
    body = {**OK, "image": white_png_b64(), "lora": lora}
    _assert_error(api_client.post("/v1/images/edits", json=body), status, param, code)


def test_lora_as_form_fields(api_client, stack_adapters):
    """In a multipart edit `lora` is one field (the single string), repeated or `lora[]` fields, or a JSON list."""
    image = {"image": ("in.png", base64.b64decode(white_png_b64()), "image/png")}

    def edit(fields: dict[str, str | list[str]]):
        return api_client.post("/v1/images/edits", files=image, data={"prompt": "x", **fields})

    _assert_error(edit({"lora": f"{STACK}/none-such"}), 404, "lora", "adapter_not_found")
    _assert_error(edit({"lora[]": f"{STACK}/none-such"}), 404, "lora[0]", "adapter_not_found")
    for fields in ({"lora": [f"{STACK}/style", f"{STACK}/none-such"]},
                   {"lora[]": [f"{STACK}/style", f"{STACK}/none-such"]},
                   {"lora": f'["{STACK}/style", "{STACK}/none-such"]'}):
        _assert_error(edit(fields), 404, "lora[1]", "adapter_not_found")
    _assert_error(edit({"lora": [f"{STACK}/a{i}" for i in range(5)]}), 400, "lora", "invalid_value")


def test_openapi_shows_lora_as_string_or_list_and_priority(api_client):
    schema = api_client.get("/openapi.json").json()
    lora = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]["lora"]
    kinds = {member.get("type") for member in lora["anyOf"]}
    assert kinds == {"string", "array", "null"}
    array = next(m for m in lora["anyOf"] if m.get("type") == "array")
    assert array["items"]["type"] == "string" and array["maxItems"] == 4 and array["minItems"] == 1
    priority = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]["priority"]
    assert {"enum": ["interactive", "batch"], "type": "string"} in priority["anyOf"]
    edits = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert "lora" in edits["application/json"]["schema"]["properties"]
    form_array = next(m for m in edits["multipart/form-data"]["schema"]["properties"]["lora"]["anyOf"]
                      if m.get("type") == "array")
    assert "minItems" not in form_array  # an empty form list is no field at all, which is valid


@pytest.fixture(scope="module")
def recording(preset, registry_root, tmp_path_factory, stack_adapters):
    """(client, backend) of the real app, auth off with default_priority "batch", over a backend that records
    the specs instead of generating."""
    # Tests publish through registry objects of their own and expect the next request to use the new version at
    # once: without a latest cache, the service sees them as soon as they are committed.
    settings = ServiceSettings(preset=preset.model_dump(), registry=str(registry_root), registry_cache_ttl_s=0,
                               auth_enabled=False,
                               default_priority="batch", image_store_dir=str(tmp_path_factory.mktemp("rec-images")))
    yield from recording_app(preset, settings)


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_the_router_pins_stacked_adapters_and_sets_priority(recording, path):
    client, backend = recording
    extra = {"image": white_png_b64()} if path.endswith("edits") else {}

    r = client.post(path, json={**OK, **extra, "lora": [f"{STACK}/subject:-0.5", f"{STACK}/style@v1"]})
    assert r.status_code == 200, r.text
    spec = backend.specs[-1]
    assert [(a.ref, a.scale) for a in spec.adapters] == [(f"{STACK}/subject@v1", -0.5), (f"{STACK}/style@v1", 1.0)]
    assert all(len(a.checksum) == 64 for a in spec.adapters)  # pinned to the manifest's content too
    assert spec.priority == "batch" and spec.tenant is None  # the service's default_priority (auth off)
    if path.endswith("edits"):
        assert isinstance(spec, EditSpec) and all(isinstance(a, AdapterUse) for a in spec.adapters)

    r = client.post(path, json={**OK, **extra, "lora": f"{STACK}/style:0.25", "priority": "interactive"})
    assert r.status_code == 200, r.text
    assert [(a.ref, a.scale) for a in backend.specs[-1].adapters] == [(f"{STACK}/style@v1", 0.25)]
    assert backend.specs[-1].priority == "interactive"

    assert client.post(path, json={**OK, **extra}).status_code == 200
    assert backend.specs[-1].adapters == ()


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_the_core_request_is_frozen_and_carries_the_request_id_to_the_denoiser(recording, path):
    client, backend = recording
    extra = {"image": white_png_b64()} if path.endswith("edits") else {}
    r = client.post(path, json={**OK, **extra}, headers={"X-Request-Id": "req-core-1"})
    assert r.status_code == 200, r.text
    spec = backend.specs[-1]
    assert spec.request_id == "req-core-1" and spec.denoise_params().request_id == "req-core-1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.priority = "interactive"


# Needs the in-process pipeline to apply spec.adapters (LocalPipeline taking GenerationSpec.adapters).
def test_stacked_adapters_generate_and_each_changes_the_image(api_client, preset, registry_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("stack-real-adapters")
    first = publish_lora_adapter(registry_root, preset, STACK, "real-first", 31, work).ref
    second = publish_lora_adapter(registry_root, preset, STACK, "real-second", 32, work).ref

    def png(**fields) -> bytes:
        r = api_client.post("/v1/images/generations", json={**OK, "seed": 5, **fields})
        assert r.status_code == 200, r.text
        return base64.b64decode(r.json()["data"][0]["b64_json"])

    plain, one, two = png(), png(lora=first), png(lora=second)
    stacked = png(lora=[first, f"{second}:0.8"])
    assert len({plain, one, two, stacked}) == 4
    assert png(lora=[first]) == one  # a list of one is that adapter
    r = api_client.post("/v1/images/edits", json={**OK, "image": white_png_b64(), "lora": [first, second]})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------- resolution, unit level

def test_parse_lora_field():
    assert parse_lora_field(None) == ()
    assert parse_lora_field("acme/style") == (AdapterUse("acme/style", 1.0),)
    assert parse_lora_field(["acme/style@v2:0.5", "acme/subject:-1", "globex/style"]) == (
        AdapterUse("acme/style@v2", 0.5), AdapterUse("acme/subject", -1.0), AdapterUse("globex/style", 1.0))
    for value, param in [("acme", "lora"), (["acme/a", "acme"], "lora[1]"), (["acme/a", "acme/b:5"], "lora[1]"),
                         (["acme/a", "acme/b", "acme/a@v3:0.1"], "lora[2]")]:
        with pytest.raises(RequestError) as err:
            parse_lora_field(value)
        assert (err.value.param, http_status(err.value)) == (param, 400)


@pytest.fixture(scope="module")
def unit_registry(preset, tmp_path_factory):
    root = tmp_path_factory.mktemp("unit-registry")
    work = tmp_path_factory.mktemp("unit-adapters")
    for _ in range(2):
        publish_placeholder_adapter(root, preset, "acme", "style", work)  # v1, v2
    publish_placeholder_adapter(root, preset, "acme", "subject", work)
    publish_placeholder_adapter(root, preset, "globex", "secret", work)
    publish_placeholder_adapter(root, preset, "globex", "shared", work, visibility="public")
    publish_placeholder_adapter(root, preset, "acme", "foreign", work, base_model_id="someone/other-base")
    return open_registry(str(root))


def test_resolve_adapters_pins_in_order_with_the_tenants_acl(unit_registry, preset):
    uses = parse_lora_field(["acme/style:0.5", "globex/shared", "acme/subject@v1:-2"])
    resolved = resolve_adapters(unit_registry, preset, uses, ["lora[0]", "lora[1]", "lora[2]"], tenant="acme")
    assert [a.use for a in resolved] == [AdapterUse("acme/style@v2", 0.5, resolved[0].manifest.checksum),
                                         AdapterUse("globex/shared@v1", 1.0, resolved[1].manifest.checksum),
                                         AdapterUse("acme/subject@v1", -2.0, resolved[2].manifest.checksum)]
    assert [a.manifest.tenant for a in resolved] == ["acme", "globex", "acme"]
    pinned = resolve_adapters(unit_registry, preset, [AdapterUse("acme/style@v1")], ["lora"], tenant="acme")
    assert pinned[0].ref == "acme/style@v1"
    # No tenancy (auth off): every adapter is usable.
    assert resolve_adapters(unit_registry, preset, [AdapterUse("globex/secret")], ["lora"])[0].ref == "globex/secret@v1"

    def error(uses, tenant="acme") -> RequestError:
        with pytest.raises(RequestError) as err:
            resolve_adapters(unit_registry, preset, uses, [f"lora[{i}]" for i in range(len(uses))], tenant=tenant)
        return err.value

    hidden = error([AdapterUse("acme/style"), AdapterUse("globex/secret")])
    missing = error([AdapterUse("acme/style"), AdapterUse("globex/nothing")])
    assert (http_status(hidden), hidden.param, hidden.code) == (404, "lora[1]", "adapter_not_found")
    assert hidden.message.replace("secret", "X") == missing.message.replace("nothing", "X")
    assert error([AdapterUse("acme/style@v3")]).param == "lora[0]"
    foreign = error([AdapterUse("acme/subject"), AdapterUse("acme/foreign")])
    assert (http_status(foreign), foreign.param, foreign.code) == (422, "lora[1]", "adapter_incompatible")
    with pytest.raises(ValueError, match="params"):
        resolve_adapters(unit_registry, preset, [AdapterUse("acme/style")], ["lora", "lora[1]"])
