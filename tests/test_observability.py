"""Metrics and request ids on the real graph: the session's Ray cluster (tests/conftest.py, with a metrics export
port and a 1 s report interval), configs/serve/local.yaml deployed, real HTTP. The lightray_* series scraped from
the node's Prometheus endpoint must count exactly the requests sent here, and a request's id must come back in
its response and appear in every stage replica's log."""

from __future__ import annotations

import base64
import collections
import io
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "a red circle on the left, white background"
ADAPTERS = 5  # one more than the per-replica cache (local.yaml's default adapter_cache_size 4): one eviction


# ------------------------------------------------------------------------------------------ helpers

def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """lightray_* and serve_multiplexed_* samples: {sample name: {sorted label items: value}}."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, dict[tuple, float]] = collections.defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "lightray_" in s.name or "serve_multiplexed_" in s.name:
                out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of a sample's values over the series whose labels include `labels`."""
    return sum(v for k, v in samples.get(name, {}).items() if set(labels.items()) <= set(k))


def counter(samples: dict, name: str, **labels: str) -> float:
    # Ray exports a Counter named X as `ray_X_total`
    return total(samples, f"ray_{name}_total", **labels)


def settle(url: str, interval_s: float = 1.0) -> dict:
    """A scrape that no longer changes: earlier tests' metrics have all been reported (bounded wait)."""
    previous = scrape(url)
    for _ in range(30):
        time.sleep(3 * interval_s)
        current = scrape(url)
        if current == previous:
            return current
        previous = current
    return previous


def wait_for(url: str, done, timeout_s: float = 90) -> dict:
    """Scrape until `done(samples)` (Ray reports every `RAY_metrics_report_interval_ms`)."""
    deadline = time.time() + timeout_s
    samples = scrape(url)
    while not done(samples) and time.time() < deadline:
        time.sleep(1)
        samples = scrape(url)
    return samples


def delta(after: dict, before: dict) -> dict:
    return {name: {k: v - before.get(name, {}).get(k, 0.0) for k, v in series.items()}
            for name, series in after.items()}


def make_adapter(folder: Path, base_model_id: str, root: Path) -> Path:
    """A tiny LoRA (rank 2 on to_q/to_v) in the format serving loads (lightray/training/lora.py)."""
    import torch
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float32)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    config = transformer.peft_config["default"]
    config.base_model_name_or_path = base_model_id
    state = get_peft_model_state_dict(transformer, save_embedding_layers=False)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    QwenImagePipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name="adapter_model.safetensors",
                                        transformer_lora_adapter_metadata=config.to_dict())
    config.save_pretrained(str(folder))
    return folder


def png_b64(size: int = 64) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------ the run

@pytest.fixture(scope="module")
def run(service, ray_cluster, registry_root, preset, tmp_path_factory):
    """Publish adapters, settle the metrics, send the requests below; the metric deltas and responses."""
    from lightray.registry_settings import open_registry

    registry = open_registry(str(registry_root))
    src = make_adapter(tmp_path_factory.mktemp("obs-adapter") / "a", preset.base_model_id, preset.root)
    refs = [registry.publish("obs", f"a{i}", src).ref for i in range(ADAPTERS)]

    before = settle(ray_cluster.metrics_url)
    requests = [  # (path, body, n)
        ("/v1/images/generations", {"prompt": PROMPT, "n": 2, "size": "64x64", "seed": 1}, 2),
        ("/v1/images/generations", {"prompt": PROMPT, "n": 1, "size": "64x64", "seed": 2, "lora": refs[0]}, 1),
        ("/v1/images/generations", {"prompt": PROMPT, "n": 3, "size": "64x64", "seed": 3, "lora": refs[0]}, 3),
        *[("/v1/images/generations", {"prompt": PROMPT, "size": "64x64", "seed": 4, "lora": r}, 1) for r in refs[1:]],
        ("/v1/images/edits", {"prompt": PROMPT, "image": png_b64(), "strength": 0.5, "seed": 5}, 1),
    ]
    responses = []
    for i, (path, body, _) in enumerate(requests):
        headers = {"x-request-id": f"obs-{i}-{uuid.uuid4().hex[:8]}"} if i % 2 == 0 else {}
        r = httpx.post(f"{service}{path}", json=body, headers=headers, timeout=300)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == body.get("n", 1)
        responses.append((headers.get("x-request-id"), r))
    images = sum(n for *_, n in requests)
    after = wait_for(ray_cluster.metrics_url,
                     lambda s: counter(delta(s, before), "lightray_images_generated") >= images
                     and total(delta(s, before), "ray_lightray_stage_latency_ms_count", stage="png") >= len(requests)
                     # a gauge leaves the scrape when a report is late (Ray keeps it for 2 report intervals)
                     and bool(s.get("ray_lightray_adapters_loaded")))
    if os.environ.get("LIGHTRAY_METRICS_SAMPLE"):  # docs/observability.md's sample: the raw exposition text
        text = httpx.get(ray_cluster.metrics_url, timeout=10).text
        Path(os.environ["LIGHTRAY_METRICS_SAMPLE"]).write_text(
            "\n".join(line for line in text.splitlines() if "lightray_" in line) + "\n")
    return {"d": delta(after, before), "after": after, "requests": requests, "responses": responses, "refs": refs}


