"""Stage 3 (and the encoder for image inputs): packed latents ↔ pixels with AutoencoderKLQwenImage."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from lightray.config import ModelPreset
from lightray.stages.common import torch_dtype


class VaeStage:
    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.device = preset.device
        self.vae = AutoencoderKLQwenImage.from_pretrained(
            preset.root / "vae", dtype=torch_dtype(preset.dtype)
        ).to(self.device).eval()
        self.scale_factor = 2 ** len(self.vae.temperal_downsample)
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
        image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type="pil")
