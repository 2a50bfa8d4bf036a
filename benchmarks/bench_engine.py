"""The denoising engine under load: the Serve graph over HTTP against the in-process sequential pipeline, one run.

    python benchmarks/bench_engine.py [--requests 32]

Measures, on configs/serve/local.yaml and the embedded model (Lightning 4 steps, 64x64 unless said):
* throughput at concurrency 8, graph vs in-process sequential (one request at a time, 1 torch thread);
* latency at concurrency 1, graph p50 - in-process p50, with the per-stage breakdown (bench_graph.py's);
* head-of-line blocking: p50 of a Lightning-4 request while 3 base requests (50 steps, true CFG, n=4) run,
  divided by its idle p50;
* mixed adapters: throughput of 8 concurrent requests with 8 different tenant adapters vs the same 8 with one
  shared adapter;
* priority: p50 of an `interactive` Lightning-4 request under a saturating `batch` load (base, 30 steps,
  CFG, n=2, 12 at a time) vs idle;
* the engine's step time vs rows per step (1..16 rows at 64x64 and 128x128), in process, 1 thread.
Prints a table and writes benchmarks/results/engine.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent

from bench_graph import bench_graph, bench_in_process  # noqa: E402
from testing.adapters import publish_lora_adapter  # noqa: E402

from lightray.config import EngineConfig, load_preset  # noqa: E402
from lightray.contracts import DenoiseParams, TextEmbeddings  # noqa: E402
from testing.local_cluster import RayCluster  # noqa: E402

LIGHTNING = "lightray-shapes-lightning-4"
PROMPT = "a red circle on the left, white background"
BASE_CFG = {"prompt": "a blue square at the top, gray background", "model": "lightray-shapes", "n": 4,
            "num_inference_steps": 50, "true_cfg_scale": 2.0, "size": "64x64"}
BATCH_LOAD = {"prompt": "a green triangle at the bottom, black background", "model": "lightray-shapes", "n": 2,
              "num_inference_steps": 30, "true_cfg_scale": 2.0, "size": "64x64", "priority": "batch"}


_clients = threading.local()


def post(url: str, body: dict) -> float:
    """One request on this thread's keep-alive connection; its latency in ms."""
    if not hasattr(_clients, "c"):
        _clients.c = httpx.Client(timeout=600)
    t0 = time.perf_counter()
    _clients.c.post(f"{url}/v1/images/generations", json=body).raise_for_status()
    return (time.perf_counter() - t0) * 1000


def lightning(i: int, **extra) -> dict:
    return {"prompt": PROMPT, "seed": i, "model": LIGHTNING, "size": "64x64", **extra}


def p50_sequential(url: str, bodies: list[dict]) -> float:
    return statistics.median(post(url, b) for b in bodies)


def under_load(url: str, background: dict, copies: int, probes: list[dict], keep_going: bool) -> list[float]:
    """Latencies of `probes` (one at a time) while `copies` `background` requests run (re-sent as they finish
    when `keep_going`)."""
    stop = threading.Event()

    def worker(k: int) -> None:
        i = 0
        while not stop.is_set():
            post(url, {**background, "seed": 1000 * k + i})
            i += 1
            if not keep_going:
                return

    pool = cf.ThreadPoolExecutor(copies)
    futures = [pool.submit(worker, k) for k in range(copies)]
    time.sleep(1.0)  # the background work has reached the engine
    try:
        return [post(url, b) for b in probes]
    finally:
        stop.set()
        for f in futures:
            f.result()
        pool.shutdown()


def throughput(url: str, bodies: list[dict], concurrency: int) -> float:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda b: post(url, b), bodies))
    return len(bodies) / (time.perf_counter() - t0)


