"""Qwen-Image-2.1's prefix KV cache measured: what a denoising step saves by reading the prompt's and condition
images' keys and values from the request's cache (steps 2..N) instead of computing the whole sequence again. Ratios
side by side in one run; run it on an idle machine.

    python benchmarks/bench_prefix_cache.py [--repeats 15] [--request-repeats 5] [--sizes 128 256]
                                            [--images 0 1 2] [--rows 1 4] [--widths mini wide]

On the mini real-layout 2.1 Turbo (tests/mini_real.py, `build_mini_real_21`, bfloat16) built into a temp dir, in
process, torch on one thread (a replica's): the fixture's toy (`mini`: 2 layers of 2 heads of 32), and a wider,
deeper one (`wide`: 4 layers of 8 heads of 128, the real head width and RoPE axes) whose matmuls weigh more against
the per-call overhead, as the real 7B's (32 layers of 32 heads of 128) do. The inputs are the service's: the
request resolved by the API schema, the TextEncodeStage's Qwen3-VL embeddings of the prompt with its pictures, the
VaeStage's condition latents (each picture at the output's area, so one condition image has as many tokens as the
output), submitted to the `DenoiseEngine`. Per case, three transformer forwards through the engine's own
`prefix_cache.prefix_forward`, interleaved (rotating order) so the machine's noise hits each alike:

* cached: the noise tokens alone against the request's cache (`kv_cache_mode="cached"`), as steps 2..N run;
* extract: the whole sequence, storing the prefix's keys and values (step 1);
* no cache: the whole sequence with `kv_cache=None`: what a server without the cache pays at every step.

Also per case: the cache's bytes per request (`PrefixCache.nbytes`), and one whole Turbo request (its 8 steps through
`DenoiseEngine.step`: step 1 builds the cache, steps 2-8 read it) against the same request with its cache dropped
after every step (every step extracts again). Everything is timed twice: wall clock, and this thread's CPU time (one
torch thread computes in the calling thread), which on a shared machine is the work alone where the wall time also
counts the waits for a core. Prints a markdown table (CPU time), writes both to benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the mini real layout (tests/mini_real.py)

from lightray.engine import prefix_cache  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.schemas import ImageGenerationRequest  # noqa: E402
from lightray.world.shapes import Scene, render  # noqa: E402
from mini_real import build_mini_real_21, mini_21_preset  # noqa: E402

MODEL = "qwen-image-2.1-turbo"
PROMPT = ("make the circle on the left a deep blue, keep the white background and the soft shadow under it, and add "
          "a thin black outline to every shape in the picture")
"""An instruction of a usual length (the mini tokenizer splits it about as a real one would: about 40 tokens)."""
PICTURES = (Scene("red", "circle", "left", "white"), Scene("green", "triangle", "center", "black"))
WIDTHS = {
    "mini": {},
    "wide": {"num_layers": 4, "num_attention_heads": 8, "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56]},
}
"""Transformer config values over the fixture's (`MINI_21_TRANSFORMER`: 2 layers, 2 heads of 32)."""
MODES = ("cached", "extract", "no cache")
TRANSFORMER_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio")
CLOCKS = ("cpu", "wall")


class WithoutCache:
    """The transformer as a server without the prefix cache calls it: the whole sequence, nothing stored. Every
    other input is what `prefix_forward` builds."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.transformer_blocks = transformer.transformer_blocks

    def __call__(self, **inputs):
        return self.transformer(**{**inputs, "kv_cache": None, "kv_cache_mode": None})


def submit(pipeline: LocalPipeline, size: int, images: int, rows: int, seed: int = 0):
    """A Turbo request of `rows` images at size², with `images` condition pictures, encoded by the stages and
    submitted to the pipeline's engine (not yet stepped)."""
    spec = ImageGenerationRequest.model_validate({"prompt": PROMPT, "model": MODEL, "n": rows, "seed": seed,
                                                  "size": f"{size}x{size}"}).resolve(pipeline.preset, 0)
    pictures = [render(scene, (96, 64)) for scene in PICTURES[:images]]
    if pictures:
        text = pipeline.text.encode_instruction(spec.prompts(), pictures, size, size)
        condition = pipeline.vae.encode_conditions(pictures, size, size)
    else:
        text, condition = pipeline.encode(spec), None
    return pipeline.denoiser.submit(spec.denoise_params(), text, condition=condition)


def timed(fn: Callable[[], object]) -> dict[str, float]:
    """Milliseconds of `fn()`: wall, and this thread's CPU time. With one torch thread the forward computes in the
    calling thread, so on a shared machine (other jobs taking the cores) the CPU time is the work alone, while the
    wall time also counts the waits for a core."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return {"wall": (time.perf_counter() - wall) * 1000, "cpu": (time.thread_time() - cpu) * 1000}


def summary(times: dict[str, list[dict[str, float]]], over: str) -> dict:
    """Per clock: each setting's median, and each setting's ratio to `over` (per repeat, then the median: the
    ratio of runs made back to back)."""
    return {clock: {"median_ms": {k: round(statistics.median(t[clock] for t in v), 2) for k, v in times.items()},
                    f"over_{over.replace(' ', '_')}": {
                        k: round(statistics.median(a[clock] / b[clock] for a, b in zip(v, times[over])), 3)
                        for k, v in times.items() if k != over}}
            for clock in CLOCKS}


def forward(engine, request, mode: str) -> dict[str, float]:
    """One transformer forward of the request's conditional rows in `mode` (its cache already built)."""
    entries = prefix_cache.branches_of(request)
    built = request.prefix_cache.branches
    if mode != "cached":  # an empty cache: the whole sequence
        request.prefix_cache.branches = {}
    transformer = WithoutCache(engine.transformer) if mode == "no cache" else engine.transformer
    try:
        return timed(lambda: prefix_cache.prefix_forward(transformer, engine.routing, engine.family, entries,
                                                         engine.device))
    finally:
        request.prefix_cache.branches = built


