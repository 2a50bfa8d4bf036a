"""The stages around the engine (issue: fast stages): the single-frame VAE against diffusers' 3D VAE in process,
and over HTTP on the served graph (configs/serve/local.yaml, what `make serve` runs) the latency by size, the VAE's
share, streamed previews, throughput under concurrency and the per-request overhead. Ratios are measured side by
side in one run.

    python benchmarks/bench_stages.py [--requests 15] [--skip-http] [--exact-too] [--stack-all-too]

In process (one torch thread, as a replica runs): decode and encode time of the embedded VAE and of the real
layout at toy width (tests/mini_real.py's VAE config, bfloat16) at 128², 256² and 1024², diffusers' VAE
(`vae_exact`) against the single-frame one, and their pixel difference.

Over HTTP (Lightning 4, one request at a time, interleaved so drift hits every case alike): p50 at 64², 128²,
256²; each stage's p50 from `Server-Timing`; a 128² stream with 3 previews against the plain request; then 128²
at concurrency 8 against the in-process pipeline run sequentially (after the cluster is gone, one thread).
`--exact-too` deploys again with `vae_exact: true` for the before/after rows, `--stack-all-too` with
`vae_stack_requests: all`. Prints tables and writes
benchmarks/results/stages.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the real layout's published VAE config (tests/mini_real.py)

from diffusers import AutoencoderKLQwenImage  # noqa: E402

from lightray.config import load_preset  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.schemas import ImageGenerationRequest  # noqa: E402
from lightray.stages.vae_single_frame import SingleFrameVae  # noqa: E402
from mini_real import MINI_VAE_BASE_DIM, QWEN_IMAGE_VAE_CONFIG  # noqa: E402
from testing.local_cluster import RayCluster  # noqa: E402
from testing.timing import median_ms  # noqa: E402

MODEL = "lightray-shapes-lightning-4"
PROMPTS = ["a red circle on the left, white background", "白色背景，左边有一个红色的圆形",
           "a blue square at the top on a gray background", "黑色背景，中间有一个黄色的三角形"]
SIZES = ["64x64", "128x128", "256x256"]


def grey(x: torch.Tensor) -> np.ndarray:
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().numpy().astype(int)


@torch.inference_mode()
def vae_in_process() -> dict:
    """Decode/encode ms of one image, 3D against single-frame, and the pixel difference, per model and size."""
    torch.set_num_threads(1)
    config = {k: v for k, v in QWEN_IMAGE_VAE_CONFIG.items() if not k.startswith("_")}
    torch.manual_seed(0)
    models = {
        "embedded (float32)": AutoencoderKLQwenImage.from_pretrained(
            load_preset("lightray-shapes").root / "vae").eval(),
        "real layout, toy width (bfloat16)": AutoencoderKLQwenImage(
            **{**config, "base_dim": MINI_VAE_BASE_DIM}).to(torch.bfloat16).eval(),
    }
    out = {}
    for name, vae in models.items():
        folded = SingleFrameVae(vae)
        for side in (128, 256, 1024):
            repeats = 5 if side < 1024 else 1
            z = torch.randn(1, 16, 1, side // 8, side // 8, generator=torch.Generator().manual_seed(side)).to(vae.dtype)
            x = (torch.rand(1, 3, 1, side, side, generator=torch.Generator().manual_seed(side)) * 2 - 1).to(vae.dtype)
            row = {
                "decode_3d_ms": median_ms(lambda: vae.decode(z), repeats),
                "decode_2d_ms": median_ms(lambda: folded.decode(z), repeats),
                "encode_3d_ms": median_ms(lambda: vae.encode(x), repeats),
                "encode_2d_ms": median_ms(lambda: folded.encode(x), repeats),
            }
            diff = np.abs(grey(vae.decode(z, return_dict=False)[0]) - grey(folded.decode(z)[0]))
            row.update(decode_speedup=row["decode_3d_ms"] / row["decode_2d_ms"],
                       encode_speedup=row["encode_3d_ms"] / row["encode_2d_ms"],
                       grey_max=int(diff.max()), grey_mean=float(diff.mean()))
            out[f"{name}, {side}x{side}"] = row
            print(f"  {name} {side}²: decode {row['decode_3d_ms']:.1f} → {row['decode_2d_ms']:.1f} ms "
                  f"({row['decode_speedup']:.1f}x), grey max {row['grey_max']}", flush=True)
    return out


def server_timing(response: httpx.Response) -> dict[str, float]:
    out = {}
    for item in response.headers.get("server-timing", "").split(","):
        if ";dur=" in item:
            name, dur = item.strip().split(";dur=")
            out[name] = float(dur)
    return out


def plain(client: httpx.Client, url: str, size: str, i: int) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/images/generations",
                    json={"prompt": PROMPTS[i % 4], "model": MODEL, "size": size, "seed": i})
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000, server_timing(r)


def streamed(client: httpx.Client, url: str, size: str, i: int, previews: int) -> float:
    """ms to the completed image's event."""
    body = {"prompt": PROMPTS[i % 4], "model": MODEL, "size": size, "seed": i, "stream": True,
            "partial_images": previews}
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}/v1/images/generations", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and '"image_generation.completed"' in line:
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError("the stream ended without a completed image")


