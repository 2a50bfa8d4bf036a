"""Lightray on a local multi-node Ray cluster (testing/multinode.py: a head and two worker raylets, stages placed by
node label from configs/serve/multinode.yaml), measured end to end in one run of about 13 minutes on 2 cores:

1. `nodes`, `stage_nodes`: the nodes and where each stage's replicas run;
2. calibration: each request type of the traces timed alone (Server-Timing), giving the simulator's CPU curves;
3. `autoscaling`: the Mixed and Burst traces (open loop) under Serve's ongoing-request target and under the
   engine's work seconds (deployments/autoscaling.py): p95, replica-seconds, peak replicas;
4. `capacity_sim`: benchmarks/capacity_sim.py's predicted p95 for the same traces and policies, beside the measured;
5. `rolling_update`: `serve deploy` of a changed config (engine budget, adapter cache size, a second model version)
   under steady load: sent, failed, p95 during vs before;
6. `node_kill`: the Denoiser's node killed under load (streaming and not, tenant adapters): statuses, seconds until
   every stage serves again, 5xx other than 503, the node rejoining.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multinode.py    # → benchmarks/results/multinode.json

The traces are scaled to what 2 shared cores serve: Mixed at 0.25 requests/s for 45 s (80 % Lightning-4 at 128²,
20 % base 50 steps with CFG at 256², n = 4), Burst idle 5 s, 10 x 0.1 requests/s for 30 s (not 60: the run's
15-minute bound), idle 25 s. Timings on a shared machine: compare the figures of one run side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import capacity_sim as sim  # noqa: E402
from lightray.config import load_preset  # noqa: E402
from testing.adapters import publish_lora_adapter  # noqa: E402
from testing.local_cluster import BIN  # noqa: E402
from testing.multinode import (  # noqa: E402
    MULTINODE_CONFIG, STAGES, ClosedLoad, MultiNodeCluster, kill_under_load, post, status)

BODY = {sim.LIGHTNING4_128.name: {"prompt": "a red circle", "size": "128x128", "model": "lightray-shapes-lightning-4"},
        sim.BASE50_CFG_256_N4.name: {"prompt": "a blue square", "size": "256x256", "model": "lightray-shapes",
                                     "n": 4, "num_inference_steps": 50}}
POLICIES = {
    "ongoing_requests": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "upscale_delay_s": 2,
                         "downscale_delay_s": 20, "look_back_period_s": 12},
    "work_seconds": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 2, "downscale_delay_s": 20,
                     "look_back_period_s": 12,
                     "policy": {"policy_function": "deployments.autoscaling:WorkSecondsPolicy",
                                "policy_kwargs": {"target_work_s": 8}}},
}
REQUEST_TIMEOUT_S = 60


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, max(0, -(-int(q * 100) * len(xs) // 100) - 1))], 3)


def timing(r: httpx.Response) -> dict[str, float]:
    out = {}
    for part in r.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur) / 1000
    return out


def denoiser_replicas(cluster) -> int:
    return sum(r["state"] == "RUNNING" for r in cluster.replicas().get("Denoiser", []))


def deploy(cluster, config: Path) -> None:
    cluster.run(str(BIN / "serve"), "deploy", str(config), "-a", cluster.dashboard_url)


def wait_app(cluster, deployments: set[str], timeout: float = 300) -> float:
    start = time.monotonic()
    time.sleep(3)
    while time.monotonic() - start < timeout:
        try:
            app = cluster.serve_details()["applications"].get("lightray", {})
            deps = app.get("deployments", {})
            if app.get("status") == "RUNNING" and set(deps) == deployments and all(
                    d.get("status") == "HEALTHY" for d in deps.values()):
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("application not RUNNING")


def make_config(cluster, args: dict, name: str, denoiser: dict | None = None, extra: list[dict] = ()) -> Path:
    path = cluster.serve_config(MULTINODE_CONFIG, args, {"Denoiser": {"autoscaling_config": denoiser}} if denoiser else None)
    data = yaml.safe_load(path.read_text())
    data["applications"][0]["deployments"] += list(extra)
    out = path.with_name(f"bench-{name}.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def calibrate(url: str, repeats: int = 2) -> dict[str, dict[str, float]]:
    alone = {}
    for name, body in BODY.items():
        post(url, {**body, "seed": 0})  # warm
        runs = []
        for i in range(repeats):
            r = post(url, {**body, "seed": i + 1})
            assert isinstance(r, httpx.Response) and r.status_code == 200, r
            runs.append(timing(r))
        alone[name] = {k: statistics.median(t.get(k, 0.0) for t in runs) for k in ("encode", "denoise", "decode",
                                                                                   "graph")}
    return alone


def run_trace(cluster, trace: list[tuple[float, sim.RequestType]], tail_s: float) -> dict:
    """Sends the trace open loop; samples the Denoiser's RUNNING replicas every second."""
    url = cluster.http_url
    results: list[tuple[str, float, int]] = []
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            try:
                samples.append((time.monotonic() - t0, denoiser_replicas(cluster)))
            except httpx.HTTPError:
                pass
            stop.wait(1.0)

    def one(at: float, rt: sim.RequestType, i: int):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        start = time.monotonic()
        r = post(url, {**BODY[rt.name], "seed": i})
        results.append((rt.name, time.monotonic() - start, r.status_code if isinstance(r, httpx.Response) else -1))

    t0 = time.monotonic()
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(64) as pool:
        for f in [pool.submit(one, at, rt, i) for i, (at, rt) in enumerate(trace)]:
            f.result()
    end = max(trace[-1][0] + tail_s, time.monotonic() - t0)
    while time.monotonic() - t0 < end:
        time.sleep(0.5)
    stop.set()
    watcher.join()
    rs = 0.0
    for (ta, n), (tb, _) in zip(samples, samples[1:]):
        rs += n * (tb - ta)
    ok = [lat for _, lat, code in results if code == 200]
    return {"requests": len(results), "ok": len(ok), "statuses": dict(Counter(str(c) for _, _, c in results)),
            "p50_s": pct(ok, 0.5), "p95_s": pct(ok, 0.95), "replica_seconds": round(rs, 1),
            "peak_replicas": max((n for _, n in samples), default=0), "window_s": round(end, 1),
            "replicas_over_time": [(round(t, 1), n) for t, n in samples]}


