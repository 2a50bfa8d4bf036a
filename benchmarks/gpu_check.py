"""The GPU check (issue 33): one command that measures, through the engine and the stages, everything a GPU node
has to prove, with random weights in the published shapes (nothing is downloaded).

    python benchmarks/gpu_check.py --out docs/gpu/          # on an H100 / H200: the full-size models, 1024²
    python benchmarks/gpu_check.py --tiny --out /tmp/check  # the same code on a CPU, scaled-down configs

It builds the Qwen-Image transformer (configs/qwen-image/transformer/config.json: 60 blocks, 20.4 B parameters),
the Edit-2511 one (the same config with `zero_cond_t`), the VAE and the Qwen2.5-VL text encoder from their published
configs, with random bfloat16 weights, and a Lightning-shaped LoRA (rank 64 on every linear of every block, the
published key layout). `--tiny` shrinks depth and widths (tests/mini_real.py's mini real layout) and the size.

Measured, in this order (each stage's models are freed before the next is built, so the peaks are per stage):

1. the text encoder: one forward of one 512-token prompt; s and peak memory.
2. the VAE decode of one image: the single-frame VAE against diffusers' own (`vae_exact`); s, peak memory, and
   their largest pixel difference.
3. the transformer through the `DenoiseEngine` (unfused: the Lightning LoRA applied per row): s/step at 1, 2 and
   4 rows with CFG off (Lightning 4), 2 and 4 rows with CFG on (the base variant, one and two images); the peak;
   batch variance (one request alone and the same request in a mixed batch, largest and mean latent difference).
4. the same transformer fused (`fuse:`): s/step at 1, 2 and 4 rows; fused against unfused, latents and pixels,
   in bfloat16 and (on a 2-block float32 twin at full width) in float32.
5. the fused transformer compiled (`compile: true`): compile time and s/step at 1, 2, 4 rows; compiled
   against eager latents.
6. the Edit-2511 transformer: s/step of one edit row with one input image at the same size.
7. the estimate of a 4-step and an 8-step Lightning image end to end (text encoder + steps x the fastest 1-row
   step + VAE decode), and every stage's peak against docs/capacity.md's budget (`planning.capacity.budgets`).

The JSON (`gpu_check.json`) is written after every measurement, so a run cut short leaves what it measured; the
markdown table (`gpu_check.md`) with it. Progress goes to stdout.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()
"""The run's start, before the heavy imports (the tiny check's 5-minute bound counts them)."""

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the mini real layout's shrunk widths and published constants

import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightray.config import EngineConfig, load_preset  # noqa: E402
from lightray.contracts import ConditionLatents, DenoiseParams, TextEmbeddings  # noqa: E402
from lightray.engine.engine import DenoiseEngine  # noqa: E402
from lightray.meta_models import GIB, PeakLiveBytes  # noqa: E402
from mini_real import (  # noqa: E402
    LIGHTNING_TARGETS,
    MINI_TRANSFORMER,
    MINI_VAE_BASE_DIM,
    QWEN_IMAGE_MODEL_INDEX,
    QWEN_IMAGE_SCHEDULER_CONFIG,
)

LIGHTNING_RANK = 64
"""The published Lightning LoRAs' rank."""
TEXT_TOKENS = 512
"""Tokens of the text encoder's forward (the preset's `max_sequence_length`)."""
PROMPT_TOKENS = 64
"""Prompt embeddings each denoise request carries (a typical prompt's, after the template prefix)."""
STEP_REPEATS = 2
"""4-step requests timed per case (8 steps for the median)."""
FP32_TWIN_LAYERS = 2
"""Blocks of the float32 twin the fused-against-unfused float32 figure is measured on (a full-size float32
transformer, 82 GB, fits no single GPU)."""
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128}
"""What shrinks in the Qwen2.5-VL text config with --tiny (the mini real layout's text encoder widths)."""
TINY_VISION = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64}