def http_bench(url: str, n: int) -> dict:
    with httpx.Client(timeout=300) as client:
        for i in range(3):
            for size in SIZES:
                plain(client, url, size, i)
            streamed(client, url, "128x128", i, 3)
        lat: dict[str, list[float]] = {s: [] for s in SIZES}
        timings: dict[str, list[dict]] = {s: [] for s in SIZES}
        stream3 = []
        for i in range(n):
            for size in SIZES:
                ms, st = plain(client, url, size, 100 + i)
                lat[size].append(ms)
                timings[size].append({**st, "total": ms})
            stream3.append(streamed(client, url, "128x128", 100 + i, 3))
    out: dict = {"p50_ms": {s: statistics.median(v) for s, v in lat.items()}}
    stages = {}
    for size, rows in timings.items():
        keys = sorted({k for r in rows for k in r})
        stages[size] = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
        # Per request: latency minus the stages' own compute (encode, denoise, decode, image encoding).
        compute = [sum(r.get(k, 0.0) for k in ("encode", "denoise", "decode", "png")) for r in rows]
        stages[size]["overhead"] = statistics.median(r["total"] - c for r, c in zip(rows, compute))
        stages[size]["http_and_proxy"] = statistics.median(r["total"] - r.get("graph", 0.0) for r in rows)
    out["stages_p50_ms"] = stages
    out["stream_p3_completed_p50_ms"] = statistics.median(stream3)
    p = out["p50_ms"]
    s128 = stages["128x128"]
    out["ratios"] = {
        "p50_256_over_64": p["256x256"] / p["64x64"],
        "p50_128_over_64": p["128x128"] / p["64x64"],
        "decode_over_denoise_128": s128.get("decode", 0.0) / s128["denoise"],
        "stream3_over_plain_128": out["stream_p3_completed_p50_ms"] / p["128x128"],
        "overhead_128_ms": s128["overhead"],
    }
    return out


def throughput_graph(url: str, n: int, concurrency: int = 8, warmup_s: float = 30.0) -> float:
    """Images/s at `concurrency` clients over `n` requests, after `warmup_s` of the same load: long enough for the
    Denoiser's autoscaling (configs/serve/local.yaml) to settle, so the figure is the steady state, not a
    replica's start-up."""
    clients = threading.local()

    def post(i: int) -> None:
        if not hasattr(clients, "c"):
            clients.c = httpx.Client(timeout=300)
        clients.c.post(f"{url}/v1/images/generations", json={
            "prompt": PROMPTS[i % 4], "model": MODEL, "size": "128x128", "seed": i}).raise_for_status()

    def load_for(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            post(0)

    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(load_for, [warmup_s] * concurrency))
        t0 = time.perf_counter()
        list(pool.map(post, range(n)))
    return n / (time.perf_counter() - t0)


def throughput_in_process(n: int) -> float:
    """Images/s of the in-process pipeline, one request after another, one torch thread (one replica's budget)."""
    torch.set_num_threads(1)
    preset = load_preset("lightray-shapes")
    pipe = LocalPipeline(preset)

    def one(i: int) -> None:
        spec = ImageGenerationRequest.model_validate(
            {"prompt": PROMPTS[i % 4], "model": MODEL, "size": "128x128", "seed": i}).resolve(preset, 0)
        pipe.generate(spec)

    one(0)
    t0 = time.perf_counter()
    for i in range(n):
        one(i)
    return n / (time.perf_counter() - t0)