def test_images_and_batch_sizes_count_the_requests(run):
    d, requests = run["d"], run["requests"]
    ns = [n for *_, n in requests]
    assert counter(d, "lightray_images_generated") == sum(ns)
    assert counter(d, "lightray_images_generated", kind="image") == 1
    assert counter(d, "lightray_images_generated", kind="text") == sum(ns) - 1
    assert total(d, "ray_lightray_batch_size_count") == len(requests)
    # exact: the buckets are (n-0.5, n+0.5] and Ray rebuilds the sum from their midpoints (deployments/metrics.py)
    assert total(d, "ray_lightray_batch_size_sum") == sum(ns)
    for n in range(1, 5):  # cumulative buckets
        assert total(d, "ray_lightray_batch_size_bucket", le=f"{n + 0.5}") == sum(1 for x in ns if x <= n)


def test_stage_latency_and_queue_wait_histograms_count_every_stage(run):
    d, requests = run["d"], run["requests"]
    calls = len(requests)
    edits = sum(1 for path, *_ in requests if path.endswith("edits"))
    with_adapter = sum(1 for _, body, _ in requests if "lora" in body)
    expected = {"encode": calls, "denoise": calls, "decode": calls, "png": calls, "vae_encode": edits,
                "adapter": with_adapter}
    for stage, count in expected.items():
        assert total(d, "ray_lightray_stage_latency_ms_count", stage=stage) == count, stage
        assert total(d, "ray_lightray_stage_latency_ms_sum", stage=stage) > 0, stage
    for stage, count in {"encode": calls, "denoise": calls, "decode": calls, "vae_encode": edits}.items():
        assert total(d, "ray_lightray_queue_wait_ms_count", stage=stage) == count, stage
    # every series carries Serve's labels: the stage's deployment
    deployments = {dict(k).get("deployment") for k in run["after"]["ray_lightray_stage_latency_ms_count"]}
    assert {"TextEncoder", "Denoiser", "VaeDecoder"} <= deployments


def test_adapter_cache_hits_misses_evictions(run):
    d = run["d"]
    lookups = sum(1 for _, body, _ in run["requests"] if "lora" in body)
    misses, hits = counter(d, "lightray_adapter_cache_misses"), counter(d, "lightray_adapter_cache_hits")
    evictions = counter(d, "lightray_adapter_cache_evictions")
    assert misses >= ADAPTERS  # every adapter was loaded somewhere, at least once
    assert hits + misses == lookups
    # the same events as Serve's own multiplexing counters see them
    assert misses == counter(d, "serve_multiplexed_models_load_counter", deployment="Denoiser")
    assert evictions == counter(d, "serve_multiplexed_models_unload_counter", deployment="Denoiser")
    # what is still held is what was loaded and not evicted (gauges are absolute, not deltas)
    held = total(run["after"], "ray_lightray_adapters_loaded")
    assert held == counter(run["after"], "lightray_adapter_cache_misses") - counter(
        run["after"], "lightray_adapter_cache_evictions")
    replicas = {dict(k)["replica"] for k in run["after"]["ray_lightray_adapters_loaded"]}
    if len(replicas) == 1:  # all five adapters went through one replica's LRU of four
        assert hits >= 1 and evictions >= 1


def _lines_with(log_dir: Path, pattern: str, needle: str) -> list[str]:
    return [line for f in sorted(log_dir.glob(pattern)) for line in f.read_text(errors="replace").splitlines()
            if needle in line]


def test_request_id_comes_back_and_is_in_every_stage_log(run, ray_cluster):
    log_dir = ray_cluster.serve_log_dir
    for i, (sent, r) in enumerate(run["responses"]):
        ids = r.headers.get_list("x-request-id")
        assert len(ids) == 1, ids
        rid = ids[0]
        assert rid == sent if sent else len(rid) >= 16
        path = run["requests"][i][0]
        stages = {"TextEncoder": "encode request_id=", "Denoiser": "denoise request_id=",
                  "VaeDecoder": "decode request_id="}
        if path.endswith("edits"):
            stages["VaeDecoder"] = "vae_encode request_id="
        deadline = time.time() + 30  # log files are written as the lines come; allow for a slow disk
        missing = dict(stages)
        while missing and time.time() < deadline:
            missing = {dep: msg for dep, msg in missing.items()
                       if not any(msg + rid in line for line in _lines_with(log_dir, f"replica_*_{dep}_*.log", rid))}
            if missing:
                time.sleep(1)
        assert not missing, (rid, missing, sorted(p.name for p in log_dir.glob("*.log")))
        # Serve's own log format puts the id in the line too (and in the ingress's access log)
        assert _lines_with(log_dir, "replica_*_Ingress_*.log", rid)


def test_error_responses_carry_the_request_id(service):
    r = httpx.post(f"{service}/v1/images/generations", json={"prompt": PROMPT, "size": "63x64"},
                   headers={"X-Request-Id": "obs-bad-1"}, timeout=30)
    assert r.status_code == 400 and r.headers.get_list("x-request-id") == ["obs-bad-1"]
    r = httpx.post(f"{service}/v1/images/generations", json={"prompt": PROMPT, "lora": "obs/none-such"}, timeout=30)
    assert r.status_code == 404 and len(r.headers.get_list("x-request-id")) == 1
