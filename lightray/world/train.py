"""Trains the embedded model from scratch on the shapes world, in stages, on a CPU.

    python -m lightray.world.train --out models/lightray-shapes            # everything, ~1 h on 2 cores
    python -m lightray.world.train --out models/lightray-shapes --stages lightning   # redo one stage

Stages (each saves into the output folder, so a later stage can be rerun alone):
  1. tokenizer + text encoder: byte-level BPE over the EN+ZH captions; a frozen, seeded random Qwen2.5-VL (the
     world has one object per image, so the denoiser only needs token identity, which a random encoder keeps;
     training it would cost CPU time for no measurable gain at this scale).
  2. vae: AutoencoderKLQwenImage (8× spatial, 16 channels, like the real one) on random crops; then the latent
     mean/std the pipeline normalises with are measured and written into its config.
  3. transformer: QwenImageTransformer2DModel with the rectified-flow objective, 10 % caption dropout (so true CFG
     with a negative prompt works).
  4. lightning: the base (many steps, true CFG) distilled into 4- and 8-step LoRAs (no CFG) by trajectory
     matching, saved in the published Qwen-Image-Lightning key format (lora_down / lora_up / alpha).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

from lightray.world import build
from lightray.world.evaluator import score
from lightray.world.shapes import all_scenes, render, sample_training_examples, training_scenes

STAGES = ("text", "vae", "transformer", "lightning", "decoder", "pack")
LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
]
LIGHTNING_STEPS = (4, 8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def images_to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).unsqueeze(2).contiguous()  # B, C, T=1, H, W


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int = 50) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        # Linear warm-up, flat, then a cosine over the last 30 %.
        if step < warmup:
            return (step + 1) / warmup
        decay_start = int(steps * 0.7)
        if step < decay_start:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - decay_start) / max(1, steps - decay_start))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shift_sigmas(u: torch.Tensor | np.ndarray, shift: float = 3.0):
    """The time shift the scheduler applies (exponential with mu=log(shift) == this rational form)."""
    return shift * u / (1 + (shift - 1) * u)


def training_times(batch: int) -> torch.Tensor:
    """Times u in (0, 1) before the shift: half uniform, half logit-normal.

    The sampler walks a grid uniform in u (then shifted), so uniform u trains every sigma inference visits. A
    shifted logit-normal alone almost never draws sigma < 0.2 (0.7 % of samples), where the last steps of a
    20-step schedule land and shape edges are decided: trained that way, long schedules came out worse than 4
    steps. The logit-normal half keeps extra weight on mid sigmas, where composition is decided."""
    uniform = torch.rand(batch)
    logit_normal = torch.sigmoid(torch.randn(batch))
    return torch.where(torch.rand(batch) < 0.5, uniform, logit_normal).clamp(1e-3, 1.0)


def student_sigmas(steps: int) -> list[float]:
    """The sigmas the pipeline walks for `steps` (linspace then shift 3), plus the terminal 0."""
    return [float(s) for s in shift_sigmas(np.linspace(1.0, 1.0 / steps, steps))] + [0.0]


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
    probe_rng = random.Random(seed + 99)
    probe_scenes = [probe_rng.choice(all_scenes()) for _ in range(64)]
    probe = images_to_tensor(render(sc, arch.sample_size, probe_rng) for sc in probe_scenes)
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


def stage_decoder(out: Path, arch: build.EmbeddedArchitecture, seed: int, steps: int) -> None:
    """Fine-tunes the VAE decoder alone, encoder frozen: the latents the transformer learned stay exactly the
    same, while colours and edges come out closer to the training renders. Runs after the transformer, when
    the CPU time for it is known to be spare."""
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage.from_pretrained(out / "vae")
    for name, p in vae.named_parameters():
        p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    vae.encoder.eval()
    vae.decoder.train()
    data = images_to_tensor(img for _, img, _ in sample_training_examples(2000, seed + 5, arch.sample_size))
    with torch.no_grad():
        latents = torch.cat([vae.encode(data[i : i + 64]).latent_dist.mode() for i in range(0, len(data), 64)])
    probe_rng = random.Random(seed + 99)
    probe_scenes = [probe_rng.choice(all_scenes()) for _ in range(64)]
    probe = images_to_tensor(render(sc, arch.sample_size, probe_rng) for sc in probe_scenes)
    log(f"decoder fine-tune: evaluator reads {reconstruction_accuracy(vae, probe, probe_scenes):.0%} before")
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(data), 16))
        x, z = data[idx], latents[idx]
        recon = decode_unclamped(vae, z)
        # Shape pixels are a few percent of an image: weight them up so their colour is learned, not averaged.
        weight = 1.0 + 9.0 * ((x - x[..., :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
        loss = (weight * ((recon - x).abs() + (recon - x).pow(2))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    log(f"decoder fine-tune: evaluator reads {reconstruction_accuracy(vae, probe, probe_scenes):.0%} after")
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


def all_captions() -> list[str]:
    caps = {"", " "}
    for scene in training_scenes():
        for language in ("en", "zh"):
            for t in range(4):
                caps.add(scene.caption(language, t))
    return sorted(caps)


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, _, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents[:, :, 0], b, c, h, w)


def normalised_latents(vae: AutoencoderKLQwenImage, images: torch.Tensor) -> torch.Tensor:
    """VAE latents scaled the way the pipeline expects its denoiser's output (the inverse of its decode step)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
    return (z - mean) / std


