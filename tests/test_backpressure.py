"""Backpressure, timeouts and cancellation, on a real local Ray cluster with the Denoiser held to
one replica that runs one request and queues one more, an ingress that admits two requests at a time, and a 4 s
request timeout."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from testing.local_cluster import RayCluster
from lightray.contracts import DenoiseCancelled
from lightray.schemas import ImageGenerationRequest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 4
ADMITTED = 2
FAST = {"prompt": "a red circle on the left, white background", "model": "lightray-shapes-lightning-4", "seed": 1}
# Minutes of work on this CPU (256², CFG doubles every step): it can only end by cancellation.
SLOW = {"prompt": "a blue square at the top, gray background", "model": "lightray-shapes", "size": "256x256",
        "n": 2, "num_inference_steps": 100, "true_cfg_scale": 4.0, "seed": 2}
# A few seconds of work each: enough to hold the Denoiser while the others arrive.
BUSY = {**SLOW, "size": "128x128", "n": 1, "num_inference_steps": 40}


def test_a_cancelled_denoise_stops_within_a_step_and_frees_the_engine(preset, local_pipeline):
    from lightray.engine import DenoiseEngine

    engine = DenoiseEngine(preset)
    spec = ImageGenerationRequest.model_validate(SLOW).resolve(preset, 0)
    cancel = threading.Event()
    steps_seen = []

    def on_progress(event):  # cancel once two steps have run
        steps_seen.append(event.step)
        if event.step == 2:
            cancel.set()

    with pytest.raises(DenoiseCancelled, match="after step 2 of 100"):
        engine.denoise(spec.denoise_params(), local_pipeline.encode(spec), cancel=cancel, on_progress=on_progress)
    assert steps_seen == [1, 2] and engine.stats()["live"] == 0
    # The engine is unharmed: a normal request runs and matches a fresh engine's result.
    small = ImageGenerationRequest.model_validate(FAST).resolve(preset, 0)
    again = engine.denoise(small.denoise_params(), local_pipeline.encode(small))
    assert np.array_equal(again, DenoiseEngine(preset).denoise(small.denoise_params(), local_pipeline.encode(small)))


@pytest.fixture(scope="module")
def tight_service(tmp_path_factory):
    cluster = RayCluster().start()
    try:
        config = cluster.serve_config(
            REPO / "configs/serve/local.yaml",
            # The text-to-image graph alone (`extra_presets: []`): these tests load one Denoiser on purpose.
            {"request_timeout_s": TIMEOUT_S, "max_concurrent_requests": ADMITTED, "registry": str(tmp_path_factory.mktemp("bp-registry")),
             "image_store_dir": str(tmp_path_factory.mktemp("bp-images")), "extra_presets": []},
            {"Denoiser": {"num_replicas": 1, "autoscaling_config": None, "max_ongoing_requests": 1,
                          "max_queued_requests": 1}},
        )
        cluster.deploy(config)
        yield cluster
    finally:
        cluster.stop()


def _post(url: str, body: dict) -> tuple[httpx.Response, float, float]:
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
    return r, start, time.monotonic()


def _denoiser_log(cluster: RayCluster) -> str:
    logs = Path(cluster.temp_dir, "session_latest", "logs", "serve").glob("replica_lightray_Denoiser_*.log")
    return "".join(p.read_text(errors="replace") for p in logs)


def test_every_stage_answers_its_health_check(tight_service):
    # Each stage has 5 s to answer, and the Denoiser answers at its next step boundary: on 2 shared cores a step
    # left over from the test before can take longer, so readiness is polled; a stage that never answers fails.
    deadline = time.time() + 60
    while True:
        r = httpx.get(f"{tight_service.http_url}/readyz", timeout=30)
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(2)
    assert r.status_code == 200 and r.json() == {
        "ready": True, "stages": {"TextEncoder": True, "Denoiser": True, "VaeDecoder": True}}, r.text


def test_a_stuck_request_ends_with_504_and_its_work_is_cancelled(tight_service):
    url = tight_service.http_url
    r, start, end = _post(url, SLOW)
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["code"] == "timeout" and f"{TIMEOUT_S} s" in error["message"]
    assert end - start < TIMEOUT_S + 30  # ended by the timeout, not by the minutes of work
    # The Denoiser (one request at a time) is free again: were the slow job still running, this would queue
    # behind it and time out too.
    for _ in range(5):
        fast = httpx.post(f"{url}/v1/images/generations", json=FAST, timeout=60)
        if fast.status_code == 200:
            break
    assert fast.status_code == 200, fast.text
    deadline = time.time() + 30
    while "(request cancelled)" not in _denoiser_log(tight_service) and time.time() < deadline:
        time.sleep(0.5)
    log = _denoiser_log(tight_service)
    assert "cancelled after step" in log and "of 100 (request cancelled)" in log, log[-3000:]


def test_overload_is_answered_503_with_retry_after_before_queued_work_finishes(tight_service):
    url = tight_service.http_url
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: _post(url, BUSY), range(10)))
    codes = sorted(r.status_code for r, _, _ in results)
    rejected = [(r, end) for r, _, end in results if r.status_code == 503]
    served = [end for r, _, end in results if r.status_code != 503]
    # Two are admitted (one runs in the Denoiser, one waits in its queue); the rest are turned away at once.
    assert len(rejected) == 10 - ADMITTED, codes
    assert set(codes) <= {200, 503, 504}, codes
    for r, end in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "unavailable"
        assert end < min(served)  # answered at once, not after waiting for a slot
