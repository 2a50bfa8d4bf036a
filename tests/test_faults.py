"""Faults on a running service: a Denoiser replica killed while requests are in flight, and adapters that are
corrupt or missing in the registry. The service must recover by itself and every request must end with an
answer (images, or an error that says what failed), never a hang or a dropped connection.

These tests kill replicas, so they run on a Ray cluster of their own (module scope), not the session's
`service`, with a short request timeout so that a hang would show within the test's bounds."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lightray.registry_settings import open_registry
from testing.local_cluster import RayCluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on the left, white background"
REQUEST_TIMEOUT_S = 30  # the service's own bound (504 past it); clients wait longer, so a hang shows as one
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 60
RECOVERY_BOUND_S = 240  # generous: a replacement replica loads its model on a shared 2-core machine


def _publish_broken_adapters(registry_root: Path, src: Path, preset) -> dict[str, str]:
    """One good adapter, one whose weights get a flipped byte after publishing, one whose weights are deleted,
    under a fresh tenant (no replica or cache can hold them already)."""
    registry = open_registry(str(registry_root))
    tenant = f"faults{uuid.uuid4().hex[:8]}"
    lightning = next(v.lightning_lora for v in preset.variants if v.lightning_lora)  # a real LoRA for this model
    shutil.copy(preset.resolve(lightning), src / "adapter_model.safetensors")
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8, "peft_type": "LORA"}))
    refs = {name: registry.publish(tenant, name, src, base_model_id=preset.base_model_id).ref
            for name in ("good", "corrupt", "missing")}
    weights = lambda name: registry_root / tenant / name / "v1" / "adapter_model.safetensors"  # noqa: E731
    data = bytearray(weights("corrupt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, wrong checksum
    weights("corrupt").write_bytes(bytes(data))
    weights("missing").unlink()
    return refs


def _assert_adapter_error(r: httpx.Response, ref: str, which: str) -> None:
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["param"] == "lora" and err["code"] == "adapter_corrupt" and err["type"] == "server_error", err
    assert ref in err["message"], err["message"]
    assert ("checksum mismatch" if which == "corrupt" else "missing") in err["message"], err["message"]


@pytest.mark.parametrize("which", ["corrupt", "missing"])
def test_broken_adapter_in_process_app(api_client, registry_root, preset, tmp_path, which):
    """The same contract without a cluster (the in-process backend, as the CLI's --local serves it)."""
    refs = _publish_broken_adapters(registry_root, tmp_path, preset)
    body = {"prompt": PROMPT, "size": "64x64", "seed": 2}
    _assert_adapter_error(api_client.post("/v1/images/generations", json={**body, "lora": refs[which]}),
                          refs[which], which)
    assert api_client.post("/v1/images/generations", json={**body, "lora": refs["good"]}).status_code == 200


@pytest.fixture(scope="module")
def faulty(preset, tmp_path_factory):
    """A service of its own: configs/serve/local.yaml on a private cluster, with a registry holding one good
    adapter and two broken ones (`_publish_broken_adapters`)."""
    registry_root = tmp_path_factory.mktemp("fault-registry")
    refs = _publish_broken_adapters(registry_root, tmp_path_factory.mktemp("adapter-src"), preset)
    cluster = RayCluster()
    cluster.env["LIGHTRAY_ADAPTER_CACHE"] = str(tmp_path_factory.mktemp("adapter-cache"))
    cluster.start()
    try:
        config = cluster.serve_config(REPO / "configs/serve/local.yaml", {
            "registry": str(registry_root), "request_timeout_s": REQUEST_TIMEOUT_S,
            "image_store_dir": str(tmp_path_factory.mktemp("fault-images")),
            "extra_presets": [],  # the text-to-image graph alone: the faults are injected there
        })
        cluster.deploy(config)
        yield cluster, refs
    finally:
        cluster.stop()


def _post(url: str, body: dict) -> httpx.Response | Exception:
    try:
        return httpx.post(f"{url}/v1/images/generations", json=body, timeout=CLIENT_TIMEOUT_S)
    except httpx.HTTPError as err:  # a dropped connection or a hang past the client's bound
        return err


def _assert_answered(r: httpx.Response | Exception, n: int) -> str:
    """Images, or an OpenAI-style error naming its cause; returns a short outcome label."""
    assert isinstance(r, httpx.Response), f"no answer: {type(r).__name__}: {r}"
    if r.status_code == 200:
        data = r.json()["data"]
        assert len(data) == n
        for d in data:
            img = Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))
            assert img.format == "PNG" and img.size == (64, 64)
        return "200"
    assert r.status_code in (503, 504), f"{r.status_code}: {r.text}"
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["message"], r.text
    if r.status_code == 503:
        assert int(r.headers["retry-after"]) > 0
        assert "Denoiser" in err["message"], err["message"]  # names the stage that failed
    return f"{r.status_code} {err['code']}: {err['message']}"


