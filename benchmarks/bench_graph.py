"""In-process pipeline vs the Ray Serve graph over HTTP, same model, same prompts, one run.

    python benchmarks/bench_graph.py [--requests 40] [--model lightray-shapes-lightning-4]

Measures latency p50/p95 at concurrency 1, throughput at concurrency 8, and a per-stage breakdown (encode /
denoise / decode / PNG / hops inside the graph / HTTP + proxy). Prints a table and writes
benchmarks/results/graph.json. Thread budget: Serve replicas run torch with 1 thread each (Ray sets
OMP_NUM_THREADS=1); the in-process baseline is measured with 1 thread (latency, like one replica) and with 2
threads (this machine's cores, for throughput).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent

from lightray.config import load_preset  # noqa: E402
from lightray.images import encode_png  # noqa: E402
from testing.local_cluster import RayCluster  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.schemas import ImageGenerationRequest  # noqa: E402

PROMPTS = [
    "a red circle on the left, white background",
    "白色背景，左边有一个红色的圆形",
    "a blue square at the top on a gray background",
    "黑色背景，中间有一个黄色的三角形",
]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def body(i: int, model: str) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "model": model, "size": "64x64"}


def bench_in_process(preset, model: str, n: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    pipe = LocalPipeline(preset)
    stages = {"encode_ms": [], "denoise_ms": [], "decode_ms": [], "png_ms": []}
    latencies = []

    def one(i: int) -> float:
        spec = ImageGenerationRequest.model_validate(body(i, model)).resolve(preset, 0)
        t0 = time.perf_counter()
        text = pipe.encode(spec)
        t1 = time.perf_counter()
        latents = pipe.denoiser.denoise(spec.denoise_params(), text)
        t2 = time.perf_counter()
        images = pipe.vae.decode(latents, spec.height, spec.width)
        t3 = time.perf_counter()
        [encode_png(im) for im in images]
        t4 = time.perf_counter()
        for k, a, b in (("encode_ms", t0, t1), ("denoise_ms", t1, t2), ("decode_ms", t2, t3), ("png_ms", t3, t4)):
            stages[k].append((b - a) * 1000)
        return (t4 - t0) * 1000

    for i in range(3):
        one(i)  # warm-up
    for k in stages:
        stages[k].clear()
    for i in range(n):
        latencies.append(one(i))
    # Concurrency 8 in one process, one request at a time: the sequential baseline.

    lock = threading.Lock()

    def locked(i):
        with lock:
            return one(i)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(locked, range(n)))
    throughput = n / (time.perf_counter() - t0)
    return {
        "threads": threads,
        "p50_ms": statistics.median(latencies),
        "p95_ms": pct(latencies, 0.95),
        "throughput_c8_img_s": throughput,
        "stages_p50_ms": {k: statistics.median(v) for k, v in stages.items() if v},
    }


def bench_graph(url: str, model: str, n: int) -> dict:
    client = httpx.Client(timeout=300)
    for i in range(5):
        client.post(f"{url}/v1/images/generations", json=body(i, model)).raise_for_status()
    latencies, server = [], {}
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post(f"{url}/v1/images/generations", json=body(i, model))
        latencies.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        for item in r.headers["server-timing"].split(","):
            name, dur = item.strip().split(";dur=")
            server.setdefault(name, []).append(float(dur))
    stages = {f"{k}_ms": statistics.median(v) for k, v in server.items()}
    inside = sum(stages.get(k, 0.0) for k in ("encode_ms", "denoise_ms", "decode_ms", "png_ms"))
    stages["hops_ms"] = statistics.median(
        [g - sum(server[k][i] for k in ("encode", "denoise", "decode", "png")) for i, g in enumerate(server["graph"])]
    )
    stages["http_proxy_ms"] = statistics.median([lat - g for lat, g in zip(latencies, server["graph"])])

    clients = threading.local()  # one keep-alive connection per load thread, as a real load generator keeps

    def timed_post(i):
        if not hasattr(clients, "c"):
            clients.c = httpx.Client(timeout=300)
        clients.c.post(f"{url}/v1/images/generations", json=body(i, model)).raise_for_status()

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(timed_post, range(n)))
    throughput = n / (time.perf_counter() - t0)
    return {
        "p50_ms": statistics.median(latencies),
        "p95_ms": pct(latencies, 0.95),
        "throughput_c8_img_s": throughput,
        "stages_p50_ms": stages,
        "stage_sum_p50_ms": inside,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--model", default=None, help="model id (default: the preset's first)")
    parser.add_argument("--preset", default="lightray-shapes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/graph.json")
    args = parser.parse_args()
    preset = load_preset(args.preset)
    model = args.model or preset.model_ids[0]

    results = {"model": model, "requests": args.requests, "size": "64x64", "device": "cpu (2 cores)"}
    cluster = RayCluster().start()
    try:
        config = cluster.serve_config(REPO / "configs/serve/local.yaml", {"preset": args.preset})
        cluster.deploy(config)
        results["graph"] = bench_graph(cluster.http_url, model, args.requests)
    finally:
        cluster.stop()
    # The in-process runs go after the cluster is gone, so neither side competes with the other for the CPU.
    results["in_process_1_thread"] = bench_in_process(preset, model, args.requests, threads=1)
    results["in_process_2_threads"] = bench_in_process(preset, model, args.requests, threads=2)

    g, p1, p2 = results["graph"], results["in_process_1_thread"], results["in_process_2_threads"]
    results["graph_minus_in_process_p50_ms"] = g["p50_ms"] - p1["p50_ms"]
    results["throughput_ratio_graph_vs_in_process_2t"] = g["throughput_c8_img_s"] / p2["throughput_c8_img_s"]
    rows = [
        ("p50 latency, concurrency 1 (ms)", g["p50_ms"], p1["p50_ms"], p2["p50_ms"]),
        ("p95 latency, concurrency 1 (ms)", g["p95_ms"], p1["p95_ms"], p2["p95_ms"]),
        ("throughput, concurrency 8 (img/s)", g["throughput_c8_img_s"], p1["throughput_c8_img_s"],
         p2["throughput_c8_img_s"]),
    ]
    for k in ("encode_ms", "denoise_ms", "decode_ms", "png_ms"):
        rows.append((f"  stage {k} p50", g["stages_p50_ms"].get(k, float("nan")), p1["stages_p50_ms"][k],
                     p2["stages_p50_ms"][k]))
    rows.append(("  graph hops (ms, p50)", g["stages_p50_ms"]["hops_ms"], 0.0, 0.0))
    rows.append(("  HTTP + proxy + ingress (ms, p50)", g["stages_p50_ms"]["http_proxy_ms"], 0.0, 0.0))
    print(f"\nmodel {model}, 64x64, {args.requests} requests per measurement")
    print(f"{'':40s} {'Serve graph':>12s} {'in-proc 1t':>12s} {'in-proc 2t':>12s}")
    for name, *vals in rows:
        print(f"{name:40s} " + " ".join(f"{v:12.1f}" for v in vals))
    print(f"graph p50 - in-process p50 (1 thread): {results['graph_minus_in_process_p50_ms']:.1f} ms; "
          f"throughput graph / in-process (2 threads): {results['throughput_ratio_graph_vs_in_process_2t']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
