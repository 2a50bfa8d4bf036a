"""`/readyz` under probes: one shared check per TTL however many probes ask (`SharedCheck`), and on the real graph a
flood of probes during generations gives no false 503 and restarts no replica."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx

from serve_app.readiness import SharedCheck


def test_concurrent_probes_share_one_check_within_its_ttl():
    calls = []

    async def check():
        calls.append(time.monotonic())
        await asyncio.sleep(0.05)
        return {"Denoiser": len(calls) == 1}

    async def scenario():
        shared = SharedCheck(check, ttl_s=0.5)
        first = await asyncio.gather(*(shared.get() for _ in range(100)))
        again = await asyncio.gather(*(shared.get() for _ in range(100)))  # within the TTL: the same answer
        await asyncio.sleep(0.6)
        later = await shared.get()
        return first, again, later

    first, again, later = asyncio.run(scenario())
    assert first == again == [{"Denoiser": True}] * 100
    assert later == {"Denoiser": False} and len(calls) == 2


def test_a_failed_check_is_not_cached_as_an_answer():
    outcomes = iter([RuntimeError("handle broken"), {"TextEncoder": True}])

    async def check():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def scenario():
        shared = SharedCheck(check, ttl_s=60)
        try:
            await shared.get()
        except RuntimeError:
            pass
        return await shared.get()

    assert asyncio.run(scenario()) == {"TextEncoder": True}


def _running_replicas(cluster) -> dict[str, set[str]]:
    return {name: {r["replica_id"] for r in replicas if r.get("state") == "RUNNING"}
            for name, replicas in cluster.replicas().items()}


def test_a_flood_of_probes_during_generations_is_all_200_and_restarts_nothing(service, ray_cluster):
    before = _running_replicas(ray_cluster)
    assert all(before.values()), before
    # Base model with true CFG, n = 4, 30 steps at 128²: seconds of engine work each, so the probes land on a busy
    # engine (the Denoiser's health check waits for a step boundary).
    body = {"prompt": "a red circle on the left, white background", "model": "lightray-shapes", "n": 4,
            "num_inference_steps": 30, "size": "128x128"}
    with concurrent.futures.ThreadPoolExecutor(28) as pool:
        generations = [pool.submit(httpx.post, f"{service}/v1/images/generations", json={**body, "seed": i},
                                   timeout=300) for i in range(4)]
        time.sleep(1.0)  # the generations are in the engine
        probes = list(pool.map(lambda _: httpx.get(f"{service}/readyz", timeout=30).status_code, range(300)))
        assert not all(g.done() for g in generations), "the probes did not overlap the generations"
        statuses = [g.result().status_code for g in generations]
    assert probes.count(200) == 300, {s: probes.count(s) for s in set(probes)}
    assert statuses == [200] * 4
    assert _running_replicas(ray_cluster) == before
