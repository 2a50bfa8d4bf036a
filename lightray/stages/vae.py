"""Stage 3 (and the encoder for image inputs): packed latents ↔ pixels with AutoencoderKLQwenImage.

AutoencoderKLQwenImage keeps per-call state on the module (its causal-convolution feature cache, `_feat_map` /
`_conv_idx`, reset at the start of every encode and decode), so two threads in one VAE corrupt each other's images.
Ray Serve runs a replica's synchronous methods in a thread pool (the VaeDecoder takes up to
`max_ongoing_requests` at once): every VAE call here holds the stage's lock.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from lightray.config import ModelPreset
from lightray.stages.common import generators, torch_dtype


class VaeStage:
    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.device = preset.device
        self.vae = AutoencoderKLQwenImage.from_pretrained(
            preset.root / "vae", dtype=torch_dtype(preset.dtype)
        ).to(self.device).eval()
        self.scale_factor = 2 ** len(self.vae.temperal_downsample)
        self._lock = threading.Lock()  # see the module docstring
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.scale_factor * 2)
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1)
        # The pipeline divides by 1/std rather than multiplying by std; the same order keeps results bit-exact.
        self.latents_std_inv = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1)

    @torch.inference_mode()
    def decode(self, packed: np.ndarray, height: int, width: int) -> list[Image.Image]:
        """Packed latents [n, tokens, 64] (the denoiser's output) → n RGB images, as QwenImagePipeline decodes."""
        latents = torch.from_numpy(packed).to(self.device)
        latents = QwenImagePipeline._unpack_latents(latents, height, width, self.scale_factor)
        latents = latents.to(self.vae.dtype)
        mean = self.latents_mean.to(latents.device, latents.dtype)
        std_inv = self.latents_std_inv.to(latents.device, latents.dtype)
        latents = latents / std_inv + mean
        with self._lock:
            image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type="pil")

    # ------------------------------------------------------------------------------------- image inputs

    def _posterior(self, image: Image.Image, height: int | None, width: int | None):
        """The VAE posterior of one image, preprocessed as the img2img/inpaint pipelines do (lanczos resize to
        height×width, [-1, 1], one frame) and encoded alone (batch 1, as they encode image[i : i + 1])."""
        x = self.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        x = x.unsqueeze(2).to(device=self.device, dtype=self.vae.dtype)
        with self._lock:
            return self.vae.encode(x).latent_dist

    def _normalise_and_pack(self, z: torch.Tensor) -> np.ndarray:
        """[b, z, 1, h, w] raw latents → [b, tokens, 4·z] normalised and packed, with the pipelines' exact ops:
        `(z - mean) * (1 / std)`, the reciprocal taken after the cast to the latents' dtype."""
        c = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        std_inv = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        z = (z - mean) * std_inv
        b, _, _, h, w = z.shape
        packed = QwenImagePipeline._pack_latents(z[:, :, 0], b, c, h, w)
        return np.ascontiguousarray(packed.float().cpu().numpy())

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], height: int | None = None, width: int | None = None) -> np.ndarray:
        """RGB images → normalised packed latents [len(images), tokens, 4·z] float32 (the denoiser's layout),
        from the posterior's mean (mode "argmax"): deterministic, the same for every seed. Images are resized
        to height×width (default: their own size, floored to a multiple of 16) with the pipelines' lanczos."""
        return self._normalise_and_pack(torch.cat([self._posterior(im, height, width).mode() for im in images]))

    @torch.inference_mode()
    def encode_for_seeds(self, image: Image.Image, seeds: list[int], height: int | None = None,
                         width: int | None = None, mode: str | None = None) -> "ImageLatents":
        """The latents QwenImageImg2ImgPipeline / QwenImageInpaintPipeline start from for `image` and each seed
        (`image=[image] * n`, one generator per seed), plus what the denoiser needs to continue those generators.

        mode (default: the preset's `image_encode_mode`): "argmax" returns the posterior mean for every seed and
        draws nothing; "sample" draws `mean + std · ε` with the seed's generator, exactly as the pipelines'
        `retrieve_latents(..., generator=generator[i])` does. That draw advances the generator the pipelines
        then take the initial noise from, so its state after the draw travels to the denoiser with the latents.
        """
        mode = mode or self.preset.image_encode_mode
        posterior = self._posterior(image, height, width)
        if mode == "argmax":
            packed = self._normalise_and_pack(posterior.mode())
            return ImageLatents(np.ascontiguousarray(np.repeat(packed, len(seeds), axis=0)), None)
        if mode != "sample":
            raise ValueError(f"unknown image encode mode {mode!r}")
        samples, states = [], []
        for g in generators(seeds, self.device):
            samples.append(posterior.sample(g))
            states.append(g.get_state().numpy().copy())
        return ImageLatents(self._normalise_and_pack(torch.cat(samples)), states)


@dataclasses.dataclass
class ImageLatents:
    """An input image as the denoiser's starting point for the n seeds of a request."""

    latents: np.ndarray
    """[n, tokens, 4·z] float32: normalised, packed latents, one per seed (the pipelines' `image_latents`)."""
    generator_states: list[np.ndarray] | None = None
    """Per seed, its generator's state after the posterior draw (mode "sample"); None when nothing was drawn
    (mode "argmax": the denoiser's generators start fresh from the seeds)."""