def wait_scaled_down(cluster, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and denoiser_replicas(cluster) > 1:
        time.sleep(2)


def rolling_update(cluster, args: dict, refs: dict) -> dict:
    v2 = "lightray-shapes-v2"
    label = lambda pool: {"label_selector": {"lightray.io/pool": pool}}  # noqa: E731
    extra = [
        {"name": f"TextEncoder-{v2}", "num_replicas": 1, "max_surge_percent": 100,
         "ray_actor_options": {"num_cpus": 0.05, **label("text-vae")}},
        {"name": f"Denoiser-{v2}", "num_replicas": 1, "max_surge_percent": 100,
         "ray_actor_options": {"num_cpus": 0.1, **label("denoiser"), "fallback_strategy": [label("text-vae")]}},
        {"name": f"VaeDecoder-{v2}", "num_replicas": 1, "max_surge_percent": 100,
         "ray_actor_options": {"num_cpus": 0.05, **label("text-vae")}},
    ]
    config = make_config(cluster, {**args, "extra_presets": [v2], "adapter_cache_size": 2,
                                   "engine": {"max_batch_rows": 4, "max_live_requests": 16}}, "v2", extra=extra)
    served = {"v2": False}

    def bodies():
        out = [("v1", {"prompt": "a blue square", "size": "64x64", "model": "lightray-shapes-lightning-4"}),
               ("v1+adapter", {"prompt": "a red circle", "size": "64x64", "model": "lightray-shapes-lightning-4",
                               "lora": refs["v1"]})]
        if served["v2"]:
            out.append(("v2", {"prompt": "a green circle", "size": "64x64", "model": f"{v2}-lightning-4"}))
        return out

    with ClosedLoad(cluster.http_url, bodies, threads=3) as load:
        time.sleep(15)
        deployed_at = time.monotonic()
        deploy(cluster, config)
        rolled_s = wait_app(cluster, {"Ingress", *STAGES, *(f"{s}-{v2}" for s in STAGES)})
        rolled_at = time.monotonic()
        served["v2"] = True
        n_rolled = load.sent
        while load.sent < max(300, n_rolled + 30):
            time.sleep(1)
    res = load.results
    ok = lambda r: isinstance(r, httpx.Response) and r.status_code == 200  # noqa: E731
    before = [took for t, _, r, took in res if t < deployed_at and ok(r)]
    during = [took for t, _, r, took in res if deployed_at <= t < rolled_at and ok(r)]
    r = post(cluster.http_url, {"prompt": "x", "size": "64x64", "model": f"{v2}-lightning-4", "lora": refs["v1"]})
    return {"sent": len(res), "failed": sum(not ok(r) for _, _, r, _ in res),
            "statuses": dict(Counter(status(r) for _, _, r, _ in res)),
            "pinned_old_model_ok": sum(1 for _, lab, r, _ in res if lab != "v2" and ok(r)
                                       and r.json()["model"] == "lightray-shapes-lightning-4"),
            "p95_before_s": pct(before, 0.95), "p95_during_s": pct(during, 0.95), "rollout_s": round(rolled_s, 1),
            "old_base_adapter_on_new_base": {"status": r.status_code, "error": r.json().get("error")}}


def node_kill(cluster, refs: dict) -> dict:
    base = {"prompt": "a red circle on the left", "size": "64x64"}
    mix = [("plain", {**base, "seed": 1}), ("adapter", {**base, "seed": 2, "lora": refs["v1"]}),
           ("stream", {**base, "seed": 3, "stream": True, "partial_images": 1}),
           ("base-cfg", {**base, "seed": 4, "model": "lightray-shapes"})]
    on_before = cluster.stage_nodes()
    with ClosedLoad(cluster.http_url, lambda: mix, threads=4) as load:
        time.sleep(10)
        pids, killed_at, dead_s, recovered_s = kill_under_load(cluster, load, "denoiser")
        time.sleep(5)
    res = load.results
    statuses = Counter(status(r) for _, _, r, _ in res)
    other_5xx = {k: v for k, v in statuses.items() if k.startswith("5") and k != "503"}
    placed_after = cluster.stage_nodes()
    t = time.monotonic()
    cluster.restart_node("denoiser")
    rejoin_s = time.monotonic() - t
    return {"killed_pids": len(pids), "node_dead_after_s": round(dead_s, 1),
            "seconds_to_recovery": None if recovered_s is None else round(recovered_s, 1),
            "statuses": dict(statuses), "5xx_other_than_503": other_5xx,
            "in_flight_at_kill_504": sum(1 for t0, _, r, _ in res if t0 < killed_at and status(r) == "504"),
            "stage_nodes_before": on_before, "stage_nodes_after": placed_after,
            "node_rejoined_s": round(rejoin_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/multinode.json"))
    args = ap.parse_args()
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lr-mn-bench-"))
    registry = work / "registry"
    refs = {"v1": publish_lora_adapter(registry, load_preset("lightray-shapes"), f"bench{uuid.uuid4().hex[:4]}",
                                       "style", 1, work / "src").ref}
    cluster = MultiNodeCluster()
    cluster.env["LIGHTRAY_ADAPTER_CACHE"] = str(work / "cache")
    out: dict = {"machine": "2 CPU cores shared with other jobs: compare figures of this run side by side"}
    try:
        cluster.start()
        base_args = {"registry": str(registry), "registry_cache_ttl_s": 0, "request_timeout_s": REQUEST_TIMEOUT_S,
                     "image_store_dir": str(work / "images")}
        cluster.deploy(make_config(cluster, base_args, "ongoing", POLICIES["ongoing_requests"]))
        nodes = cluster.nodes()
        out["nodes"] = [{"name": n["node_name"], "state": n["state"], "labels": n.get("labels", {}),
                         "cpus": n.get("resources_total", {}).get("CPU")} for n in nodes]
        out["stage_nodes"] = cluster.stage_nodes()
        print(f"[{time.monotonic() - began:.0f}s] cluster up: {out['stage_nodes']}", flush=True)

        alone = calibrate(cluster.http_url)
        curves = sim.Curves.cpu_from_calibration(alone, hop_s=statistics.median(
            a["graph"] - a["encode"] - a["denoise"] - a["decode"] for a in alone.values()))
        out["calibration"] = {"alone_s": alone, "curves": curves.__dict__}
        print(f"[{time.monotonic() - began:.0f}s] calibrated: {curves}", flush=True)

        traces = sim.bench_traces()
        out["autoscaling"], out["capacity_sim"] = {}, {}
        for policy_name, policy_cfg in POLICIES.items():
            if policy_name != "ongoing_requests":
                deploy(cluster, make_config(cluster, base_args, policy_name, policy_cfg))
                wait_app(cluster, {"Ingress", *STAGES})
            for trace_name, (trace, tail) in traces.items():
                wait_scaled_down(cluster)
                measured = run_trace(cluster, trace, tail)
                kind, target = sim.SIM_POLICY[policy_name]
                predicted = sim.simulate(trace, curves, sim.Policy(kind, 1, 2, target=target, start_s=8.0),
                                         horizon_s=trace[-1][0] + tail)
                out["autoscaling"].setdefault(trace_name, {})[policy_name] = measured
                out["capacity_sim"].setdefault(trace_name, {})[policy_name] = {
                    "predicted_p95_s": round(predicted.pct(0.95), 3), "measured_p95_s": measured["p95_s"],
                    "predicted_p50_s": round(predicted.pct(0.5), 3), "measured_p50_s": measured["p50_s"],
                    "predicted_replica_seconds": round(predicted.replica_seconds, 1),
                    "error": None if not measured["p95_s"] else
                    round(predicted.pct(0.95) / measured["p95_s"] - 1, 3)}
                print(f"[{time.monotonic() - began:.0f}s] {trace_name} / {policy_name}: "
                      f"p95 {measured['p95_s']} s (sim {predicted.pct(0.95):.2f}), "
                      f"replica-s {measured['replica_seconds']}, peak {measured['peak_replicas']}", flush=True)

        deploy(cluster, make_config(cluster, base_args, "ongoing-again", POLICIES["ongoing_requests"]))
        wait_app(cluster, {"Ingress", *STAGES})
        out["rolling_update"] = rolling_update(cluster, base_args, refs)
        print(f"[{time.monotonic() - began:.0f}s] rolling update: {out['rolling_update']}", flush=True)
        # Back to the one-model config before the kill (the v2 graph's Denoiser would share the node).
        deploy(cluster, make_config(cluster, base_args, "ongoing-final", POLICIES["ongoing_requests"]))
        wait_app(cluster, {"Ingress", *STAGES})
        out["node_kill"] = node_kill(cluster, refs)
        print(f"[{time.monotonic() - began:.0f}s] node kill: {out['node_kill']}", flush=True)
    finally:
        out["wall_s"] = round(time.monotonic() - began, 1)
        cluster.stop()
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print_table(out)


def print_table(out: dict) -> None:
    print(f"\nnodes: {[n['name'] for n in out.get('nodes', [])]}  stage_nodes: {out.get('stage_nodes')}")
    print("\n| trace | policy | requests | p50 s | p95 s | sim p95 s | replica-s | peak replicas |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for trace, per in out.get("autoscaling", {}).items():
        for policy, m in per.items():
            s = out["capacity_sim"][trace][policy]
            print(f"| {trace} | {policy} | {m['requests']} | {m['p50_s']} | {m['p95_s']} | {s['predicted_p95_s']} | "
                  f"{m['replica_seconds']} | {m['peak_replicas']} |")
    if "rolling_update" in out:
        r = out["rolling_update"]
        print(f"\nrolling update: sent {r['sent']}, failed {r['failed']}, p95 before {r['p95_before_s']} s, "
              f"during {r['p95_during_s']} s, rollout {r['rollout_s']} s")
    if "node_kill" in out:
        k = out["node_kill"]
        print(f"node kill: statuses {k['statuses']}, recovery {k['seconds_to_recovery']} s, "
              f"5xx other than 503 {k['5xx_other_than_503']}")
    print(f"wall {out.get('wall_s')} s")


if __name__ == "__main__":
    main()
