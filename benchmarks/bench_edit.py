"""Instruction editing (Qwen-Image-Edit-Plus) measured: what edit rows cost the engine, what a mixed load of edits
and generations gets over HTTP, and the served edit's latency against diffusers' pipeline. Ratios side by side in
one run; run it on an idle machine.

    python benchmarks/bench_edit.py [--requests 9] [--skip-http] [--skip-mini]

1. Engine, in process, one torch thread (as a replica runs): the median forward time of one step at 128², text-to-
   image rows (the embedded shapes model) against edit rows (the embedded edit model: the same transformer
   widths, plus 64 condition tokens per row and Edit-2511's zero_cond_t), at 1, 4 and 8 rows.
2. Over HTTP on configs/serve/local.yaml (what `make serve` runs, both models): 8 generations (Lightning 4) and
   8 edits (4 steps, no CFG) at 128² sent together (concurrency 16), against the same requests in two phases
   (generations, then edits, each at concurrency 8): images per second. Then one 128² edit at a time with the
   edit model's Lightning 4 against its base (20 steps, true CFG): p50 of each and the speed-up.
3. The mini real-layout Edit-2511 (tests/mini_real.py, bfloat16) at 256² with one input image, Lightning 4: p50 over
   HTTP of the served graph (a Serve app of that preset alone), against `QwenImageEditPlusPipeline.__call__` in
   process (one thread).

Prints tables and writes benchmarks/results/edit.json.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the mini real layout (tests/mini_real.py)

from lightray.config import load_preset  # noqa: E402
from lightray.contracts import DenoiseParams, TextEmbeddings  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.world.shapes import Scene, render  # noqa: E402
from testing.local_cluster import RayCluster  # noqa: E402
from testing.timing import median_ms  # noqa: E402

SOURCE = Scene("red", "circle", "left", "white")
GEN_MODEL, EDIT_MODEL = "lightray-shapes-lightning-4", "lightray-shapes-edit"
LIGHTNING_EDIT_MODEL = "lightray-shapes-edit-lightning-4"


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def step_ms(pipeline: LocalPipeline, rows: int, edit: bool, steps: int = 6) -> float:
    """Median forward time of the engine's steps with `rows` requests of one image each at 128², no CFG."""
    source = render(SOURCE, 128)
    forwards: list[float] = []
    engine = pipeline.denoiser
    requests = []
    for i in range(rows):
        params = DenoiseParams(seeds=(i,), width=128, height=128, num_inference_steps=steps, true_cfg_scale=1.0,
                               variant=pipeline.preset.variants[0].id if not edit else EDIT_MODEL)
        if edit:
            text = pipeline.text.encode_instruction(["make the circle blue"], [source], 128, 128)
            condition = pipeline.vae.encode_conditions([source], 128, 128)
            requests.append(engine.submit(params, text, condition=condition))
        else:
            text = TextEmbeddings(pipeline.text.encode(["a red circle on the left, white background"])[0])
            requests.append(engine.submit(params, text))
    engine.on_step = lambda stats: forwards.append(stats.forward_ms) if stats.rows == rows else None
    try:
        while not all(r.done() for r in requests):
            engine.step()
    finally:
        engine.on_step = None
    return statistics.median(forwards[1:])  # the first step warms the shapes' caches


def engine_rows() -> list[dict]:
    torch.set_num_threads(1)
    gen, edit = LocalPipeline(load_preset("lightray-shapes")), LocalPipeline(load_preset(EDIT_MODEL))
    for pipeline, is_edit in ((gen, False), (edit, True)):  # warm each engine's kernels at every row count
        for rows in (1, 4, 8):
            step_ms(pipeline, rows, edit=is_edit, steps=2)
    out = []
    for rows in (1, 4, 8):
        t2i, e = step_ms(gen, rows, edit=False), step_ms(edit, rows, edit=True)
        out.append({"rows": rows, "text_to_image_ms": round(t2i, 1), "edit_ms": round(e, 1),
                    "edit_over_text_to_image": round(e / t2i, 2)})
    return out


def post_generation(client: httpx.Client, url: str, seed: int) -> None:
    r = client.post(f"{url}/v1/images/generations", json={"prompt": "a red circle on the left, white background",
                                                          "model": GEN_MODEL, "seed": seed}, timeout=300)
    r.raise_for_status()


def post_edit(client: httpx.Client, url: str, seed: int, image: str) -> None:
    r = client.post(f"{url}/v1/images/edits", json={"model": EDIT_MODEL, "prompt": "make the circle blue",
                                                    "image": image, "seed": seed, "num_inference_steps": 4,
                                                    "true_cfg_scale": 1.0}, timeout=300)
    r.raise_for_status()


def mixed_load(url: str, n: int = 8) -> dict:
    image = png_b64(render(SOURCE, 128))
    with httpx.Client() as client:
        post_generation(client, url, 0)
        post_edit(client, url, 0, image)  # warm both graphs
        jobs = [("gen", i) for i in range(n)] + [("edit", i) for i in range(n)]

        def run(job) -> None:
            kind, i = job
            (post_generation(client, url, i) if kind == "gen" else post_edit(client, url, i, image))

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(2 * n) as pool:
            list(pool.map(run, jobs))
        together = time.perf_counter() - t0
        t0 = time.perf_counter()
        for kind in ("gen", "edit"):
            with cf.ThreadPoolExecutor(n) as pool:
                list(pool.map(run, [j for j in jobs if j[0] == kind]))
        apart = time.perf_counter() - t0
    return {"images": 2 * n, "together_img_s": round(2 * n / together, 2), "apart_img_s": round(2 * n / apart, 2),
            "together_over_apart": round(apart / together, 2)}


