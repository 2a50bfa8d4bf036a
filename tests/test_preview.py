"""The cheap preview projection (`lightray.stages.preview`) against the embedded model's own VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from PIL import Image

from lightray.stages.preview import unpack_latents, upsample2x


def test_unpack_and_upsample_match_diffusers_and_torch():
    packed = np.random.default_rng(0).standard_normal((2, 8 * 4, 64)).astype(np.float32)  # 128x64
    ref = QwenImagePipeline._unpack_latents(torch.from_numpy(packed), 128, 64, 8)[:, :, 0]  # [n, c, h, w]
    assert np.array_equal(unpack_latents(packed, 128, 64, 8), ref.permute(0, 2, 3, 1).numpy())
    up = torch.nn.functional.interpolate(ref, scale_factor=2, mode="bilinear", align_corners=False)
    assert np.abs(upsample2x(ref.permute(0, 2, 3, 1).numpy()) - up.permute(0, 2, 3, 1).numpy()).max() < 1e-5


def test_a_preview_is_a_quarter_of_the_side(local_pipeline):
    vae = local_pipeline.vae
    latents = vae.encode([Image.new("RGB", (192, 128), (128, 128, 128))] * 2)
    previews = vae.preview(latents, 128, 192)
    assert [p.size for p in previews] == [(48, 32)] * 2 and previews[0].mode == "RGB"


@pytest.mark.parametrize("colour", [(255, 255, 255), (128, 128, 128), (0, 0, 0)])
def test_the_projection_reproduces_the_backgrounds_of_solid_latents(local_pipeline, colour):
    """Measured: white within 2 grey levels, grey within 18, black within 47 (dark blue-grey: the fit trades it
    against the colours)."""
    vae = local_pipeline.vae
    got = np.asarray(vae.preview(vae.encode([Image.new("RGB", (128, 128), colour)]), 128, 128)[0], float)
    tolerance = {(255, 255, 255): 8, (128, 128, 128): 25, (0, 0, 0): 60}[colour]
    assert np.abs(got.mean((0, 1)) - colour).max() < tolerance
