"""Memory soak: 1,000 sequential requests against a locally deployed service, sampling every replica's RSS
(per deployment) and the object store at the start, every 100 requests and at the end.

Starts its own local Ray cluster (loopback only), deploys configs/serve/local.yaml with a private adapter
registry holding one adapter (the embedded model's Lightning-4 LoRA published as `soak/<id>`), and sends tiny
requests (lightray-shapes-lightning-4, 64x64, n=1); every `--adapter-every`-th request uses the adapter and
every `--url-every`-th asks for `response_format=url` (exercising the ingress's image store).

    .venv/bin/python benchmarks/memory_soak.py                 # ≈ 5-8 minutes on 2 cores

Replica PIDs come from Serve's own status (`GET /api/serve/applications/`), RSS from psutil; object store
usage from `ray memory --stats-only`. Writes benchmarks/results/memory_soak.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import signal
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent

from lightray.registry_settings import open_registry  # noqa: E402
from lightray.config import load_preset  # noqa: E402
from testing.local_cluster import BIN, RayCluster  # noqa: E402

DEPLOYMENTS = ("Ingress", "TextEncoder", "Denoiser", "VaeDecoder")
MiB = 1024 * 1024


def object_store(cluster: RayCluster) -> dict:
    """`ray memory --stats-only`: "Plasma memory usage N MiB, M objects, x% full" (+ spilled/restored lines)."""
    out = cluster.run(str(BIN / "ray"), "memory", "--stats-only", "--address", cluster.address,
                      timeout=120, check=False).stdout
    m = re.search(r"Plasma memory usage ([0-9.]+) MiB, ([0-9]+) objects", out)
    return {"plasma_mib": float(m.group(1)), "objects": int(m.group(2))} if m else {"raw": out[-400:]}


def replica_rss(cluster: RayCluster) -> dict[str, list[dict]]:
    """Deployment → [{replica_id, pid, rss_mib}] for its RUNNING replicas."""
    out = {}
    for name, reps in cluster.replicas().items():
        rows = []
        for r in reps:
            if r["state"] != "RUNNING" or not r.get("pid"):
                continue
            try:
                rss = psutil.Process(r["pid"]).memory_info().rss / MiB
            except psutil.NoSuchProcess:
                continue
            rows.append({"replica_id": r["replica_id"], "pid": r["pid"], "rss_mib": round(rss, 1)})
        out[name] = rows
    return out


def sample(cluster: RayCluster, requests_done: int, t0: float) -> dict:
    return {"requests": requests_done, "t_s": round(time.monotonic() - t0, 1), "rss": replica_rss(cluster),
            "object_store": object_store(cluster)}


def total_rss(s: dict, deployment: str) -> float:
    return round(sum(r["rss_mib"] for r in s["rss"].get(deployment, [])), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--sample-every", type=int, default=100)
    ap.add_argument("--adapter-every", type=int, default=25, help="0: never")
    ap.add_argument("--url-every", type=int, default=10, help="0: never")
    ap.add_argument("--endpoint", choices=["generations", "readyz"], default="generations",
                    help="readyz: only the ingress and the stages' health checks through their handles (no model "
                         "work), to tell handle/router growth from generation growth")
    ap.add_argument("--deadline-s", type=float, default=1500, help="hard bound on the request loop")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/memory_soak.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the cluster

    preset = load_preset("lightray-shapes")
    work = Path(tempfile.mkdtemp(prefix="lr-soak-"))
    registry_root = work / "registry"
    src = work / "adapter"
    src.mkdir()
    lightning = next(v.lightning_lora for v in preset.variants if v.lightning_lora)
    shutil.copy(preset.resolve(lightning), src / "adapter_model.safetensors")
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8, "peft_type": "LORA"}))
    adapter = open_registry(str(registry_root)).publish(
        "soak", f"a{uuid.uuid4().hex[:8]}", src, base_model_id=preset.base_model_id).ref

    cluster = RayCluster()
    cluster.env["LIGHTRAY_ADAPTER_CACHE"] = str(work / "adapter-cache")
    cluster.start()
    samples: list[dict] = []
    status: dict[str, int] = {}
    latencies: list[float] = []
    try:
        config = cluster.serve_config(REPO / "configs/serve/local.yaml", {
            "registry": str(registry_root), "image_store_dir": str(work / "images")})
        cluster.deploy(config)
        body = {"prompt": "a red circle on the left, white background", "model": "lightray-shapes-lightning-4",
                "size": "64x64", "n": 1}
        t0 = time.monotonic()
        samples.append(sample(cluster, 0, t0))
        print(f"start: {json.dumps({d: total_rss(samples[-1], d) for d in DEPLOYMENTS})} MiB, "
              f"object store {samples[-1]['object_store']}", flush=True)
        with httpx.Client(timeout=120) as http:
            done = 0
            for i in range(1, args.requests + 1):
                if time.monotonic() - t0 > args.deadline_s:
                    print(f"deadline reached after {done} requests", flush=True)
                    break
                req = {**body, "seed": i}
                if args.adapter_every and i % args.adapter_every == 0:
                    req["lora"] = adapter
                if args.url_every and i % args.url_every == 0:
                    req["response_format"] = "url"
                start = time.monotonic()
                try:
                    if args.endpoint == "readyz":
                        r = http.get(f"{cluster.http_url}/readyz")
                        req = {}
                    else:
                        r = http.post(f"{cluster.http_url}/v1/images/generations", json=req)
                    key = str(r.status_code)
                    if r.status_code == 200 and req.get("response_format") == "url":
                        key += "+url" if http.get(r.json()["data"][0]["url"]).status_code == 200 else "+url-missing"
                except httpx.HTTPError as err:
                    key = type(err).__name__
                latencies.append(time.monotonic() - start)
                status[key] = status.get(key, 0) + 1
                done = i
                if i % args.sample_every == 0:
                    samples.append(sample(cluster, i, t0))
                    s = samples[-1]
                    print(f"{i:5d} requests, {s['t_s']:6.1f} s: "
                          + ", ".join(f"{d} {total_rss(s, d)}" for d in DEPLOYMENTS)
                          + f" MiB; object store {s['object_store']}", flush=True)
            if not samples or samples[-1]["requests"] != done:
                samples.append(sample(cluster, done, t0))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    first, last = samples[0], samples[-1]
    warm = next((s for s in samples if s["requests"] >= args.sample_every), first)
    summary = {
        d: {"start_mib": total_rss(first, d), f"after_{warm['requests']}_mib": total_rss(warm, d),
            "end_mib": total_rss(last, d), "growth_after_warmup_mib": round(total_rss(last, d) - total_rss(warm, d), 1),
            "replicas_end": len(last["rss"].get(d, []))}
        for d in DEPLOYMENTS
    }
    lat = sorted(latencies)
    result = {
        "requests": {"endpoint": args.endpoint, "sent": len(latencies), "status": status, "adapter": adapter, "adapter_every": args.adapter_every,
                     "url_every": args.url_every, "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
                     "p99_s": round(lat[int(len(lat) * 0.99)], 3) if lat else None},
        "summary": summary,
        "object_store": {"start": first["object_store"], "end": last["object_store"]},
        "samples": samples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{'requests':>8} " + " ".join(f"{d + ' MiB':>15}" for d in DEPLOYMENTS) + f" {'plasma MiB':>11} {'objects':>8}")
    for s in samples:
        o = s["object_store"]
        print(f"{s['requests']:>8} " + " ".join(f"{total_rss(s, d):>15}" for d in DEPLOYMENTS)
              + f" {o.get('plasma_mib', '?'):>11} {o.get('objects', '?'):>8}")
    print(f"\nstatus: {status}  p50 {result['requests']['p50_s']} s  p99 {result['requests']['p99_s']} s")
    print("growth after warm-up (MiB):", {d: v["growth_after_warmup_mib"] for d, v in summary.items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