def _running(cluster: RayCluster, deployment: str) -> list[dict]:
    return [r for r in cluster.replicas()[deployment] if r["state"] == "RUNNING"]


def _wait_ready(cluster: RayCluster, bound_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < bound_s:
        try:
            if httpx.get(f"{cluster.http_url}/readyz", timeout=10).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"/readyz not 200 within {bound_s} s of the fault")


@pytest.mark.parametrize("which", ["corrupt", "missing"])
def test_broken_adapter_is_a_clear_error_and_replica_keeps_serving(faulty, which):
    """Runs before the kill test (file order), while the Denoiser is at its one steady replica."""
    cluster, refs = faulty
    url = cluster.http_url
    pids_before = {r["pid"] for r in _running(cluster, "Denoiser")}
    r = _post(url, {"prompt": PROMPT, "size": "64x64", "seed": 2, "lora": refs[which]})
    assert isinstance(r, httpx.Response), r
    _assert_adapter_error(r, refs[which], which)

    # The same replicas keep serving: plain requests and a good adapter.
    assert _assert_answered(_post(url, {"prompt": PROMPT, "size": "64x64", "seed": 3}), 1) == "200"
    good = _post(url, {"prompt": PROMPT, "size": "64x64", "seed": 3, "lora": refs["good"]})
    assert _assert_answered(good, 1) == "200"
    assert {r["pid"] for r in _running(cluster, "Denoiser")} == pids_before
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def test_killed_denoiser_replica_mid_request_recovers(faulty):
    cluster, _ = faulty
    url = cluster.http_url
    assert _assert_answered(_post(url, {"prompt": PROMPT, "size": "64x64", "seed": 0}), 1) == "200"  # warm
    victims = _running(cluster, "Denoiser")
    assert victims, cluster.replicas()
    # Base-model requests of 4 images (30 steps, true CFG: seconds each, and the Denoiser runs one at a time) make
    # the Denoiser the stage every request is in or waiting for when it dies. Lighter requests (Lightning, 8 steps)
    # would leave the queue at the VaeDecoder, which decodes one call at a time, with the Denoiser idle.
    body = {"prompt": PROMPT, "size": "64x64", "n": 4, "model": "lightray-shapes"}
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_post, url, {**body, "seed": i}) for i in range(8)]
        time.sleep(2.0)
        assert not all(f.done() for f in futures), "requests finished before the fault: nothing was in flight"
        for replica in victims:
            os.kill(replica["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        outcomes = [_assert_answered(f.result(), 4) for f in futures]
    answered_within = time.monotonic() - killed_at
    print("outcomes after killing the Denoiser:", outcomes, f"all answered {answered_within:.1f} s after the kill")
    # Requests the replica was working on cannot succeed: they end as a clear 503 (never a 500 or a hang).
    assert any(o.startswith("503") for o in outcomes), outcomes
    assert answered_within < REQUEST_TIMEOUT_S + 30

    recovered_in = _wait_ready(cluster, RECOVERY_BOUND_S)
    print(f"/readyz 200 again {recovered_in:.1f} s after the outcomes")
    new = _running(cluster, "Denoiser")
    assert new and not {r["replica_id"] for r in new} & {r["replica_id"] for r in victims}, "Serve did not replace it"
    assert _assert_answered(_post(url, {"prompt": PROMPT, "size": "64x64", "seed": 1}), 1) == "200"
