"""Lightray on a real multi-node Ray cluster (testing/multinode.py: a head and two worker raylets on this machine,
each with its own logical CPUs and a `lightray.io/pool` label), deployed from configs/serve/multinode.yaml, which
places the stages by label so each request crosses nodes.

In file order, on one cluster (module scope; about a minute to start on 2 cores):
1. placement: the Ingress, TextEncoder + VaeDecoder and Denoiser run on three different nodes, and one request's
   id shows up in the replica logs of both worker nodes;
2. a rolling update under steady load (`serve deploy` of a changed config: engine budget, adapter cache size and a
   second model version under a new `base_model_id`): 0 failed of >= 300, requests pinned to the old model finish on
   it, an adapter of the old base is a clear 400 on the new one; then the old model removed: 404 naming `model`;
3. a worker node killed (its raylet, workers and agents, by pid) under streaming and non-streaming load with tenant
   adapters: every request ends 200 or 503 naming a stage with Retry-After (a cut stream: an OpenAI error event),
   those in flight on the dying node included, the Denoiser comes back on the surviving node, the registry and the
   adapter cache are intact, and the node rejoins when restarted. Found here: under Ray's actor data plane a call
   in flight on a dying node was never failed (no ActorDiedError reached the ingress) and ended as a 504 at the
   request timeout; over the gRPC data plane Lightray runs (`lightray.ray_env.RAY_SERVE_DATA_PLANE`) the killed
   replica's connection fails it at once, and the ingress answers 503 naming the Denoiser.

Also: a config that cannot be placed (more GPUs than any node) is refused before `serve deploy`, naming the
deployment.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from lightray.config import load_preset
from testing.adapters import publish_lora_adapter
from testing.multinode import (MULTINODE_CONFIG, STAGES, ClosedLoad as Load, MultiNodeCluster, kill_under_load,
                               post as _post, status as _status)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REQUEST_TIMEOUT_S = 60  # past the ~30-40 s a lost stage takes to come back on 2 shared cores
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 40  # past the service's own bound: a hang shows as an exception
V1, V2 = "lightray-shapes", "lightray-shapes-v2"
V1_MODEL, V2_MODEL = "lightray-shapes-lightning-4", "lightray-shapes-v2-lightning-4"


def _label(pool: str) -> dict:
    return {"label_selector": {"lightray.io/pool": pool}}


# One replica of each fixed stage, as configs/serve/multinode.yaml has it: its `max_surge_percent: 100` starts each
# replacement before stopping the old replica, so a rolling update leaves no gap even at one replica.
BASE_DEPLOYMENTS: dict = {}
# The v2 graph while both versions are served: small shares on the same pools.
V2_DEPLOYMENTS = [
    {"name": f"TextEncoder-{V2}", "num_replicas": 1, "max_surge_percent": 100, "ray_actor_options": {"num_cpus": 0.05, **_label("text-vae")}},
    {"name": f"Denoiser-{V2}", "num_replicas": 1, "max_surge_percent": 100, "max_ongoing_requests": 16,
     "ray_actor_options": {"num_cpus": 0.1, **_label("denoiser"),
                           "fallback_strategy": [_label("text-vae")]}},
    {"name": f"VaeDecoder-{V2}", "num_replicas": 1, "max_surge_percent": 100, "ray_actor_options": {"num_cpus": 0.05, **_label("text-vae")}},
]


def _config(cluster: MultiNodeCluster, args: dict, name: str, extra_deployments: list[dict] = ()) -> Path:
    path = cluster.serve_config(MULTINODE_CONFIG, args, BASE_DEPLOYMENTS)
    data = yaml.safe_load(path.read_text())
    data["applications"][0]["deployments"] += list(extra_deployments)
    out = path.with_name(f"serve-multinode-{name}.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    registry_root = tmp_path_factory.mktemp("mn-registry")
    tenant = f"mn{uuid.uuid4().hex[:6]}"
    src = tmp_path_factory.mktemp("mn-adapter-src")
    refs = {
        "v1": publish_lora_adapter(registry_root, load_preset(V1), tenant, "style", 1, src).ref,
        "v2": publish_lora_adapter(registry_root, load_preset(V2), tenant, "style-v2", 2, src).ref,
    }
    cache = tmp_path_factory.mktemp("mn-adapter-cache")
    cluster = MultiNodeCluster()
    cluster.env["LIGHTRAY_ADAPTER_CACHE"] = str(cache)
    cluster.start()
    base_args = {"registry": str(registry_root), "registry_cache_ttl_s": 0, "request_timeout_s": REQUEST_TIMEOUT_S,
                 "image_store_dir": str(tmp_path_factory.mktemp("mn-images"))}
    try:
        cluster.deploy(_config(cluster, base_args, "v1"))
        yield {"cluster": cluster, "refs": refs, "registry": registry_root, "cache": cache, "args": base_args}
    finally:
        cluster.stop()


def test_each_request_crosses_nodes(multinode):
    cluster: MultiNodeCluster = multinode["cluster"]
    placed = cluster.stage_nodes()
    assert set(placed["Ingress"]) == {"head"}, placed
    assert set(placed["TextEncoder"]) == set(placed["VaeDecoder"]) == {"text-vae"}, placed
    assert set(placed["Denoiser"]) == {"denoiser"}, placed

    rid = f"cross-{uuid.uuid4().hex[:10]}"
    r = httpx.post(f"{cluster.http_url}/v1/images/generations", headers={"x-request-id": rid},
                   json={"prompt": "a red circle", "size": "64x64", "seed": 1}, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200, r.text
    # The request's id in the replica logs of each worker node: its denoise ran on `denoiser`, its encode and
    # decode on `text-vae` (each node writes its own replicas' logs under its own temp dir).
    deadline = time.time() + 20
    seen: dict[str, set[str]] = {}
    while time.time() < deadline:
        seen = {name: {p.name.split("_")[2] for p in Path(node.temp_dir).glob("session_*/logs/serve/replica_*.log")
                       if rid in p.read_text(errors="replace")}
                for name, node in cluster.workers.items()}
        if "Denoiser" in seen["denoiser"] and {"TextEncoder", "VaeDecoder"} <= seen["text-vae"]:
            break
        time.sleep(1)
    assert "Denoiser" in seen["denoiser"], seen
    assert {"TextEncoder", "VaeDecoder"} <= seen["text-vae"], seen
    assert not seen["text-vae"] & {"Denoiser"} and not seen["denoiser"] & {"TextEncoder", "VaeDecoder"}, seen


def _app_running(cluster: MultiNodeCluster, deployments: set[str]) -> bool:
    app = cluster.serve_details()["applications"].get("lightray", {})
    deps = app.get("deployments", {})
    return app.get("status") == "RUNNING" and deployments == set(deps) and all(
        d.get("status") == "HEALTHY" for d in deps.values())


def _wait_rolled(cluster: MultiNodeCluster, deployments: set[str], timeout: float = 300) -> float:
    start = time.monotonic()
    time.sleep(3)  # the controller picks the new config up
    while time.monotonic() - start < timeout:
        try:
            if _app_running(cluster, deployments):
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"the update did not finish in {timeout}s: {cluster.serve_details()}")


def test_a_config_that_cannot_be_placed_is_refused_naming_the_deployment(multinode):
    """More GPUs than any node has: refused before `serve deploy` (Serve would leave it PENDING forever), and the
    running application is untouched."""
    cluster: MultiNodeCluster = multinode["cluster"]
    data = yaml.safe_load(cluster.deployed_config.read_text())
    for dep in data["applications"][0]["deployments"]:
        if dep["name"] == "Denoiser":
            dep["ray_actor_options"]["num_gpus"] = 8
    bad = cluster.deployed_config.with_name("serve-unplaceable.yaml")
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ValueError, match=r"deployment 'Denoiser' .*cannot be placed.*'GPU': 8"):
        cluster.deploy(bad, timeout=30)
    assert _app_running(cluster, {"Ingress", *STAGES})


def test_rolling_update_under_load(multinode):
    cluster: MultiNodeCluster = multinode["cluster"]
    url, refs, args = cluster.http_url, multinode["refs"], multinode["args"]
    v1_stages = {"Ingress", *STAGES}
    served = {"v2": False}

    def bodies():
        out = [("v1", {"prompt": "a blue square", "size": "64x64", "model": V1_MODEL, "seed": 3}),
               ("v1+adapter", {"prompt": "a red circle", "size": "64x64", "model": V1_MODEL, "seed": 4,
                               "lora": refs["v1"]})]
        if served["v2"]:
            out.append(("v2", {"prompt": "a green circle", "size": "64x64", "model": V2_MODEL, "seed": 5}))
        return out

    v2_config = _config(cluster, {**args, "extra_presets": [V2], "engine": {"max_batch_rows": 4,
                                                                           "max_live_requests": 16},
                                  "adapter_cache_size": 2}, "v2", V2_DEPLOYMENTS)
    with Load(url, bodies) as load:
        time.sleep(15)
        before = len(load.results)
        cluster.run(str(cluster_bin()), "deploy", str(v2_config), "-a", cluster.dashboard_url)
        rolled_in = _wait_rolled(cluster, v1_stages | {f"{s}-{V2}" for s in STAGES})
        served["v2"] = True
        rolled_at = len(load.results)
        while load.sent < max(300, rolled_at + 30):  # and the new model served for a while
            time.sleep(1)
    results = load.results
    outcomes = Counter((label, _status(r)) for _, label, r, _ in results)
    print(f"rolling update: {len(results)} sent, rolled in {rolled_in:.0f} s, outcomes {dict(outcomes)}")
    assert len(results) >= 300 and before > 0
    failed = [(label, _status(r), getattr(r, "text", r)) for _, label, r, _ in results
              if not (isinstance(r, httpx.Response) and r.status_code == 200)]
    assert not failed, failed[:5]
    # Pinned to the old model, they finished on it (a replica of another preset refuses them: 404 naming model).
    assert all(r.json()["model"] == (V2_MODEL if label == "v2" else V1_MODEL) for _, label, r, _ in results)
    assert any(label == "v2" for _, label, _, _ in results)

    # An adapter trained for the old base, asked on the new one: a clear client error naming the field and the base
    # (422, the API's status for an incompatible adapter everywhere: serve_app/errors.py maps `Incompatible`).
    r = httpx.post(f"{url}/v1/images/generations", timeout=CLIENT_TIMEOUT_S,
                   json={"prompt": "a red circle", "size": "64x64", "model": V2_MODEL, "lora": refs["v1"]})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "lora" and err["code"] == "adapter_incompatible" and V1 in err["message"], err

    # The old model removed: the new version becomes the default graph; requests for the old one are 404 naming
    # `model` from then on (and during the roll, 200 or that 404: never a 5xx).
    v3_config = _config(cluster, {**args, "preset": V2, "extra_presets": []}, "v3")
    with Load(url, lambda: [("v1", {"prompt": "a blue square", "size": "64x64", "model": V1_MODEL, "seed": 3})],
              threads=2) as load:
        time.sleep(3)
        cluster.run(str(cluster_bin()), "deploy", str(v3_config), "-a", cluster.dashboard_url)
        _wait_rolled(cluster, v1_stages)
        time.sleep(5)
    seen = Counter(_status(r) for _, _, r, _ in load.results)
    print("removing the old model:", dict(seen))
    for _, _, r, _ in load.results:
        assert isinstance(r, httpx.Response) and r.status_code in (200, 404), _status(r)
        if r.status_code == 404:
            assert r.json()["error"]["param"] == "model", r.text
    assert seen["404"] > 0, seen  # the last requests came after the removal
    r = _post(url, {"prompt": "a blue square", "size": "64x64", "model": V1_MODEL})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
    assert _post(url, {"prompt": "a blue square", "size": "64x64"}).json()["model"] == V2_MODEL


def cluster_bin():
    from testing.local_cluster import BIN

    return BIN / "serve"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_node_loss_under_load(multinode):
    cluster: MultiNodeCluster = multinode["cluster"]
    url, refs = cluster.http_url, multinode["refs"]
    registry_before = _tree_digest(multinode["registry"])
    assert set(cluster.stage_nodes()["Denoiser"]) == {"denoiser"}

    base = {"prompt": "a red circle on the left", "size": "64x64"}
    # The default model is the new version after the rolling update (the old one run alone: `-k node_loss`).
    version = "v2" if _post(url, base).json()["model"].startswith(V2) else "v1"
    mix = [
        ("plain", {**base, "seed": 1}),
        ("adapter", {**base, "seed": 2, "lora": refs[version]}),
        ("stream", {**base, "seed": 3, "stream": True, "partial_images": 1}),
        # 30 steps with CFG: the Denoiser is busy at the kill
        ("base-cfg", {**base, "seed": 4, "model": V2 if version == "v2" else V1}),
    ]
    with Load(url, lambda: mix, threads=4) as load:
        time.sleep(12)
        sent_before = load.sent
        killed, killed_at, dead_after, recovered_s = kill_under_load(cluster, load, "denoiser")
        time.sleep(5)
    assert recovered_s is not None, cluster.stage_nodes()
    results = load.results
    outcomes = Counter((label, _status(r)) for _, label, r, _ in results)
    print(f"node loss: killed {len(killed)} pids; DEAD after {dead_after:.1f} s; every stage serving "
          f"{recovered_s:.1f} s after the kill; outcomes {dict(outcomes)}")
    for sent, label, r, took in results:
        if _status(r) not in ("200", "200 stream completed"):
            print(f"  {label}: sent {sent - killed_at:+.1f} s from the kill, took {took:.1f} s: {_status(r)} "
                  f"{getattr(r, 'text', r)[:200] if not isinstance(r, tuple) else r[1][-1]}")
    assert sent_before > 0
    for sent, label, r, took in results:
        assert not isinstance(r, Exception), f"{label}: no answer: {r!r}"
        assert took < REQUEST_TIMEOUT_S + 20, (label, took)
        if isinstance(r, tuple):  # a stream that started: ends in completed or an OpenAI error event
            kind, last = r[1][-1]
            if last.get("type") == "error":
                assert last["error"]["message"] and last["error"]["type"] == "server_error", last
            else:
                assert str(last.get("type")).endswith("completed"), r[1][-1]
            continue
        # In flight on the dying node or sent after the kill: 200 or 503, never a 504 at the request timeout.
        assert r.status_code in (200, 503), f"{label}: sent {sent - killed_at:+.1f} s from the kill: " \
                                            f"{r.status_code} {r.text}"
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) > 0
            assert any(s in r.json()["error"]["message"] for s in STAGES), r.text
    assert any(_status(r) not in ("200", "200 stream completed") for _, _, r, _ in results), \
        "nothing failed: the kill hit no request in flight"
    # The Denoiser came back on the surviving worker node.
    assert set(cluster.stage_nodes()["Denoiser"]) == {"text-vae"}
    # The published adapters are untouched, and no cache entry is half-written: every file an entry lists is
    # there whole (a download dies as a hidden .part file, never as the file itself).
    assert _tree_digest(multinode["registry"]) == registry_before
    for manifest_path in Path(multinode["cache"]).rglob("manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        for rel, digest in manifest["files"].items():
            f = manifest_path.parent / rel
            assert not f.exists() or hashlib.sha256(f.read_bytes()).hexdigest() == digest, f

    # The node comes back and rejoins, with its label and resources.
    cluster.restart_node("denoiser")
    node = next(n for n in cluster.nodes() if n["node_id"] == cluster.workers["denoiser"].node_id)
    assert node["state"] == "ALIVE" and node["labels"].get("lightray.io/pool") == "denoiser", node
    r = _post(url, {**base, "seed": 9})
    assert isinstance(r, httpx.Response) and r.status_code == 200
