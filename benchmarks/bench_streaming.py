"""Streaming latency through the Ray Serve graph over HTTP: time to the first preview and to the completed image,
and what `partial_images` = 3 adds over a plain (`stream: false`) request.

    python benchmarks/bench_streaming.py [--requests 20] [--url http://127.0.0.1:8000]

Without --url it starts a local Ray cluster and deploys configs/serve/local.yaml. Per model (Lightning 4,
Lightning 8, base) at the default size, one request at a time, interleaved so that drift hits every mode alike:
`stream: false`, `stream: true` with `partial_images` 0, and with 3 (fast previews, the default). Also one preview
timed in-process, fast and full (its cost without any hop). Prints a table and writes
benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

from lightray.config import load_preset  # noqa: E402
from testing.local_cluster import RayCluster  # noqa: E402
from testing.timing import median_ms  # noqa: E402
from lightray.images import encode_png  # noqa: E402
from lightray.stages import VaeStage  # noqa: E402

PROMPTS = ["a red circle on the left, white background", "白色背景，左边有一个红色的圆形",
           "a blue square at the top on a gray background", "黑色背景，中间有一个黄色的三角形"]
MODELS = ["lightray-shapes-lightning-4", "lightray-shapes-lightning-8", "lightray-shapes"]


def one(client: httpx.Client, url: str, model: str, i: int, mode: str) -> dict:
    """One request: its total time, and for streams the time to the first event of each kind (ms)."""
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "model": model, "seed": i}
    start = time.perf_counter()
    if mode == "plain":
        r = client.post(f"{url}/v1/images/generations", json=body)
        r.raise_for_status()
        return {"total_ms": (time.perf_counter() - start) * 1000}
    body.update(stream=True, partial_images=3 if mode == "stream_p3" else 0)
    firsts: dict[str, float] = {}
    with client.stream("POST", f"{url}/v1/images/generations", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            kind = json.loads(line[5:])["type"]
            if kind == "error":
                raise RuntimeError(line)
            firsts.setdefault(kind, (time.perf_counter() - start) * 1000)
    out = {"total_ms": (time.perf_counter() - start) * 1000,
           "first_step_ms": firsts["lightray.progress"], "completed_ms": firsts["image_generation.completed"]}
    if "image_generation.partial_image" in firsts:
        out["first_preview_ms"] = firsts["image_generation.partial_image"]
    return out


def bench(url: str, n: int) -> dict:
    modes = ("plain", "stream_p0", "stream_p3")
    results = {}
    with httpx.Client(timeout=300) as client:
        for model in MODELS:
            for mode in modes:  # warm-up
                one(client, url, model, 0, mode)
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            for i in range(n):
                for mode in modes:
                    runs[mode].append(one(client, url, model, 1000 + i, mode))

            def p50(mode: str, key: str) -> float:
                return statistics.median(r[key] for r in runs[mode])

            results[model] = {
                "plain_total_ms": p50("plain", "total_ms"),
                "stream_p0_first_step_ms": p50("stream_p0", "first_step_ms"),
                "stream_p0_completed_ms": p50("stream_p0", "completed_ms"),
                "stream_p3_first_preview_ms": p50("stream_p3", "first_preview_ms"),
                "stream_p3_completed_ms": p50("stream_p3", "completed_ms"),
            }
            results[model]["p3_added_ms"] = results[model]["stream_p3_completed_ms"] - results[model]["plain_total_ms"]
    return results


def preview_costs(preset, repeats: int = 30) -> dict[str, float]:
    """Median ms of one default-size preview in-process, one thread (as a replica runs): the fast one
    (`VaeStage.preview`: the model's preview decoder or fitted projection, PNG included) and a full VAE decode
    (`preview: "full"`)."""
    torch.set_num_threads(1)
    vae = VaeStage(preset)
    w, h = preset.default_size
    tokens = (w // 16) * (h // 16)
    latents = np.random.default_rng(0).standard_normal((1, tokens, 64)).astype(np.float32)

    return {"fast_preview_ms": median_ms(lambda: [encode_png(im) for im in vae.preview(latents, h, w)], repeats),
            "full_decode_ms": median_ms(lambda: vae.decode(latents, h, w), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--url", default=None, help="a running service; default: start one")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/streaming.json")
    args = parser.parse_args()
    preset = load_preset("lightray-shapes")
    w, h = preset.default_size
    results: dict = {"size": f"{w}x{h}", "requests": args.requests, "device": "cpu (2 cores)",
                     "date": time.strftime("%Y-%m-%d"), "preview_in_process": preview_costs(preset)}
    if args.url:
        results["models"] = bench(args.url, args.requests)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
            cluster = RayCluster().start()
            try:
                cluster.deploy(cluster.serve_config(REPO / "configs/serve/local.yaml", {
                    "registry": str(Path(tmp) / "registry"), "image_store_dir": str(Path(tmp) / "images")}))
                results["models"] = bench(cluster.http_url, args.requests)
            finally:
                cluster.stop()

    costs = results["preview_in_process"]
    print(f"\nstreaming, {results['size']}, p50 over {args.requests} requests each, one at a time (one preview "
          f"in-process: fast {costs['fast_preview_ms']:.2f} ms, full VAE decode {costs['full_decode_ms']:.1f} ms)\n")
    print("| model | stream false: total | stream, 0 previews: first step / completed | "
          "stream, 3 previews: first preview / completed | 3 previews add |")
    print("| --- | --- | --- | --- | --- |")
    for model, r in results["models"].items():
        print(f"| {model} | {r['plain_total_ms']:.1f} ms | {r['stream_p0_first_step_ms']:.1f} / "
              f"{r['stream_p0_completed_ms']:.1f} ms | {r['stream_p3_first_preview_ms']:.1f} / "
              f"{r['stream_p3_completed_ms']:.1f} ms | {r['p3_added_ms']:+.1f} ms |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
