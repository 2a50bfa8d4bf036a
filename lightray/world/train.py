"""Trains the embedded model from scratch on the shapes world, in stages, on a CPU.

    python -m lightray.world.train --out models/lightray-shapes            # everything, ~6 h on 2 cores
    python -m lightray.world.train --out models/lightray-shapes --resume   # continue a stopped run
    python -m lightray.world.train --out models/lightray-shapes --stages lightning   # redo one stage

Stages (each saves into the output folder, so a later stage can be rerun alone; `--resume` skips the stages the
run completed, recorded in training.json, and continues the current one from its checkpoint under
`<out>.checkpoints/`):
  1. text: byte-level BPE over the EN+ZH captions; a frozen, seeded random Qwen2.5-VL (the world has one object
     per image, so the denoiser only needs token identity, which a random encoder keeps).
  2. vae: AutoencoderKLQwenImage (8× spatial, 16 channels, like the real one) on 32-px crops of 64² images; then the latent
     mean/std the pipeline normalises with are measured and written into its config.
  3. transformer: QwenImageTransformer2DModel with the rectified-flow objective at 64², 10 % caption dropout (so
     true CFG with a negative prompt works).
  4. decoder: the VAE decoder alone (encoder frozen: latents unchanged) fine-tuned over every served size.
  5. multires: the 64² transformer continued over every served size (TRAIN_SIZES).
  6. refine: continued again at a restarted learning rate on twice the images, the default and the large sizes
     drawn more often.
  7. anneal: the refined transformer continued at a lower peak learning rate on the same images, the sizes
     furthest from their targets drawn most often.
  8. bilingual: the annealed transformer continued at a lower peak learning rate still, each image captioned afresh
     at every draw from all its scene's captions in both languages (so every image is seen in English and in
     Chinese), the sizes furthest from their targets drawn most often.
  9. polish: a short continuation at a low peak learning rate, recaptioned as in bilingual, the two sizes still
     short of their targets drawn most.
     Stages 5-9 are the continuations, one table (CONTINUATIONS: each one's flags' defaults, data, size weights and
     files) run by one function (`stage_continue`): the saved transformer trained on over every served size,
     checkpointed every 200 steps.
  10. lightning: the base (many steps, true CFG) distilled into 4- and 8-step LoRAs (no CFG) by trajectory
     matching over every served size (LIGHTNING_WEIGHTS), saved in the published Qwen-Image-Lightning key format.
  11. pack: weights stored as float16.

A stage that completes invalidates every later one (its checkpoints and encoded data included): they were made
from what it just replaced, so `--resume --stages polish lightning pack` retrains exactly what depends on polish.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

from lightray.training.flow_matching import (
    images_to_tensor,
    normalised_latents,
    pack,
    predict,
    shift_sigmas,
    training_times,
    warmup_cosine,
)
from lightray.training.lora import LORA_TARGETS
from lightray.world import build
from lightray.world.evaluator import score
from lightray.world.shapes import all_scenes, render, sample_training_examples, training_scenes

TRAIN_SIZES: tuple[tuple[int, int], ...] = (
    (64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (128, 64), (64, 128), (192, 128), (128, 192),
)
"""(width, height) the multi-resolution stages train on: exactly the sizes the preset serves (a test keeps
`configs/models/lightray-shapes.yaml` in step with this)."""
DEFAULT_SIZE = (128, 128)
TOKEN_BUDGET = 2048
"""Image tokens per training batch at every size (64 images at 64², 32 at 128², 8 at 256²): one step costs about
the same at every size, ≈ 0.23 s on 2 cores."""
LIGHTNING_STEPS = (4, 8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def student_sigmas(steps: int) -> list[float]:
    """The sigmas the pipeline walks for `steps` (linspace then shift 3), plus the terminal 0."""
    return [float(s) for s in shift_sigmas(np.linspace(1.0, 1.0 / steps, steps))] + [0.0]


def grid_of(size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of transformer tokens for a (width, height) image: 8× VAE, then 2×2 packing."""
    width, height = size
    return height // 16, width // 16