def lightning_speedup(url: str, n: int) -> dict:
    """p50 of one 128² edit at a time, over HTTP, with each variant the edit model serves at its own settings:
    Lightning 4 (4 steps, no CFG) against the base (its preset's steps, true CFG). Interleaved, so drift hits both."""
    image = png_b64(render(SOURCE, 128))
    models = {"lightning-4": LIGHTNING_EDIT_MODEL, "base": EDIT_MODEL}
    times: dict[str, list[float]] = {k: [] for k in models}
    with httpx.Client(timeout=300) as client:
        for i in range(n + 1):
            for kind, model in models.items():
                t0 = time.perf_counter()
                client.post(f"{url}/v1/images/edits", json={"model": model, "prompt": "make the circle blue",
                                                            "image": image, "seed": i}).raise_for_status()
                if i:  # the first round warms both
                    times[kind].append((time.perf_counter() - t0) * 1000)
    p50 = {k: round(statistics.median(v), 1) for k, v in times.items()}
    return {"requests": n, "p50_ms": p50, "base_over_lightning": round(p50["base"] / p50["lightning-4"], 2)}


def service_url(cluster: RayCluster, args: dict) -> str:
    """configs/serve/local.yaml deployed with `args` (`extra_presets: []`: without the edit model's graph)."""
    cluster.deploy(cluster.serve_config(REPO / "configs/serve/local.yaml", args))
    return cluster.http_url


def mini_real_latency(requests: int) -> dict:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    from lightray.models.qwen_image_edit.conditioning import text_pipeline
    from mini_real import MODELTC_LIGHTNING_SCHEDULER, build_mini_real_edit, write_lightning_lora

    tmp = Path(tempfile.mkdtemp(prefix="mini-edit-"))
    root = build_mini_real_edit(tmp / "Qwen-Image-Edit-2511")
    lora = tmp / "lightning.safetensors"
    write_lightning_lora(lora, seed=5)
    raw = yaml.safe_load((REPO / "configs/models/qwen-image-edit-2511-lightning.yaml").read_text())
    # The pipeline's own areas scaled as the output is (256² instead of 1024²): the VL encoder at 96², the VAE at
    # the output's 256².
    raw.update(path=str(root), device="cpu", prompt_template_encode_start_idx=None,
               edit={"condition_image_area": 96 * 96, "vae_image_area": 256 * 256}, default_size=[256, 256])
    raw["variants"][0]["lightning_lora"] = str(lora)
    source = render(SOURCE, 256)
    body = {"prompt": "make the circle blue", "image": png_b64(source), "seed": 1, "size": "256x256"}
    cluster = RayCluster().start()
    try:
        url = service_url(cluster, {"preset": raw, "extra_presets": [], "auth_enabled": False})
        times = []
        with httpx.Client() as client:
            for i in range(requests + 1):
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/images/edits", json={**body, "seed": i}, timeout=300)
                r.raise_for_status()
                times.append((time.perf_counter() - t0) * 1000)
        served = statistics.median(times[1:])
    finally:
        cluster.stop()
    torch.set_num_threads(1)
    text = text_pipeline(root, torch.bfloat16)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(MODELTC_LIGHTNING_SCHEDULER),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae", torch_dtype=torch.bfloat16),
        text_encoder=text.text_encoder, tokenizer=text.tokenizer, processor=text.processor,
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.bfloat16))
    pipe.prompt_template_encode_start_idx = text.prompt_template_encode_start_idx
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="lightning")
    pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE = 96 * 96
    pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE = 256 * 256
    direct = median_ms(lambda: pipe(image=[source], prompt="make the circle blue", height=256, width=256,
                                    num_inference_steps=4, true_cfg_scale=1.0,
                                    generator=torch.Generator().manual_seed(1)), requests)
    return {"size": "256x256", "steps": 4, "served_http_p50_ms": round(served, 1),
            "diffusers_in_process_p50_ms": round(direct, 1), "served_over_diffusers": round(served / direct, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=9)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-mini", action="store_true")
    args = parser.parse_args()
    out = REPO / "benchmarks/results/edit.json"
    # Parts skipped this run keep their last figures.
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    results["engine_step_128"] = engine_rows()
    print("engine step at 128² (ms, median, one thread)\n| rows | text-to-image | edit | edit / t2i |\n|---|---|---|---|")
    for r in results["engine_step_128"]:
        print(f"| {r['rows']} | {r['text_to_image_ms']} | {r['edit_ms']} | {r['edit_over_text_to_image']} |")
    if not args.skip_http:
        cluster = RayCluster().start()
        try:
            url = service_url(cluster, {})
            results["mixed_load_http"] = mixed_load(url)
            results["edit_lightning_speedup_http_128"] = lightning_speedup(url, args.requests)
        finally:
            cluster.stop()
        m = results["mixed_load_http"]
        print(f"\nmixed load over HTTP, {m['images']} images: together {m['together_img_s']} img/s, apart "
              f"{m['apart_img_s']} img/s ({m['together_over_apart']}x)")
        m = results["edit_lightning_speedup_http_128"]
        print(f"edit at 128² over HTTP, p50: base {m['p50_ms']['base']} ms, Lightning 4 {m['p50_ms']['lightning-4']} ms "
              f"({m['base_over_lightning']}x faster)")
    if not args.skip_mini:
        results["mini_real_edit_256"] = m = mini_real_latency(args.requests)
        print(f"\nmini real Edit-2511 at 256², Lightning 4: served over HTTP p50 {m['served_http_p50_ms']} ms, "
              f"diffusers in process {m['diffusers_in_process_p50_ms']} ms ({m['served_over_diffusers']}x)")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