class Check:
    """The run's results, written to JSON and markdown after every measurement."""

    def __init__(self, out: Path, tiny: bool, device: torch.device, size: int):
        self.out, self.started = out, PROCESS_START
        out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {
            "tiny": tiny, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "size": size, "dtype": "bfloat16",
            "lightning_rank": LIGHTNING_RANK, "measurements": {}, "complete": False,
        }

    def record(self, name: str, value) -> None:
        self.results["measurements"][name] = value
        self.results["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.save()
        print(f"[{self.results['elapsed_s']:7.1f} s] {name}: {json.dumps(value, default=float)}", flush=True)

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=float) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.results))


def markdown(results: dict) -> str:
    """The table the README shows: one line per measured figure."""
    m = results["measurements"]
    lines = [f"GPU check on {results['device']} (torch {results['torch']}, {'tiny' if results['tiny'] else 'full'}"
             f" models, {results['size']}², bfloat16, {results.get('elapsed_s', 0):.0f} s)", "",
             "| measurement | value |", "| --- | --- |"]

    def row(label, value):
        lines.append(f"| {label} | {value} |")

    def ms(s):
        return f"{s * 1000:.1f} ms"

    if "text_encoder" in m:
        t = m["text_encoder"]
        row(f"text encoder, one {t['tokens']}-token forward", f"{ms(t['s'])}, peak {t['peak_gib']:.3g} GiB")
    if "vae_decode" in m:
        v = m["vae_decode"]
        row("VAE decode, single-frame", f"{ms(v['single_frame_s'])}, peak {v['single_frame_peak_gib']:.3g} GiB")
        row("VAE decode, diffusers (`vae_exact`)", f"{ms(v['diffusers_s'])}, peak {v['diffusers_peak_gib']:.3g} GiB")
        row("VAE single-frame vs diffusers, pixels", f"max {v['max_pixel_diff']}, mean {v['mean_pixel_diff']:.3f}")
    for key, label in (("unfused_steps", "unfused"), ("fused_steps", "fused"), ("compiled_steps", "fused, compiled")):
        for case in m.get(key, {}).get("cases", []):
            row(f"s/step, {label}, CFG {'on' if case['cfg'] else 'off'}, rows: {case['rows']}", f"{case['step_s']:.4f}")
    if "unfused_steps" in m:
        row("transformer peak (unfused, 4 rows)", f"{m['unfused_steps']['peak_gib']:.3g} GiB")
    if "batch_variance" in m:
        b = m["batch_variance"]
        row("batch variance: alone vs mixed batch, latents", f"max {b['max']:.3g}, mean {b['mean']:.3g}")
    for key in ("fuse_numerics_bf16", "fuse_numerics_fp32"):
        if key in m:
            f = m[key]
            row(f"fused vs unfused, {f['dtype']}, latents", f"max {f['max_latent']:.3g}, mean {f['mean_latent']:.3g}")
            row(f"fused vs unfused, {f['dtype']}, pixels", f"max {f['max_pixel']}, mean {f['mean_pixel']:.3f}")
    if "compiled_steps" in m:
        c = m["compiled_steps"]
        row("compile at start (warm-up included)", f"{c['compile_s']:.1f} s")
        row("compiled vs eager (fused), latents", f"max {c['max_latent_vs_eager']:.3g}")
    if "edit_2511_step" in m:
        e = m["edit_2511_step"]
        row("Edit-2511, 1 row + 1 input image, s/step", f"{e['step_s']:.4f}")
    if "estimate" in m:
        for steps, s in m["estimate"]["end_to_end_s"].items():
            row(f"estimate: {steps}-step Lightning image end to end", f"{s:.3f} s")
    if "budgets" in m:
        for stage, b in m["budgets"].items():
            row(f"peak vs budget, {stage}", f"{b['peak_gib']:.3g} of {b['budget_gib']:.2f} GiB "
                                            f"({'within' if b['within'] else 'OVER'})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ building


def published_configs(tiny: bool) -> dict[str, dict]:
    """The transformer, VAE and text-encoder configs from configs/qwen-image/, shrunk with --tiny."""
    folder = REPO / "configs/qwen-image"
    configs = {name: json.loads((folder / name / "config.json").read_text())
               for name in ("transformer", "vae", "text_encoder")}
    if tiny:
        configs["transformer"].update(MINI_TRANSFORMER)
        configs["vae"]["base_dim"] = MINI_VAE_BASE_DIM
    return configs


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0, layers: int | None = None):
    """The transformer of `config` with random weights, built directly in `dtype` on `device` (a full-size one in
    float32 would need 82 GB before the cast)."""
    import diffusers

    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "pooled_projection_dim"}
    if layers is not None:
        config["num_layers"] = layers
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = diffusers.QwenImageTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def write_lightning_lora(transformer, path: Path, seed: int) -> None:
    """A random LoRA in the published Lightning layout (`lora_down`, `lora_up`, `alpha`) on every linear the
    Lightning files adapt, with the shapes of `transformer`; deltas about a fifth of a weight's scale."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, block in enumerate(transformer.transformer_blocks):
        for target in LIGHTNING_TARGETS:
            linear = block.get_submodule(target)
            key = f"transformer_blocks.{i}.{target}"
            state[f"{key}.lora_down.weight"] = (torch.randn(LIGHTNING_RANK, linear.in_features, generator=gen)
                                                / math.sqrt(linear.in_features)).to(torch.bfloat16)
            state[f"{key}.lora_up.weight"] = (torch.randn(linear.out_features, LIGHTNING_RANK, generator=gen)
                                              * 0.2 / math.sqrt(LIGHTNING_RANK)).to(torch.bfloat16)
            state[f"{key}.alpha"] = torch.tensor(float(LIGHTNING_RANK), dtype=torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def write_folder(root: Path, configs: dict, seed: int = 0) -> None:
    """A diffusers folder with the model index, Qwen-Image's scheduler, the configs, and a random bf16 VAE (the
    transformer is built in memory, `DenoiseEngine(transformer=...)`)."""
    from diffusers import AutoencoderKLQwenImage

    for name, content in (("model_index.json", QWEN_IMAGE_MODEL_INDEX),
                          ("scheduler/scheduler_config.json", QWEN_IMAGE_SCHEDULER_CONFIG),
                          ("transformer/config.json", configs["transformer"])):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content, indent=2))
    torch.manual_seed(seed)
    vae_config = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    AutoencoderKLQwenImage(**vae_config).to(torch.bfloat16).save_pretrained(root / "vae")


def preset_dict(file: str, root: Path, lora: Path, device: torch.device, size: int, **update) -> dict:
    """A preset of configs/models unchanged but for paths, device and sizes (the tiny size is below the real
    presets' `min_side`)."""
    raw = yaml.safe_load((REPO / "configs/models" / file).read_text())
    raw.update(path=str(root), device=device.type, default_size=[size, size], min_side=min(size, raw["min_side"]))
    for variant in raw["variants"]:
        if variant.get("lightning_lora"):
            variant["lightning_lora"] = str(lora)
    return {**raw, **update}


# --------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device: torch.device, *resident):
    """The peak bytes of the block: on CUDA every allocated byte (`max_memory_allocated`, the resident weights
    included); elsewhere the bytes of `resident` modules plus the peak of the tensors the block creates
    (`PeakLiveBytes`, the meta-device models' own measure)."""
    box = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        box["bytes"] = torch.cuda.max_memory_allocated(device)
        return
    weights = sum(t.numel() * t.element_size() for m in resident for t in [*m.parameters(), *m.buffers()])
    with PeakLiveBytes(*resident) as tracked:
        yield box
    box["bytes"] = weights + tracked.peak


def timed(device: torch.device, fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls of `fn` after one warm-up call, and the last call's result."""
    out = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def text_encoder_check(check: Check, configs: dict, device: torch.device, tiny: bool, repeats: int) -> None:
    import transformers

    raw = dict(configs["text_encoder"])
    config = transformers.AutoConfig.for_model(**raw)
    if tiny:
        for key, value in TINY_TEXT.items():
            setattr(config.text_config, key, value)
        head_dim = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
        config.text_config.rope_parameters = {**config.text_config.rope_parameters,
                                              "mrope_section": [head_dim // 8, 3 * head_dim // 16,
                                                                3 * head_dim // 16]}
        for key, value in TINY_VISION.items():
            setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config).eval()
    finally:
        torch.set_default_dtype(before)
    ids = torch.randint(0, config.text_config.vocab_size, (1, TEXT_TOKENS), device=device)
    mask = torch.ones_like(ids)

    def forward():
        # As QwenImagePipeline's encode_prompt asks: every layer's hidden states, the last one kept.
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    forward()
    with peak_memory(device, model) as peak:
        forward()
    seconds, _ = timed(device, forward, repeats)
    check.record("text_encoder", {"tokens": TEXT_TOKENS, "s": seconds, "peak_gib": peak["bytes"] / GIB,
                                  "parameters": sum(p.numel() for p in model.parameters())})
    del model
    free(device)


def decode_pixels(vae_stage, latents: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(im) for im in vae_stage.decode(latents, size, size)]).astype(np.int16)


def vae_check(check: Check, preset: dict, device: torch.device, size: int, repeats: int):
    from lightray.stages import VaeStage

    fast, exact = VaeStage(load_preset(preset)), VaeStage(load_preset({**preset, "vae_exact": True}))
    tokens = (size // 16) ** 2
    latents = np.random.RandomState(0).randn(1, tokens, 64).astype(np.float32)
    result = {}
    for name, stage in (("single_frame", fast), ("diffusers", exact)):
        stage.decode(latents, size, size)
        with peak_memory(device, stage.vae) as peak:
            pixels = decode_pixels(stage, latents, size)
        seconds, _ = timed(device, lambda: stage.decode(latents, size, size), repeats)
        result[f"{name}_s"], result[f"{name}_peak_gib"] = seconds, peak["bytes"] / GIB
        result[f"{name}_pixels"] = pixels
    diff = np.abs(result.pop("single_frame_pixels") - result.pop("diffusers_pixels"))
    result.update(max_pixel_diff=int(diff.max()), mean_pixel_diff=float(diff.mean()))
    check.record("vae_decode", result)
    del exact
    free(device)
    return fast


def step_times(engine: DenoiseEngine, device: torch.device, text: TextEmbeddings, specs: list[dict],
               condition: ConditionLatents | None = None) -> tuple[list[float], list[np.ndarray]]:
    """Submit `specs` (DenoiseParams fields) together and drive the engine: every step's seconds and each
    request's latents."""
    requests = [engine.submit(DenoiseParams(**spec), text, condition=condition) for spec in specs]
    times = []
    while not all(r.done() for r in requests):
        synchronize(device)
        start = time.perf_counter()
        engine.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, [r.result() for r in requests]


def lightning_spec(size: int, rows: int, seed: int = 0, steps: int = 4, variant: str | None = None) -> dict:
    return dict(seeds=tuple(range(seed, seed + rows)), width=size, height=size, num_inference_steps=steps,
                variant=variant)


def row_cases(engine: DenoiseEngine, device: torch.device, text: TextEmbeddings, size: int, lightning: str,
              base: str | None) -> list[dict]:
    """s/step (the median over `STEP_REPEATS` 4-step requests' steps, after one warm-up request per shape) by
    rows, CFG off (Lightning) and, when `base` is given, CFG on (the base variant's true CFG: two rows an image)."""
    cases = [(False, rows, lightning_spec(size, rows, variant=lightning)) for rows in (1, 2, 4)]
    if base is not None:
        cases += [(True, 2 * n, {**lightning_spec(size, n, variant=base), "true_cfg_scale": 4.0}) for n in (1, 2)]
    out = []
    for cfg, rows, spec in cases:
        step_times(engine, device, text, [{**spec, "num_inference_steps": 2}])  # warm-up at this shape
        times = [t for _ in range(STEP_REPEATS) for t in step_times(engine, device, text, [spec])[0]]
        out.append({"cfg": cfg, "rows": rows, "step_s": statistics.median(times)})
        print(f"    CFG {'on ' if cfg else 'off'} {rows} rows: {out[-1]['step_s']:.4f} s/step", flush=True)
    return out


def text_embeddings(width: int, seed: int, tokens: int = PROMPT_TOKENS) -> TextEmbeddings:
    rng = np.random.RandomState(seed)
    return TextEmbeddings(prompt=rng.randn(tokens, width).astype(np.float32),
                          negative=rng.randn(4, width).astype(np.float32))


def diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()), float(d.mean())


def fuse_numerics(check: Check, name: str, dtype: str, unfused: np.ndarray, fused: np.ndarray, vae, size: int):
    max_latent, mean_latent = diff_stats(unfused, fused)
    max_pixel, mean_pixel = diff_stats(decode_pixels(vae, unfused, size), decode_pixels(vae, fused, size))
    check.record(name, {"dtype": dtype, "max_latent": max_latent, "mean_latent": mean_latent,
                        "max_pixel": int(max_pixel), "mean_pixel": mean_pixel})


def fp32_fuse_check(check: Check, configs: dict, root: Path, lora: Path, device: torch.device, size: int, vae):
    """Fused against unfused in float32 on a `FP32_TWIN_LAYERS`-block twin at full width (the LoRA file's first
    blocks)."""
    results = []
    twin_lora = lora.with_name("lightning-rank64-twin.safetensors")
    for fuse in (None, "qwen-image-2512-lightning-4"):
        transformer = build_transformer(configs["transformer"], device, torch.float32, layers=FP32_TWIN_LAYERS)
        if fuse is None:  # the same seed gives the full file's first blocks
            write_lightning_lora(transformer, twin_lora, seed=4)
        preset = preset_dict("qwen-image-2512-lightning.yaml", root, twin_lora, device, size, dtype="float32",
                             fuse=fuse)
        engine = DenoiseEngine(preset, transformer=transformer)
        text = text_embeddings(engine.text_width, seed=1)
        _, (latents,) = step_times(engine, device, text, [lightning_spec(size, 1, variant="qwen-image-2512-lightning-4")])
        results.append(latents)
        del engine, transformer
        free(device)
    fuse_numerics(check, "fuse_numerics_fp32", "float32", *results, vae, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs/gpu")
    parser.add_argument("--tiny", action="store_true", help="scaled-down configs and size, for a CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--size", type=int, default=None, help="image side (default 1024, --tiny 128)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the random VAE and LoRA (default: temp)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or (128 if args.tiny else 1024)
    repeats = 3
    check = Check(args.out, args.tiny, device, size)
    print(f"GPU check: {check.results['device']}, {'tiny' if args.tiny else 'full-size'} models, {size}²", flush=True)
    configs = published_configs(args.tiny)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        root, lora = work / "Qwen-Image", work / "lightning-rank64.safetensors"
        write_folder(root, configs)
        file = "qwen-image-2512-lightning.yaml"
        lightning, base = "qwen-image-2512-lightning-4", "qwen-image-2512"
        preset = preset_dict(file, root, lora, device, size)

        print("1. text encoder", flush=True)
        text_encoder_check(check, configs, device, args.tiny, repeats)
        print("2. VAE decode", flush=True)
        vae = vae_check(check, preset, device, size, repeats)

        print("3. transformer, unfused", flush=True)
        transformer = build_transformer(configs["transformer"], device, torch.bfloat16)
        write_lightning_lora(transformer, lora, seed=4)
        engine = DenoiseEngine(preset, transformer=transformer)
        text = text_embeddings(engine.text_width, seed=1)
        probe = lightning_spec(size, 1, seed=7, variant=lightning)
        cases = row_cases(engine, device, text, size, lightning, base)
        with peak_memory(device, transformer) as peak:
            step_times(engine, device, text, [lightning_spec(size, 4, variant=lightning)])
        check.record("unfused_steps", {"cases": cases, "peak_gib": peak["bytes"] / GIB})
        _, (alone,) = step_times(engine, device, text, [probe])
        other = text_embeddings(engine.text_width, seed=2, tokens=PROMPT_TOKENS // 2)  # padded, masked rows
        mixed = [engine.submit(DenoiseParams(**probe), text),
                 engine.submit(DenoiseParams(**{**lightning_spec(size, 2, seed=3, variant=base),
                                                "true_cfg_scale": 4.0}), other)]
        while not all(r.done() for r in mixed):
            engine.step()
        batch_max, batch_mean = diff_stats(alone, mixed[0].result())
        check.record("batch_variance", {"max": batch_max, "mean": batch_mean, "device": device.type,
                                        "batch": "Lightning 1 image + base with CFG 2 images, other prompt"})
        engine.pipe.unload_lora_weights()  # the base weights back, exactly (the fused engine merges into them)
        del engine, mixed
        free(device)

        print("4. transformer, fused", flush=True)
        fused = DenoiseEngine({**preset, "fuse": lightning}, transformer=transformer)
        cases = row_cases(fused, device, text, size, lightning, None)
        check.record("fused_steps", {"cases": cases})
        _, (fused_latents,) = step_times(fused, device, text, [probe])
        fuse_numerics(check, "fuse_numerics_bf16", "bfloat16", alone, fused_latents, vae, size)
        fp32_fuse_check(check, configs, root, lora, device, size, vae)

        print("5. transformer, fused and compiled", flush=True)
        compile_s = fused.compile_blocks()
        fused.compile_stance = "default"  # row_cases' warm-up per shape compiles what each case needs, as at start
        cases = row_cases(fused, device, text, size, lightning, None)
        _, (compiled_latents,) = step_times(fused, device, text, [probe])
        check.record("compiled_steps", {"cases": cases, "compile_s": compile_s,
                                        "max_latent_vs_eager": diff_stats(fused_latents, compiled_latents)[0]})
        del fused, transformer
        free(device)

        print("6. Edit-2511 transformer", flush=True)
        edit_config = {**configs["transformer"], "zero_cond_t": True}
        edit_transformer = build_transformer(edit_config, device, torch.bfloat16, seed=1)
        edit_preset = preset_dict("qwen-image-edit-2511-lightning.yaml", root, lora, device, size)
        edit = DenoiseEngine(edit_preset, transformer=edit_transformer)
        grid = (size // 16, size // 16)
        condition = ConditionLatents(np.random.RandomState(5).randn(grid[0] * grid[1], 64).astype(np.float32), (grid,))
        spec = lightning_spec(size, 1, variant="qwen-image-edit-2511-lightning-4")
        step_times(edit, device, text, [{**spec, "num_inference_steps": 2}], condition)
        times, _ = step_times(edit, device, text, [spec], condition)
        check.record("edit_2511_step", {"rows": 1, "condition_images": 1, "step_s": statistics.median(times)})
        del edit, edit_transformer
        free(device)

        print("7. estimate and budgets", flush=True)
        m = check.results["measurements"]
        one_row = min(c["step_s"] for key in ("unfused_steps", "fused_steps", "compiled_steps")
                      for c in m[key]["cases"] if c["rows"] == 1 and not c["cfg"])
        check.record("estimate", {
            "one_row_step_s": one_row,
            "end_to_end_s": {steps: m["text_encoder"]["s"] + steps * one_row + m["vae_decode"]["single_frame_s"]
                             for steps in (4, 8)},
            "note": "text encoder + steps x the fastest 1-row step + single-frame VAE decode; no network or queue",
        })
        check.record("budgets", stage_budgets(m))
    check.results["complete"] = True
    check.save()
    print(f"done in {check.results['elapsed_s']:.0f} s: {args.out / 'gpu_check.json'}", flush=True)


def stage_budgets(m: dict) -> dict:
    """Each stage's measured peak against docs/capacity.md's budget for it (H100 80GB: at 1536², 8 rows and 16
    prompts, less the per-process CUDA reserve the measurement does not see)."""
    from planning.capacity import CapacityAssumptions, budgets

    planned = budgets(CapacityAssumptions.load(REPO / "configs/capacity/h100-80gb.yaml"))
    peaks = {"TextEncoder": m["text_encoder"]["peak_gib"], "Denoiser": m["unfused_steps"]["peak_gib"],
             "VaeDecoder": max(m["vae_decode"]["single_frame_peak_gib"], m["vae_decode"]["diffusers_peak_gib"])}
    out = {}
    for stage, peak in peaks.items():
        budget = planned[stage]
        allowed = (budget.total - budget.items["cuda_reserved"]) / GIB
        out[stage] = {"peak_gib": peak, "budget_gib": allowed, "within": peak <= allowed}
    return out


if __name__ == "__main__":
    main()