def batch_for(size: tuple[int, int], cap: int = 64) -> int:
    rows, cols = grid_of(size)
    return max(1, min(cap, TOKEN_BUDGET // (rows * cols)))


def images_for(size: tuple[int, int], at_128: int) -> int:
    """Training images per size: `at_128` up to 128², fewer for larger sizes (encoding them costs more, and each
    image holds more tokens)."""
    width, height = size
    return round(at_128 * min(1.0, (128 * 128 / (width * height)) ** 0.5))


def size_weights() -> list[float]:
    """How often each training size is drawn: the default size twice as often as the others."""
    return [2.0 if size == DEFAULT_SIZE else 1.0 for size in TRAIN_SIZES]


LIGHTNING_WEIGHTS: dict[tuple[int, int], float] = {
    (64, 64): 1.0, (96, 96): 1.25, (128, 128): 2.0, (192, 192): 1.0, (256, 256): 3.0,
    (128, 64): 1.25, (64, 128): 1.25, (192, 128): 1.0, (128, 192): 1.0,
}
"""How often the Lightning distillation draws each size. Drawn as `size_weights` (1 in 10 at 256²), Lightning 4
missed its 256² target by 4 points, the furthest of any cell: a 256² step holds 8 images. With 1,000 steps the
other sizes get about as many steps as 800 gave them before (78 against 80 at weight 1)."""


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A stage that trains the saved transformer on over every served size (`continue_transformer`): same objective,
    batches of `TOKEN_BUDGET` tokens, caption dropout and EMA; it differs from the others only in what is here."""

    name: str
    """The stage's name (in `STAGES`, `--stages` and training.json), its flags (`--<name>-steps`, `--<name>-lr`)
    and its checkpoint (`<name>.pt`)."""
    steps: int
    """`--<name>-steps`' default."""
    lr: float
    """`--<name>-lr`'s default: the peak of its warmup-cosine schedule."""
    seed_offset: int
    """Its run's seed is `--seed` plus this."""
    draws: tuple[str, ...]
    """The encoded draws of the world it trains on, concatenated (`LATENT_DRAWS`)."""
    weights: dict[tuple[int, int], float]
    """How often each training size is drawn."""
    recaption: bool
    """Each drawn image captioned afresh from all its scene's captions (`scene_captions`), not the one it was
    drawn with."""
    saves: tuple[str, ...]
    """The files it keeps in the checkpoint folder (see `invalidate_after`)."""


LATENT_DRAWS: dict[str, int] = {"multires-latents": 0, "refine-latents": 1000}
"""The encoded draws of the world the continuations train on (`encoded_latents`), by name: their seed is `--seed`
plus this."""

CONTINUATIONS: tuple[Continuation, ...] = (
    # Progressive resolution, as large text-to-image models are trained: RoPE positions differ per grid, so every
    # served grid is trained, not extrapolated to. The default size drawn twice as often as the others.
    Continuation("multires", steps=7000, lr=2e-4, seed_offset=0, draws=("multires-latents",),
                 weights=dict(zip(TRAIN_SIZES, size_weights())), recaption=False,
                 saves=("multires.pt", "multires-latents.pt")),
    # At a restarted learning rate, on the multires images plus as many new ones (another draw of the world, so
    # the extra steps see more jitter and phrasings rather than more epochs of the same images). After multires
    # the default and the large grids were furthest from the targets (256² read right in a third of images): a
    # 256² step holds only 8 images, so it needs more steps.
    Continuation("refine", steps=11000, lr=3e-4, seed_offset=1, draws=("multires-latents", "refine-latents"),
                 weights={(64, 64): 1.0, (96, 96): 1.0, (128, 128): 2.0, (192, 192): 1.5, (256, 256): 2.5,
                          (128, 64): 1.0, (64, 128): 1.0, (192, 128): 1.5, (128, 192): 1.5},
                 recaption=False, saves=("refine.pt", "refine-latents.pt")),
    # At a lower peak learning rate on refine's images: refine ended with adherence still rising (probes at 128²:
    # 72 → 76 → 80 % at steps 0, 3,000 and 6,000), so more steps, spent where the targets were missed by most
    # (256² by 13 points, 192² by 10, the tall sizes by 8; 96² met its targets).
    Continuation("anneal", steps=11000, lr=1.5e-4, seed_offset=2, draws=("multires-latents", "refine-latents"),
                 weights={(64, 64): 1.0, (96, 96): 0.75, (128, 128): 2.0, (192, 192): 2.0, (256, 256): 3.0,
                          (128, 64): 1.25, (64, 128): 1.5, (192, 128): 1.5, (128, 192): 2.0},
                 recaption=False, saves=("anneal.pt",)),
    # At a lower peak learning rate still, recaptioned: an image keeps one caption, in one language, in the encoded
    # data, so before this stage each image was seen in one language only, and Chinese trailed English by 7–8
    # points at 128², 64² and 64×128 after anneal; 256² missed its targets by 3–4 points and 64×128 by 1–2.
    Continuation("bilingual", steps=9000, lr=1e-4, seed_offset=3, draws=("multires-latents", "refine-latents"),
                 weights={(64, 64): 1.25, (96, 96): 0.75, (128, 128): 2.0, (192, 192): 1.0, (256, 256): 4.0,
                          (128, 64): 1.0, (64, 128): 2.5, (192, 128): 1.25, (128, 192): 1.25},
                 recaption=True, saves=("bilingual.pt",)),
    # A short while at a low peak learning rate, recaptioned: after bilingual the base missed only at 256² and
    # 64×128 (by one image in 96 each), and 256² had gained in the decaying half of bilingual, not the flat one.
    Continuation("polish", steps=3000, lr=5e-5, seed_offset=4, draws=("multires-latents", "refine-latents"),
                 weights={(64, 64): 1.0, (96, 96): 1.0, (128, 128): 2.0, (192, 192): 1.0, (256, 256): 5.0,
                          (128, 64): 1.0, (64, 128): 3.0, (192, 128): 1.0, (128, 192): 1.0},
                 recaption=True, saves=("polish.pt",)),
)
CONTINUATION = {stage.name: stage for stage in CONTINUATIONS}

STAGES = ("text", "vae", "transformer", "decoder", *(stage.name for stage in CONTINUATIONS), "lightning", "pack")
STAGE_FILES: dict[str, tuple[str, ...]] = {
    **{stage.name: stage.saves for stage in CONTINUATIONS},
    "lightning": ("teacher.pt", *(f"lightning-{n}.done" for n in LIGHTNING_STEPS)),
}
"""The files each stage keeps in the checkpoint folder (see `invalidate_after`)."""


def invalidate_after(stage: str, completed: list[str], checkpoints: Path) -> list[str]:
    """`completed` without the stages after `stage`, whose files in `checkpoints` are deleted: a later stage was
    made from what `stage` has just replaced (teacher trajectories from the old transformer, for one)."""
    later = STAGES[STAGES.index(stage) + 1:]
    for name in later:
        for file in STAGE_FILES.get(name, ()):
            (checkpoints / file).unlink(missing_ok=True)
    return [s for s in completed if s not in later]


class Checkpoint:
    """One file per stage in the run's checkpoint folder, written atomically, so a stage stopped at any point (a
    session ending, a kill) resumes from its last save with the same data, weights, optimizer and RNG states."""

    def __init__(self, folder: Path, stage: str):
        self.path = folder / f"{stage}.pt"
        folder.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def cached(folder: Path, name: str, compute):
    """`compute()`'s result, saved under `folder` the first time and loaded on a resumed run."""
    store = Checkpoint(folder, name)
    if (value := store.load()) is not None:
        return value
    value = compute()
    store.save(value)
    return value


def multires_examples(seed: int, at_128: int, size: tuple[int, int]):
    """The (scene, image, caption) triples of one training size: deterministic in (seed, size)."""
    return list(sample_training_examples(images_for(size, at_128), seed + 7 + TRAIN_SIZES.index(size), size))


def encoded_latents(out: Path, checkpoints: Path, name: str, seed: int, at_128: int) -> dict:
    """Packed, normalised latents and captions of every training size, drawn with `seed` and encoded once per
    run (kept as `<name>.pt` in the checkpoint folder)."""

    def compute():
        vae = AutoencoderKLQwenImage.from_pretrained(out / "vae").eval()
        data = {}
        for size in TRAIN_SIZES:
            t0 = time.time()
            examples = multires_examples(seed, at_128, size)
            x0 = pack(normalised_latents(vae, images_to_tensor(img for _, img, _ in examples)))
            data[size] = (x0, [c for _, _, c in examples])
            log(f"encoded {len(examples)} images at {size[0]}x{size[1]} ({time.time() - t0:.0f}s)")
        return data

    return cached(checkpoints, name, compute)


# ---------------------------------------------------------------------------------------------------- stages


def stage_text(out: Path, arch: build.EmbeddedArchitecture, seed: int) -> None:
    tokenizer = build.build_tokenizer(arch)
    tokenizer.save_pretrained(out / "tokenizer")
    encoder = build.build_text_encoder(arch, tokenizer, seed)
    encoder.save_pretrained(out / "text_encoder")
    build.build_scheduler().save_pretrained(out / "scheduler")
    write_model_index(out)
    log(f"tokenizer: {len(tokenizer)} tokens, template prefix {build.template_prefix_length(tokenizer)} tokens")


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKLQwenImage, images: torch.Tensor, scenes) -> float:
    """Fraction of images whose VAE round trip the evaluator still reads as their scene (all attributes)."""
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample[:, :, 0]
    vae.train(was_training)
    pixels = ((recon + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean([score(p, sc)["all"] for p, sc in zip(pixels, scenes)]))


def random_crop(image: torch.Tensor, crop: int, rng: np.random.Generator, around_shape: bool) -> torch.Tensor:
    """A `crop`-pixel square of a [C, 1, H, W] image at a multiple of 8 (the VAE's latent grid)."""
    size = image.shape[-1]
    if around_shape:
        corner = image[:, 0, 0, 0]
        fg = (image[:, 0] - corner[:, None, None]).abs().sum(0) > 0.3
        ys, xs = torch.nonzero(fg, as_tuple=True)
        if len(ys):
            cy, cx = int(ys.float().mean()), int(xs.float().mean())
            y = int(np.clip(cy - crop // 2 + rng.integers(-8, 9), 0, size - crop)) // 8 * 8
            x = int(np.clip(cx - crop // 2 + rng.integers(-8, 9), 0, size - crop)) // 8 * 8
            return image[..., y : y + crop, x : x + crop]
    y, x = rng.integers(0, size - crop + 1, 2) // 8 * 8
    return image[..., y : y + crop, x : x + crop]


def decode_unclamped(vae: AutoencoderKLQwenImage, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode` for one frame without its final clamp to [-1, 1]: the clamp's zero gradient would leave an
    output saturated on the wrong side (white where black belongs) stuck there, and this world is mostly
    saturated colours."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


def stage_vae(out: Path, arch: build.EmbeddedArchitecture, seed: int, steps: int, lr: float = 1e-3,
              resume: bool = False) -> None:
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage.from_pretrained(out / "vae") if resume else build.build_vae(arch)
    vae.train()
    data = images_to_tensor(img for _, img, _ in sample_training_examples(4000, seed + 1, arch.sample_size))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    probe, probe_scenes = probe_renders(seed + 99, (arch.sample_size, arch.sample_size), 64)
    rng = np.random.default_rng(seed)
    crop, batch = 32, 32
    t0 = time.time()
    for step in range(steps):
        idx = rng.integers(0, len(data), batch)
        # Crops are aligned to the 8-px latent grid; most of a 64-px image is background, so half the crops are
        # taken around the shape (where the colour and edges the VAE must learn are).
        x = torch.stack([random_crop(data[i], crop, rng, around_shape=k % 2 == 0) for k, i in enumerate(idx)])
        posterior = vae.encode(x).latent_dist
        # A deterministic autoencoder (the posterior mean), with a light pull of the latents towards zero:
        # sampling with the initial unit variance drowns the signal, and this world needs no generative VAE
        # prior (the transformer models the latent distribution).
        z = posterior.mode()
        recon = decode_unclamped(vae, z)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}: evaluator reads {reconstruction_accuracy(vae, probe, probe_scenes):.0%} of reconstructions right")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(data[i : i + 64]).latent_dist.mode() for i in range(0, 1024, 64)])
    mean = z.mean(dim=(0, 2, 3, 4)).tolist()
    std = z.std(dim=(0, 2, 3, 4)).tolist()
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(out / "vae")
    log(f"vae saved; latent std per channel {[round(s, 2) for s in std]}")


def probe_renders(seed: int, size: tuple[int, int], count: int = 32):
    """(images, scenes) of `count` jittered renders of random scenes at `size`, for reading VAE round trips."""
    probe_rng = random.Random(seed)
    scenes = [probe_rng.choice(all_scenes()) for _ in range(count)]
    return images_to_tensor(render(sc, size, probe_rng) for sc in scenes), scenes


def stage_decoder(out: Path, checkpoints: Path, seed: int, steps: int, at_128: int) -> None:
    """Fine-tunes the VAE decoder alone, encoder frozen, over every training size: the latents the transformer
    learned stay exactly the same, while colours and edges come out closer to the renders. The crop-trained
    decoder drifts in large flat areas (orange read as yellow in 256² shapes); windows of up to 16×16 latents
    (128 px) of images of every size teach it each size's scale at the cost of a 128² image."""
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage.from_pretrained(out / "vae")
    for name, p in vae.named_parameters():
        p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    vae.encoder.eval()
    vae.decoder.train()
    count = max(1, at_128 // 4)
    data = {}
    with torch.no_grad():
        for size in TRAIN_SIZES:
            images = images_to_tensor(img for _, img, _ in sample_training_examples(
                images_for(size, count), seed + 5 + TRAIN_SIZES.index(size), size))
            latents = torch.cat([vae.encode(images[i : i + 32]).latent_dist.mode() for i in range(0, len(images), 32)])
            data[size] = (images, latents)

    def probe_all() -> str:
        return ", ".join(f"{w}x{h} {reconstruction_accuracy(vae, *probe_renders(seed + 99 + k, (w, h))):.0%}"
                         for k, (w, h) in enumerate(TRAIN_SIZES))

    log(f"decoder fine-tune: evaluator reads before: {probe_all()}")
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    rng = np.random.default_rng(seed)
    weights = np.asarray(size_weights()) / sum(size_weights())
    window = 16
    t0 = time.time()
    for step in range(steps):
        size = TRAIN_SIZES[rng.choice(len(TRAIN_SIZES), p=weights)]
        images, latents = data[size]
        lh, lw = latents.shape[-2:]
        wh, ww = min(window, lh), min(window, lw)
        batch = max(2, 2048 // (wh * ww))
        idx = torch.from_numpy(rng.integers(0, len(images), batch))
        y, x = int(rng.integers(0, lh - wh + 1)), int(rng.integers(0, lw - ww + 1))
        z = latents[idx][..., y : y + wh, x : x + ww]
        target = images[idx][..., 8 * y : 8 * (y + wh), 8 * x : 8 * (x + ww)]
        recon = decode_unclamped(vae, z)
        # Shape pixels are a few percent of an image: weight them up so their colour is learned, not averaged.
        weight = 1.0 + 9.0 * ((target - images[idx][..., :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
        loss = (weight * ((recon - target).abs() + (recon - target).pow(2))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} {size[0]}x{size[1]} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    log(f"decoder fine-tune: evaluator reads after: {probe_all()}")
    vae.save_pretrained(out / "vae")


class TextCache:
    """Every training caption encoded once by the frozen text encoder (the world's captions are a finite set)."""

    def __init__(self, out: Path, captions: list[str]):
        pipe = QwenImagePipeline.from_pretrained(out, transformer=None, vae=None)
        pipe.prompt_template_encode_start_idx = build.template_prefix_length(pipe.tokenizer)
        self.index = {c: i for i, c in enumerate(captions)}
        embeds = []
        with torch.no_grad():
            for i in range(0, len(captions), 256):
                e, m = pipe.encode_prompt(captions[i : i + 256], device="cpu")
                m = torch.ones(e.shape[:2], dtype=torch.long) if m is None else m
                embeds += [e[j, : int(m[j].sum())] for j in range(len(e))]
        self.max_len = max(e.shape[0] for e in embeds)
        self.embeds = torch.zeros(len(embeds), self.max_len, embeds[0].shape[-1])
        self.lengths = torch.tensor([e.shape[0] for e in embeds])
        for i, e in enumerate(embeds):
            self.embeds[i, : e.shape[0]] = e

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.index[c] for c in captions])
        lengths = self.lengths[idx]
        length = int(lengths.max())
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return self.embeds[idx, :length], mask


def scene_captions() -> dict[str, list[str]]:
    """Every training caption mapped to all the captions of its scene (both languages, every phrasing)."""
    table = {}
    for scene in training_scenes():
        captions = [scene.caption(language, t) for language in ("en", "zh") for t in range(4)]
        for caption in captions:
            table[caption] = captions
    return table


def all_captions() -> list[str]:
    """Every caption the transformer stages encode: the scenes' (`scene_captions`) and CFG's unconditional ones."""
    return sorted({"", " ", *scene_captions()})


def rectified_flow_step(transformer, opt, sched, ema: dict, x0: torch.Tensor, embeds, mask, grid,
                        ema_decay: float) -> torch.Tensor:
    """One optimizer step of the base model's objective on packed latents `x0`: rectified flow (predict noise − x0)
    at shifted training times, clipped gradients, then the EMA of the weights moved towards them. Returns the loss."""
    noise = torch.randn_like(x0)
    sigma = shift_sigmas(training_times(x0.shape[0]))
    s = sigma.view(-1, 1, 1)
    v = predict(transformer, (1 - s) * x0 + s * noise, sigma, embeds, mask, grid)
    loss = F.mse_loss(v, noise - x0)
    optimizer_step(transformer, opt, sched, ema, loss, ema_decay)
    return loss


def optimizer_step(transformer, opt, sched, ema: dict, loss: torch.Tensor, ema_decay: float) -> None:
    """Backward through `loss`, clip the gradients to norm 1, step the optimizer and the LR schedule, then move the
    EMA of the weights towards them."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        for k, p in transformer.state_dict().items():
            ema[k].lerp_(p, 1 - ema_decay)


class TransformerRun:
    """A saved transformer trained on for `steps` steps: its optimizer, LR schedule, EMA and RNGs, saved to and
    resumed from one `Checkpoint`, so a stage stopped at any point (a session ending, a kill) continues with the
    same weights, state and draws."""

    def __init__(self, folder: Path, checkpoint: Checkpoint, steps: int, lr: float, seed: int):
        self.transformer = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32)
        self.transformer.train()
        self.opt = torch.optim.AdamW(self.transformer.parameters(), lr=lr, weight_decay=0.01)
        self.sched = warmup_cosine(self.opt, steps)
        self.ema = {k: v.detach().clone() for k, v in self.transformer.state_dict().items()}
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        self.checkpoint = checkpoint
        self.start, self.elapsed = 0, 0.0
        """The step to continue at, and the seconds earlier sessions spent."""
        if (state := checkpoint.load()) is not None:
            self.transformer.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.ema = state["ema"]
            self.rng.setstate(state["python_rng"])
            torch.set_rng_state(state["torch_rng"])
            self.start, self.elapsed = state["step"], state["elapsed"]
            log(f"{checkpoint.path.stem}: resumed at step {self.start}/{steps} ({self.elapsed:.0f}s already spent)")

    def step(self, loss: torch.Tensor, ema_decay: float = 0.999) -> None:
        optimizer_step(self.transformer, self.opt, self.sched, self.ema, loss, ema_decay)

    def save(self, steps_done: int, elapsed: float) -> None:
        self.checkpoint.save({
            "model": self.transformer.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "ema": self.ema, "python_rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(), "step": steps_done, "elapsed": elapsed,
        })

    def finish(self, folder: Path) -> None:
        """The EMA saved as the transformer in `folder`; the checkpoint removed."""
        self.transformer.load_state_dict(self.ema)
        self.transformer.eval()
        self.transformer.save_pretrained(folder)
        self.checkpoint.remove()


def stage_transformer(out: Path, arch: build.EmbeddedArchitecture, seed: int, steps: int, count: int,
                      lr: float = 5e-4, resume: bool = False) -> None:
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage.from_pretrained(out / "vae").eval()
    examples = list(sample_training_examples(count, seed + 2, arch.sample_size))
    captions = [c for _, _, c in examples]
    log(f"encoding {count} images to latents")
    x0_all = pack(normalised_latents(vae, images_to_tensor(img for _, img, _ in examples)))
    cache = TextCache(out, all_captions())
    transformer = (QwenImageTransformer2DModel.from_pretrained(out / "transformer") if resume
                   else build.build_transformer(arch))
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    rng = random.Random(seed)
    grid = arch.sample_size // 16
    batch = 64
    t0 = time.time()
    for step in range(steps):
        idx = [rng.randrange(count) for _ in range(batch)]
        # 10 % caption dropout to "" or " ": the unconditional branch of true CFG.
        caps = [captions[i] if rng.random() > 0.1 else rng.choice(("", " ")) for i in idx]
        embeds, mask = cache.batch(caps)
        x0 = x0_all[idx]
        loss = rectified_flow_step(transformer, opt, sched, ema, x0, embeds, mask, grid,
                                   ema_decay=min(0.999, (1 + step) / (10 + step)))
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    transformer.load_state_dict(ema)
    transformer.eval()
    transformer.save_pretrained(out / "transformer")


def stage_continue(stage: Continuation, out: Path, checkpoints: Path, seed: int, steps: int, at_128: int,
                   lr: float) -> float:
    """Runs one continuation (`CONTINUATIONS`): the saved transformer trained `steps` more steps at peak `lr` over
    `stage`'s draws (`at_128` images per size up to 128²), sizes drawn by its weights. Returns the seconds spent,
    over every resumed session."""
    t0 = time.time()
    data = encoded_draws(out, checkpoints, stage.draws, seed, at_128)
    weights = [stage.weights[size] for size in TRAIN_SIZES]
    return continue_transformer(out, Checkpoint(checkpoints, stage.name), data, seed + stage.seed_offset, steps, lr,
                                weights, t0, recaption=scene_captions() if stage.recaption else None)


def encoded_draws(out: Path, checkpoints: Path, draws: tuple[str, ...], seed: int, at_128: int) -> dict:
    """The images of `draws` (names in `LATENT_DRAWS`) concatenated, {size: (packed latents, captions)}."""
    parts = [encoded_latents(out, checkpoints, name, seed + LATENT_DRAWS[name], at_128) for name in draws]
    return {size: (torch.cat([part[size][0] for part in parts]), [c for part in parts for c in part[size][1]])
            for size in TRAIN_SIZES}


def continue_transformer(out: Path, checkpoint: Checkpoint, data: dict, seed: int, steps: int, lr: float,
                         weights: list[float], t0: float, checkpoint_every: int = 200,
                         recaption: dict[str, list[str]] | None = None) -> float:
    """Trains the saved transformer `steps` more steps over `data` ({size: (packed latents, captions)}), one size
    a step drawn by `weights` (with `recaption`, each drawn image's caption is replaced by one drawn from
    `recaption[caption]`), saving weights, EMA, optimizer, LR schedule and RNG to `checkpoint` every
    `checkpoint_every` steps and resuming from it; the EMA is saved as the transformer at the end. `t0`: when the
    stage started, so the seconds returned include its data encoding."""
    cache = TextCache(out, all_captions())
    run = TransformerRun(out / "transformer", checkpoint, steps, lr, seed)
    rng, stage = run.rng, checkpoint.path.stem
    t0 -= run.elapsed  # the seconds of earlier sessions (their encoding included)
    for step in range(run.start, steps):
        size = rng.choices(TRAIN_SIZES, weights)[0]
        x0_all, captions = data[size]
        batch = batch_for(size)
        idx = [rng.randrange(len(captions)) for _ in range(batch)]
        drawn = [captions[i] if recaption is None else rng.choice(recaption[captions[i]]) for i in idx]
        caps = [caption if rng.random() > 0.1 else rng.choice(("", " ")) for caption in drawn]
        embeds, mask = cache.batch(caps)
        x0 = x0_all[idx]
        loss = rectified_flow_step(run.transformer, run.opt, run.sched, run.ema, x0, embeds, mask, grid_of(size),
                                   ema_decay=0.999)
        if step % 100 == 0 or step == steps - 1:
            log(f"{stage} step {step}/{steps} {size[0]}x{size[1]} x{batch} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            run.save(step + 1, time.time() - t0)
    run.finish(out / "transformer")
    return time.time() - t0


def write_model_index(out: Path, pipeline: str = "QwenImagePipeline", extra: dict | None = None) -> None:
    """The diffusers-format index, so `<pipeline>.from_pretrained(out)` loads the folder; `extra`: components
    beyond Qwen-Image's five (the Edit pipelines' processor)."""
    import diffusers

    index = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        **(extra or {}),
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ lightning


@torch.no_grad()
def teacher_trajectories(transformer, cache, captions, grid, sigmas, cfg, seed):
    """Runs the base with true CFG (norm-rescaled exactly as QwenImagePipeline does) along `sigmas`, returning
    the state at every sigma: [len(sigmas), B, tokens, 64]. `grid` is a side or (rows, columns) of tokens."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    g = torch.Generator().manual_seed(seed)
    embeds, mask = cache.batch(captions)
    neg, neg_mask = cache.batch([" "] * len(captions))
    x = torch.randn(len(captions), rows * cols, 64, generator=g)
    states = [x]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((len(captions),), s)
        cond = predict(transformer, x, t, embeds, mask, grid)
        uncond = predict(transformer, x, t, neg, neg_mask, grid)
        comb = uncond + cfg * (cond - uncond)
        v = comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        x = x + (s_next - s) * v
        states.append(x)
    return torch.stack(states)


def teacher_sigmas(student: list[float], teacher_steps: int) -> tuple[list[float], list[int]]:
    """The sigmas a teacher walks to land on every `student` sigma: its own `teacher_steps`-step schedule merged
    with the student's, descending; and where each student sigma falls in it."""
    fine = {float(s) for s in shift_sigmas(np.linspace(1.0, 1.0 / teacher_steps, teacher_steps))}
    sigmas = sorted(fine | set(student), reverse=True)
    return sigmas, [sigmas.index(s) for s in student]


def teacher_data(out: Path, checkpoints: Path, seed: int, cfg: float, teacher_steps: int, at_128: int) -> dict:
    """Teacher trajectories at every training size, kept at the sigmas of every student (4 and 8 steps share
    them: the fine schedule passes through both grids). {size: (captions, {sigma: states [B, tokens, 64]})}."""

    def compute():
        transformer = QwenImageTransformer2DModel.from_pretrained(out / "transformer").eval()
        cache = TextCache(out, all_captions())
        prompts = sorted(scene_captions())
        student = sorted({s for n in LIGHTNING_STEPS for s in student_sigmas(n)}, reverse=True)
        sigmas, marks = teacher_sigmas(student, teacher_steps)
        rng = random.Random(seed + 3)
        data = {}
        for size in TRAIN_SIZES:
            t0 = time.time()
            samples = images_for(size, at_128)
            captions = [rng.choice(prompts) for _ in range(samples)]
            chunk = max(8, 4 * batch_for(size))
            traj = torch.cat([
                teacher_trajectories(transformer, cache, captions[i : i + chunk], grid_of(size), sigmas, cfg,
                                     seed + TRAIN_SIZES.index(size) * 100_000 + i)[marks]
                for i in range(0, samples, chunk)
            ], dim=1)
            data[size] = (captions, {s: traj[k] for k, s in enumerate(student)})
            log(f"teacher: {samples} trajectories at {size[0]}x{size[1]} x {len(sigmas) - 1} steps ({time.time() - t0:.0f}s)")
        return data

    return cached(checkpoints, "teacher", compute)


def lora_to_lightning_format(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft's `…lora_A.weight` / `…lora_B.weight` → the published Lightning files' `…lora_down.weight` /
    `…lora_up.weight` / `…alpha` (with a `diffusion_model.` prefix, as ComfyUI-style files carry)."""
    out = {}
    for key, value in state_dict.items():
        base = key.replace("base_model.model.", "").replace("transformer.", "", 1) if key.startswith("transformer.") else key
        base = base.replace(".default", "")
        if ".lora_A.weight" in base:
            stem = base.replace(".lora_A.weight", "")
            out[f"diffusion_model.{stem}.lora_down.weight"] = value.contiguous()
            out[f"diffusion_model.{stem}.alpha"] = torch.tensor(float(alpha))
        elif ".lora_B.weight" in base:
            out[f"diffusion_model.{base.replace('.lora_B.weight', '')}.lora_up.weight"] = value.contiguous()
    return out


def stage_lightning(out: Path, checkpoints: Path, seed: int, steps: int, cfg: float, teacher_steps: int,
                    at_128: int, rank: int) -> None:
    """One LoRA per student step count, each trained over every size to land one Euler step (no CFG) on the
    teacher's state at the student's next sigma. A finished LoRA is kept, so a resumed run trains only the rest."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    data = teacher_data(out, checkpoints, seed, cfg, teacher_steps, at_128)
    cache = TextCache(out, all_captions())
    weights = [LIGHTNING_WEIGHTS[size] for size in TRAIN_SIZES]
    (out / "lightning").mkdir(exist_ok=True)
    for n_steps in LIGHTNING_STEPS:
        path = out / "lightning" / f"lightray-shapes-lightning-{n_steps}steps.safetensors"
        done = checkpoints / f"lightning-{n_steps}.done"
        if done.exists() and path.exists():
            log(f"lightning-{n_steps}: already trained in this run")
            continue
        torch.manual_seed(seed + n_steps)
        rng = random.Random(seed + n_steps)
        transformer = QwenImageTransformer2DModel.from_pretrained(out / "transformer").eval()
        grid_sigmas = student_sigmas(n_steps)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True))
        params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for n, p in transformer.named_parameters():
            p.requires_grad_("lora_" in n)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        sched = warmup_cosine(opt, steps)
        transformer.train()
        t0 = time.time()
        for step in range(steps):
            size = rng.choices(TRAIN_SIZES, weights)[0]
            captions, states = data[size]
            batch = batch_for(size)
            idx = torch.tensor([rng.randrange(len(captions)) for _ in range(batch)])
            k = [rng.randrange(n_steps) for _ in range(batch)]
            x = torch.stack([states[grid_sigmas[j]][i] for i, j in zip(idx.tolist(), k)])
            target_next = torch.stack([states[grid_sigmas[j + 1]][i] for i, j in zip(idx.tolist(), k)])
            s = torch.tensor([grid_sigmas[j] for j in k])
            s_next = torch.tensor([grid_sigmas[j + 1] for j in k])
            embeds, mask = cache.batch([captions[i] for i in idx.tolist()])
            v = predict(transformer, x, s, embeds, mask, grid_of(size))
            loss = F.mse_loss(x + (s_next - s).view(-1, 1, 1) * v, target_next)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == steps - 1:
                log(f"lightning-{n_steps} step {step}/{steps} {size[0]}x{size[1]} loss {loss.item():.5f} ({time.time() - t0:.0f}s)")
        save_file(lora_to_lightning_format(get_peft_model_state_dict(transformer), rank), str(path))
        done.touch()
        log(f"saved {path}")


def stage_pack(out: Path) -> None:
    """Stores every weight file in float16 so the shipped folder stays under 30 MB; the stages load them in
    the preset's dtype (float32 on CPU), so compute precision is unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(out.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: (v.half() if v.is_floating_point() and v.dtype == torch.float32 else v).contiguous()
                   for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=metadata)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"packed weights as float16: folder is {total / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/lightray-shapes"))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--resume", action="store_true",
                        help="skip the stages this run already completed (training.json) and continue the current "
                             "one from its checkpoint")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="folder for checkpoints and encoded data (default: <out>.checkpoints)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-resume", action="store_true", help="continue training the saved VAE")
    parser.add_argument("--decoder-steps", type=int, default=400)
    parser.add_argument("--transformer-steps", type=int, default=7000)
    parser.add_argument("--transformer-lr", type=float, default=5e-4)
    parser.add_argument("--transformer-resume", action="store_true", help="continue training the saved transformer")
    parser.add_argument("--images", type=int, default=8000, help="64² training images for the transformer")
    for continuation in CONTINUATIONS:
        parser.add_argument(f"--{continuation.name}-steps", type=int, default=continuation.steps)
        parser.add_argument(f"--{continuation.name}-lr", type=float, default=continuation.lr)
        if continuation.name == "multires":  # here, so that training.json records the flags in their old order
            parser.add_argument("--multires-images", type=int, default=1200,
                                help="training images per size up to 128² (fewer above: see images_for)")
    parser.add_argument("--lightning-steps", type=int, default=1000)
    parser.add_argument("--teacher-cfg", type=float, default=2.0)
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--teacher-samples", type=int, default=384,
                        help="teacher trajectories per size up to 128² (fewer above)")
    parser.add_argument("--lightning-rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = build.EmbeddedArchitecture()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoints = args.checkpoints or args.out.with_name(args.out.name + ".checkpoints")
    info_path = args.out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if not args.resume:
        info["completed_stages"] = []
        if checkpoints.exists():
            import shutil

            shutil.rmtree(checkpoints)
    info["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info["sizes"] = [list(size) for size in TRAIN_SIZES]
    started = time.time()
    for stage in STAGES:
        if stage not in args.stages:
            continue
        if args.resume and stage in info.get("completed_stages", []):
            log(f"stage {stage}: completed earlier in this run")
            continue
        t0 = time.time()
        log(f"stage {stage}")
        spent = None
        if stage == "text":
            stage_text(args.out, arch, args.seed)
        elif stage == "vae":
            stage_vae(args.out, arch, args.seed, args.vae_steps, lr=args.vae_lr, resume=args.vae_resume)
        elif stage == "transformer":
            stage_transformer(args.out, arch, args.seed, args.transformer_steps, args.images,
                              lr=args.transformer_lr, resume=args.transformer_resume)
        elif stage in CONTINUATION:
            spent = stage_continue(CONTINUATION[stage], args.out, checkpoints, args.seed,
                                   getattr(args, f"{stage}_steps"), args.multires_images, getattr(args, f"{stage}_lr"))
        elif stage == "lightning":
            stage_lightning(args.out, checkpoints, args.seed, args.lightning_steps, args.teacher_cfg,
                            args.teacher_steps, args.teacher_samples, args.lightning_rank)
        elif stage == "decoder":
            stage_decoder(args.out, checkpoints, args.seed, args.decoder_steps, args.multires_images)
        elif stage == "pack":
            stage_pack(args.out)
        # A stage resumed from a checkpoint reports its seconds over all sessions.
        info.setdefault("stage_seconds", {})[stage] = round(spent if spent is not None else time.time() - t0, 1)
        completed = invalidate_after(stage, info.get("completed_stages", []), checkpoints)
        info["completed_stages"] = [s for s in completed if s != stage] + [stage]
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    info["total_seconds_last_session"] = round(time.time() - started, 1)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    log(f"done in {time.time() - started:.0f}s: {info.get('stage_seconds')}")


if __name__ == "__main__":
    main()