def step_times(pipeline: LocalPipeline, size: int, images: int, rows: int, repeats: int) -> dict:
    engine = pipeline.denoiser
    request = submit(pipeline, size, images, rows)
    engine._admit()  # live, with its adapter stack: what `step` does before a forward
    _, cache = prefix_cache.prefix_forward(engine.transformer, engine.routing, engine.family,
                                           prefix_cache.branches_of(request), engine.device)
    request.prefix_cache.branches["cond"] = cache
    for mode in MODES:  # warm-up
        forward(engine, request, mode)
    times: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for i in range(repeats):
        for mode in MODES[i % 3:] + MODES[: i % 3]:  # each mode first, second and third as often
            times[mode].append(forward(engine, request, mode))
    result = {"size": size, "images": images, "rows": rows, "noise_tokens": request.image_tokens,
              "prefix_tokens": request.prefix_tokens, "cache_bytes": request.prefix_cache.nbytes,
              "step": summary(times, "no cache")}
    request.cancel()
    engine.step()  # takes the cancelled request out and frees its cache
    return result


def whole_request(pipeline: LocalPipeline, size: int, images: int, rows: int, keep_cache: bool) -> dict[str, float]:
    """One whole Turbo request through `DenoiseEngine.step` (the stages' encoding not counted); without
    `keep_cache` its cache is dropped after every step, so each step extracts again."""
    engine = pipeline.denoiser
    request = submit(pipeline, size, images, rows)

    def run() -> None:
        while not request.done():
            engine.step()
            if not keep_cache:
                request.prefix_cache.free()

    elapsed = timed(run)
    request.result()
    return elapsed


def request_times(pipeline: LocalPipeline, size: int, images: int, rows: int, repeats: int) -> dict:
    whole_request(pipeline, size, images, rows, True)  # warm-up
    times: dict[str, list[dict[str, float]]] = {"with cache": [], "without": []}
    for i in range(repeats):
        for setting in ("with cache", "without") if i % 2 == 0 else ("without", "with cache"):
            times[setting].append(whole_request(pipeline, size, images, rows, setting == "with cache"))
    return summary(times, "without")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="forwards per mode and case")
    parser.add_argument("--request-repeats", type=int, default=5, help="whole requests per setting and case (0: none)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--widths", choices=sorted(WIDTHS), nargs="+", default=["mini", "wide"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Serve replica runs 1)")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/prefix_cache.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict = {"model": MODEL, "dtype": "bfloat16", "threads": args.threads, "repeats": args.repeats,
                     "request_repeats": args.request_repeats, "prompt": PROMPT, "widths": {}}
    for width in args.widths:
        root = build_mini_real_21(Path(tempfile.mkdtemp(prefix="bench-prefix-")) / "Qwen-Image-2.1-Turbo",
                                  turbo=True, transformer=WIDTHS[width])
        pipeline = LocalPipeline(mini_21_preset(root, "qwen-image-2.1-turbo.yaml"))
        config = pipeline.denoiser.transformer.config
        cases = []
        for size, images, rows in itertools.product(args.sizes, args.images, args.rows):
            case = step_times(pipeline, size, images, rows, args.repeats)
            if args.request_repeats:
                case["request"] = request_times(pipeline, size, images, rows, args.request_repeats)
            cases.append(case)
            print(f"measured {width}: {size}² with {images} image(s), {rows} row(s)", file=sys.stderr)
        results["widths"][width] = {"transformer": {k: config[k] for k in TRANSFORMER_KEYS}, "cases": cases}

    print("CPU time of this thread (wall time in the JSON), medians; ratios: median of back-to-back pairs\n\n"
          "| toy | size | images | rows | prefix / noise tokens | cached step | no cache | extract | "
          "cached / no cache | cache per request | 8-step request, cache / none |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for width, measured in results["widths"].items():
        for c in measured["cases"]:
            step, request = c["step"]["cpu"], c.get("request", {}).get("cpu")
            whole = (f"{request['median_ms']['with cache']:.0f} / {request['median_ms']['without']:.0f} ms "
                     f"({request['over_without']['with cache']:.2f})" if request else "-")
            print(f"| {width} | {c['size']}² | {c['images']} | {c['rows']} | {c['prefix_tokens']} / "
                  f"{c['noise_tokens']} | {step['median_ms']['cached']:.1f} ms | {step['median_ms']['no cache']:.1f} ms"
                  f" | {step['median_ms']['extract']:.1f} ms | {step['over_no_cache']['cached']:.2f} | "
                  f"{c['cache_bytes'] / 1024:.0f} KiB | {whole} |")
    toys = "; ".join(f"{width}: {t['num_layers']} layers, {t['num_attention_heads']} heads of "
                     f"{t['attention_head_dim']}" for width, t in
                     ((w, m["transformer"]) for w, m in results["widths"].items()))
    print(f"\nMini 2.1 Turbo ({toys}), bfloat16, torch {args.threads} thread(s), medians of {args.repeats} "
          f"interleaved forwards per mode and {args.request_repeats} interleaved requests per setting.")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