def predict(transformer, x, sigma, embeds, mask, grid):
    return transformer(
        hidden_states=x, timestep=sigma, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
        img_shapes=[[(1, grid, grid)]] * x.shape[0], return_dict=False,
    )[0]


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
        noise = torch.randn_like(x0)
        sigma = shift_sigmas(training_times(batch))
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        v = predict(transformer, xt, sigma, embeds, mask, grid)
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, p in transformer.state_dict().items():
                ema[k].lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    transformer.load_state_dict(ema)
    transformer.eval()
    transformer.save_pretrained(out / "transformer")


def write_model_index(out: Path) -> None:
    """The diffusers-format index, so `QwenImagePipeline.from_pretrained(out)` loads the folder."""
    import diffusers

    index = {
        "_class_name": "QwenImagePipeline",
        "_diffusers_version": diffusers.__version__,
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
    the state at every sigma: [len(sigmas), B, tokens, 64]."""
    g = torch.Generator().manual_seed(seed)
    embeds, mask = cache.batch(captions)
    neg, neg_mask = cache.batch([" "] * len(captions))
    x = torch.randn(len(captions), grid * grid, 64, generator=g)
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


def stage_lightning(out: Path, arch: build.EmbeddedArchitecture, seed: int, steps: int, cfg: float,
                    teacher_steps: int, samples: int, rank: int) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    grid = arch.sample_size // 16
    cache = TextCache(out, all_captions())
    scene_captions = [c for c in all_captions() if c.strip()]
    rng = random.Random(seed + 3)
    for n_steps in LIGHTNING_STEPS:
        transformer = QwenImageTransformer2DModel.from_pretrained(out / "transformer").eval()
        grid_sigmas = student_sigmas(n_steps)
        # Teacher walks a fine schedule that passes exactly through the student's sigmas.
        fine = set(float(s) for s in shift_sigmas(np.linspace(1.0, 1.0 / teacher_steps, teacher_steps)))
        sigmas = sorted(fine | set(grid_sigmas), reverse=True)
        marks = [sigmas.index(s) for s in grid_sigmas]
        captions = [rng.choice(scene_captions) for _ in range(samples)]
        t0 = time.time()
        traj = torch.cat([
            teacher_trajectories(transformer, cache, captions[i : i + 128], grid, sigmas, cfg, seed + i)[marks]
            for i in range(0, samples, 128)
        ], dim=1)
        log(f"lightning-{n_steps}: {samples} teacher trajectories x {len(sigmas) - 1} steps ({time.time() - t0:.0f}s)")
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True))
        params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for n, p in transformer.named_parameters():
            p.requires_grad_("lora_" in n)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        sched = warmup_cosine(opt, steps)
        transformer.train()
        batch = 64
        t0 = time.time()
        for step in range(steps):
            idx = torch.randint(0, samples, (batch,))
            k = torch.randint(0, n_steps, (batch,))
            x = traj[k, idx]
            target_next = traj[k + 1, idx]
            s = torch.tensor([grid_sigmas[i] for i in k])
            s_next = torch.tensor([grid_sigmas[i + 1] for i in k])
            embeds, mask = cache.batch([captions[i] for i in idx])
            v = predict(transformer, x, s, embeds, mask, grid)
            pred_next = x + (s_next - s).view(-1, 1, 1) * v
            loss = F.mse_loss(pred_next, target_next)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == steps - 1:
                log(f"lightning-{n_steps} step {step}/{steps} loss {loss.item():.5f} ({time.time() - t0:.0f}s)")
        state = get_peft_model_state_dict(transformer)
        (out / "lightning").mkdir(exist_ok=True)
        path = out / "lightning" / f"lightray-shapes-lightning-{n_steps}steps.safetensors"
        save_file(lora_to_lightning_format(state, rank), str(path))
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-resume", action="store_true", help="continue training the saved VAE")
    parser.add_argument("--decoder-steps", type=int, default=250)
    parser.add_argument("--transformer-steps", type=int, default=7000)
    parser.add_argument("--transformer-lr", type=float, default=5e-4)
    parser.add_argument("--transformer-resume", action="store_true", help="continue training the saved transformer")
    parser.add_argument("--images", type=int, default=8000, help="training images for the transformer")
    parser.add_argument("--lightning-steps", type=int, default=600)
    parser.add_argument("--teacher-cfg", type=float, default=2.0)
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--teacher-samples", type=int, default=1024)
    parser.add_argument("--lightning-rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = build.EmbeddedArchitecture()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings = {}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        t0 = time.time()
        log(f"stage {stage}")
        if stage == "text":
            stage_text(args.out, arch, args.seed)
        elif stage == "vae":
            stage_vae(args.out, arch, args.seed, args.vae_steps, lr=args.vae_lr, resume=args.vae_resume)
        elif stage == "transformer":
            stage_transformer(args.out, arch, args.seed, args.transformer_steps, args.images,
                              lr=args.transformer_lr, resume=args.transformer_resume)
        elif stage == "lightning":
            stage_lightning(args.out, arch, args.seed, args.lightning_steps, args.teacher_cfg, args.teacher_steps,
                            args.teacher_samples, args.lightning_rank)
        elif stage == "decoder":
            stage_decoder(args.out, arch, args.seed, args.decoder_steps)
        elif stage == "pack":
            stage_pack(args.out)
        timings[stage] = round(time.time() - t0, 1)
    info_path = args.out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("stage_seconds", {}).update(timings)
    info["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info["total_seconds_last_run"] = round(time.time() - started, 1)
    info_path.write_text(json.dumps(info, indent=2))
    log(f"done in {time.time() - started:.0f}s: {timings}")


if __name__ == "__main__":
    main()
