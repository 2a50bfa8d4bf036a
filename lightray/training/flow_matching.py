"""The rectified-flow objective Qwen-Image-class transformers are trained with, shared by the LoRA trainer and the
embedded model's own training (`lightray.world.train`): packed, normalised VAE latents, shifted training times,
the transformer's velocity prediction, and the learning-rate schedule.

A sample at time sigma is `x_t = (1 - sigma) x_0 + sigma noise`; the transformer predicts the velocity
`noise - x_0` (what the sampler's Euler steps integrate)."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline


def images_to_tensor(images) -> torch.Tensor:
    """uint8 RGB images (arrays or PIL, one size) → float32 [B, C, T=1, H, W] in [-1, 1], the VAE's input."""
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


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] latents → the transformer's packed [B, H/2 · W/2, 4C] tokens."""
    b, c, _, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents[:, :, 0], b, c, h, w)


def normalised_latents(vae: AutoencoderKLQwenImage, images: torch.Tensor) -> torch.Tensor:
    """VAE latents scaled the way the pipeline expects its denoiser's output (the inverse of its decode step)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
    return (z - mean) / std


def predict(transformer, x, sigma, embeds, mask, grid: int | tuple[int, int]):
    """The transformer's velocity for packed latents `x` on a `grid` of tokens (a side, or (rows, columns))."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    return transformer(
        hidden_states=x, timestep=sigma, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
        img_shapes=[[(1, rows, cols)]] * x.shape[0], return_dict=False,
    )[0]


def predict_21(transformer, x, sigma, embeds, mask, grid: int | tuple[int, int]):
    """`predict` for Qwen-Image-2.1's single-stream transformer, as its pipelines call it with captions only: the
    right-padded captions' mask (padded positions are never attended to), no image slots in the text, the target's
    slots after it (`joint_vision_mask`), no prefix cache (training runs every token), the prediction sliced to
    the target's tokens."""
    from diffusers.modular_pipelines.qwenimage21.denoise import joint_vision_mask

    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    slots = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    out = transformer(
        hidden_states=x, timestep=sigma, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask.bool(),
        img_shapes=[[(1, rows, cols)]] * x.shape[0], img_mask=joint_vision_mask(slots, rows * cols),
        return_dict=False,
    )[0]
    return out[:, -rows * cols:]


PREDICTORS = {"QwenImageTransformer2DModel": predict, "QwenImage21Transformer2DModel": predict_21}
"""The training forward of each family's transformer class (`ModelFamily.transformer_class`)."""