def step_curve(preset) -> dict:
    from lightray.engine import DenoiseEngine
    from lightray.stages import TextEncodeStage

    torch.set_num_threads(1)
    engine = DenoiseEngine(preset, EngineConfig(max_batch_rows=64))
    text = TextEmbeddings(TextEncodeStage(preset).encode([PROMPT])[0])
    curve = {}
    for size in (64, 128):
        for rows in (1, 2, 4, 8, 12, 16):
            times = []
            for _ in range(5):
                for i in range(rows):
                    engine.submit(DenoiseParams(seeds=(i,), width=size, height=size, num_inference_steps=4,
                                                variant=LIGHTNING), text)
                engine.step()  # admission and the first step
                t0 = time.perf_counter()
                engine.step()
                engine.step()
                times.append((time.perf_counter() - t0) / 2 * 1000)
                while engine.step():
                    pass
            curve[f"{size}x{size}/{rows}"] = statistics.median(times)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/engine.json")
    args = parser.parse_args()
    preset = load_preset("lightray-shapes")
    n = args.requests
    results: dict = {"model": LIGHTNING, "size": "64x64", "requests": n, "device": "cpu (2 cores)",
                     "date": time.strftime("%Y-%m-%d")}

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        registry = Path(tmp) / "registry"
        refs = [publish_lora_adapter(registry, preset, "bench", f"a{i}", seed=i, tmp_dir=tmp).ref for i in range(8)]
        cluster = RayCluster().start()
        try:
            config = cluster.serve_config(REPO / "configs/serve/local.yaml",
                                          {"registry": str(registry), "adapter_cache_size": 8,
                                           "image_store_dir": str(Path(tmp) / "images")})
            cluster.deploy(config)
            url = cluster.http_url
            results["graph"] = bench_graph(url, LIGHTNING, n)

            idle = p50_sequential(url, [lightning(i) for i in range(10)])
            busy = under_load(url, BASE_CFG, 3, [lightning(100 + i) for i in range(5)], keep_going=False)
            results["head_of_line"] = {"idle_p50_ms": idle, "behind_3_base_p50_ms": statistics.median(busy),
                                       "ratio": statistics.median(busy) / idle}

            for ref in refs:  # every adapter fetched and loaded once
                post(url, lightning(0, lora=ref))
            shared = [lightning(i, lora=refs[0]) for i in range(8)]
            mixed = [lightning(i, lora=refs[i % 8]) for i in range(8)]
            rounds = {"shared": [], "mixed": []}
            for _ in range(4):  # interleaved rounds
                rounds["shared"].append(throughput(url, shared, 8))
                rounds["mixed"].append(throughput(url, mixed, 8))
            results["mixed_adapters"] = {k: statistics.median(v) for k, v in rounds.items()}
            results["mixed_adapters"]["ratio"] = results["mixed_adapters"]["mixed"] / results["mixed_adapters"]["shared"]

            idle_i = p50_sequential(url, [lightning(i, priority="interactive") for i in range(10)])
            loaded = under_load(url, BATCH_LOAD, 12, [lightning(200 + i, priority="interactive") for i in range(8)],
                                keep_going=True)
            results["priority"] = {"idle_p50_ms": idle_i, "under_batch_load_p50_ms": statistics.median(loaded),
                                   "ratio": statistics.median(loaded) / idle_i}
        finally:
            cluster.stop()
    # In-process runs after the cluster is gone, so neither side competes for the CPU.
    results["in_process"] = bench_in_process(preset, LIGHTNING, n, threads=1)
    results["step_ms_by_rows"] = step_curve(preset)

    g, p = results["graph"], results["in_process"]
    results["throughput_ratio_c8"] = g["throughput_c8_img_s"] / p["throughput_c8_img_s"]
    results["latency_overhead_p50_ms"] = g["p50_ms"] - p["p50_ms"]
    rows = [
        ("throughput c8: graph / in-process sequential", f"{g['throughput_c8_img_s']:.1f} / "
         f"{p['throughput_c8_img_s']:.1f} img/s = {results['throughput_ratio_c8']:.2f}x"),
        ("latency c1 p50: graph - in-process", f"{g['p50_ms']:.1f} - {p['p50_ms']:.1f} = "
         f"{results['latency_overhead_p50_ms']:+.1f} ms"),
        ("  graph stages p50 (ms)", ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in g["stages_p50_ms"].items())),
        ("  in-process stages p50 (ms)", ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in p["stages_p50_ms"].items())),
        ("head-of-line: behind 3 base / idle", f"{results['head_of_line']['behind_3_base_p50_ms']:.0f} / "
         f"{results['head_of_line']['idle_p50_ms']:.0f} ms = {results['head_of_line']['ratio']:.2f}x"),
        ("mixed adapters: 8 different / 1 shared", f"{results['mixed_adapters']['mixed']:.1f} / "
         f"{results['mixed_adapters']['shared']:.1f} img/s = {results['mixed_adapters']['ratio']:.2f}x"),
        ("priority: interactive under batch load / idle", f"{results['priority']['under_batch_load_p50_ms']:.0f} / "
         f"{results['priority']['idle_p50_ms']:.0f} ms = {results['priority']['ratio']:.2f}x"),
        ("engine step time by rows (ms)", ", ".join(f"{k} {v:.1f}" for k, v in results["step_ms_by_rows"].items())),
    ]
    print("| measurement | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
