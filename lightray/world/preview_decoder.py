"""Distil the embedded model's preview decoder (`lightray.stages.preview.PreviewDecoder`) from its own VAE.

    python -m lightray.world.preview_decoder [--model models/lightray-shapes] [--steps 6000]

Why: a linear latent-to-RGB projection gets this small VAE's layout and brightness but not its hues (its decoder
takes colour from each latent pixel's neighbourhood; docs/streaming.md). The preview decoder sees a 5×5
neighbourhood and is trained to reproduce the VAE's own decode, area-averaged to a quarter of the side, on:

* shapes-world renders of every served size (jittered, some framed) encoded by the VAE: clean latents;
* the x0-predictions after steps 1-3 and the final latents of Lightning-4 and base generations from the model's
  own prompts (English and Chinese): the latents previews are actually made from.

Held out: generations of other seeds and of the world's held-out scenes, scored as PSNR against the full decode
(area-averaged likewise), beside the fitted projection's. A few minutes on 2 cores. Writes
`<model>/vae/preview_decoder.safetensors` and prints the scores (the model card records them).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from lightray.config import load_preset
from lightray.pipeline import LocalPipeline
from lightray.schemas import ImageGenerationRequest
from lightray.stages.preview import (
    PREVIEW_DECODER_FILE,
    PREVIEW_UPSCALE,
    PreviewDecoder,
    fit_to_vae,
    unpack_latents,
    upsample2x,
)
from lightray.world.shapes import HELD_OUT, Scene, render, training_scenes

SHAPE_WEIGHT = 8.0
"""Extra L1 weight on a pixel per unit of its largest channel difference from the image's median (background)."""

Example = tuple[np.ndarray, np.ndarray]
"""(latents [k, 16, h, w], target RGB [k, 3, 2h, 2w] in [0, 1]) of one size."""


def quarter(images: list, scale: int) -> np.ndarray:
    """PIL images → [k, 3, H/scale·2, W/scale·2] in [0, 1], each output pixel the mean of its block."""
    a = np.stack([np.asarray(im, np.float32) / 255.0 for im in images])
    k, height, width, _ = a.shape
    block = scale // PREVIEW_UPSCALE
    a = a.reshape(k, height // block, block, width // block, block, 3).mean((2, 4))
    return a.transpose(0, 3, 1, 2)


def as_example(pipe: LocalPipeline, packed: np.ndarray, height: int, width: int) -> Example:
    """Packed latents → (their latents on the grid, channels first; the VAE's decode of them, quartered)."""
    scale = pipe.vae.scale_factor
    latents = unpack_latents(packed, height, width, scale).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(latents, np.float32), quarter(pipe.vae.decode(packed, height, width), scale)


def render_examples(pipe: LocalPipeline, count: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    scenes = training_scenes()
    out = []
    for width, height in pipe.preset.sizes or [pipe.preset.default_size]:
        images = [render(rng.choice(scenes), (width, height), rng, style="frame" if rng.random() < 0.2 else None)
                  for _ in range(max(1, count // len(pipe.preset.sizes or [0])))]
        pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).unsqueeze(2)
        packed = pipe.vae.encode_pixels(pixels.float() / 127.5 - 1.0)
        out.append(as_example(pipe, packed, height, width))
    return out


def generation_examples(pipe: LocalPipeline, scenes: list[Scene], seeds: range, sizes: list[tuple[int, int]],
                        models: list[str]) -> list[Example]:
    """The x0-predictions after steps 1-3 and the final latents of a generation per (scene, seed, size, model)."""
    out = []
    for i, (scene, seed) in enumerate(zip(scenes, seeds)):
        width, height = sizes[i % len(sizes)]
        previews: list[np.ndarray] = []
        spec = ImageGenerationRequest.model_validate({
            "prompt": scene.caption("zh" if i % 2 else "en", i % 4), "seed": seed, "size": f"{width}x{height}",
            "model": models[i % len(models)], "stream": True, "partial_images": 3}).resolve(pipe.preset, 0)
        latents = pipe.denoiser.denoise(spec.denoise_params(), pipe.encode(spec),
                                        on_progress=lambda p: p.preview is not None and previews.append(p.preview))
        out.append(as_example(pipe, np.concatenate([*previews, latents]), height, width))
    return out


def psnr(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.clip(prediction, 0, 1) - target) ** 2)))


def train(examples: list[Example], steps: int, seed: int, batch: int = 24) -> PreviewDecoder:
    torch.manual_seed(seed)
    decoder = PreviewDecoder(latent_channels=examples[0][0].shape[1])
    optimiser = torch.optim.AdamW(decoder.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    tensors = [(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(y, np.float32))) for x, y in examples]
    weights = np.array([len(x) for x, _ in tensors], float)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        x, y = tensors[rng.choice(len(tensors), p=weights / weights.sum())]
        pick = torch.from_numpy(rng.choice(len(x), size=min(batch, len(x)), replace=False))
        target = y[pick]
        # Weighted towards what differs from the background: shapes are a small share of the pixels, and a
        # preview that gets their colour wrong is what a person notices.
        background = target.flatten(2).median(dim=2).values[:, :, None, None]
        weight = 1.0 + SHAPE_WEIGHT * (target - background).abs().amax(dim=1, keepdim=True)
        loss = (weight * (decoder(x[pick]) - target).abs()).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"  step {step}: L1 {loss.item():.4f}", flush=True)
    return decoder.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lightray-shapes", help="preset name or path (default: the embedded)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--renders", type=int, default=720)
    parser.add_argument("--generations", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    pipe = LocalPipeline(load_preset(args.model))
    preset = pipe.preset
    sizes = preset.sizes or [preset.default_size]
    models = preset.model_ids[:2]  # the default variant and the next (Lightning 4 and 8 for the embedded)
    rng = random.Random(args.seed)
    train_scenes = [rng.choice(training_scenes()) for _ in range(args.generations)]
    print("rendering and encoding ...", flush=True)
    examples = render_examples(pipe, args.renders, args.seed)
    print("generating ...", flush=True)
    examples += generation_examples(pipe, train_scenes, range(1000, 1000 + args.generations), sizes, models)
    held_out = [Scene(*key) for key in sorted(HELD_OUT)] + [rng.choice(training_scenes()) for _ in range(8)]
    test = generation_examples(pipe, held_out, range(50_000, 50_000 + len(held_out)),
                               [(128, 128), (192, 128), (64, 64)], models)
    data_s = time.perf_counter() - start
    print(f"training on {sum(len(x) for x, _ in examples)} latents ({data_s:.0f} s to make them) ...", flush=True)
    decoder = train(examples, args.steps, args.seed)
    linear = fit_to_vae(pipe.vae)
    scores = {"decoder_psnr_db": [], "linear_psnr_db": []}
    with torch.inference_mode():
        for x, y in test:
            scores["decoder_psnr_db"].append(psnr(decoder(torch.from_numpy(x)).numpy(), y))
            grid = x.transpose(0, 2, 3, 1) @ linear.weight + linear.bias  # what `LatentPreview.images` shows
            scores["linear_psnr_db"].append(psnr(upsample2x(grid).transpose(0, 3, 1, 2), y))
    summary = {k: round(float(np.mean(v)), 2) for k, v in scores.items()}
    summary.update(held_out_generations=len(test), train_latents=int(sum(len(x) for x, _ in examples)),
                   steps=args.steps, wall_s=round(time.perf_counter() - start, 1))
    out = preset.root / "vae" / PREVIEW_DECODER_FILE
    decoder.save(out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