RAY_SERVE_ACTOR_PLANE = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
}
"""Ray Serve's own defaults for what `lightray.ray_env.RAY_SERVE_DATA_PLANE` changes, for `--ray-env-too`: handle
calls as Ray actor tasks, the router and user code each on a loop of their own."""


def deploy_and_measure(n: int, preset_update: dict, stack: str, ray_env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        cluster = RayCluster()
        cluster.env.update(ray_env or {})
        cluster.start()
        try:
            preset = {**load_preset("lightray-shapes").model_dump(mode="json"), **preset_update}
            cluster.deploy(cluster.serve_config(REPO / "configs/serve/local.yaml", {
                "preset": preset, "registry": str(Path(tmp) / "registry"), "vae_stack_requests": stack,
                "image_store_dir": str(Path(tmp) / "images")}))
            result = http_bench(cluster.http_url, n)
            result["throughput_c8_img_s"] = throughput_graph(cluster.http_url, 10 * n)
            return result
        finally:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--exact-too", action="store_true", help="also serve with vae_exact (the old VAE)")
    parser.add_argument("--stack-all-too", action="store_true",
                        help="also serve with vae_stack_requests: all (decodes shared across requests)")
    parser.add_argument("--ray-env-too", action="store_true",
                        help="also serve with Ray Serve's default data plane (RAY_SERVE_ACTOR_PLANE)")
    parser.add_argument("--skip-vae", action="store_true", help="skip the in-process VAE rows")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/stages.json")
    args = parser.parse_args()
    results: dict = {"device": "cpu (2 cores)", "date": time.strftime("%Y-%m-%d"), "model": MODEL,
                     "requests": args.requests}
    print("VAE in process (one thread):", flush=True)
    results["vae_in_process"] = {} if args.skip_vae else vae_in_process()
    if not args.skip_http:
        runs = {"single-frame VAE": ({}, "exact", None)}
        if args.ray_env_too:
            runs["single-frame VAE, Ray Serve's actor data plane"] = ({}, "exact", RAY_SERVE_ACTOR_PLANE)
        if args.stack_all_too:
            runs["single-frame VAE, vae_stack_requests: all"] = ({}, "all", None)
        if args.exact_too:
            runs["vae_exact (before)"] = ({"vae_exact": True}, "exact", None)
        results["http"] = {}
        for name, (update, stack, env) in runs.items():
            print(f"HTTP: {name} ...", flush=True)
            results["http"][name] = deploy_and_measure(args.requests, update, stack, env)
        results["in_process_sequential_img_s"] = throughput_in_process(2 * args.requests)
        for r in results["http"].values():
            r["ratios"]["throughput_c8_graph_over_in_process"] = (
                r["throughput_c8_img_s"] / results["in_process_sequential_img_s"])

    print("\n| VAE, one image | decode 3D → 2D (ms) | speed-up | encode 3D → 2D (ms) | speed-up | grey levels max / mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results["vae_in_process"].items():
        print(f"| {name} | {r['decode_3d_ms']:.1f} → {r['decode_2d_ms']:.1f} | {r['decode_speedup']:.1f}x | "
              f"{r['encode_3d_ms']:.1f} → {r['encode_2d_ms']:.1f} | {r['encode_speedup']:.1f}x | "
              f"{r['grey_max']} / {r['grey_mean']:.3f} |")
    for name, r in results.get("http", {}).items():
        print(f"\nHTTP, {name}, Lightning 4, p50 over {args.requests}:")
        print("| size | p50 | encode | denoise | decode | png | overhead (p50 − stage compute) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for size in SIZES:
            s = r["stages_p50_ms"][size]
            print(f"| {size} | {r['p50_ms'][size]:.1f} | {s.get('encode', 0):.1f} | {s.get('denoise', 0):.1f} | "
                  f"{s.get('decode', 0):.1f} | {s.get('png', 0):.1f} | {s['overhead']:.1f} |")
        print("| figure | value |\n| --- | --- |")
        for k, v in r["ratios"].items():
            print(f"| {k} | {v:.2f} |")
        print(f"| throughput c8 (img/s) | {r['throughput_c8_img_s']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
