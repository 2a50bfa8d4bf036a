"""Fast previews (`lightray.stages.preview`) against the embedded model's own VAE: the distilled decoder the model
ships, and the projection fitted at load for a model that ships none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from PIL import Image

from lightray.schemas import ImageGenerationRequest
from lightray.stages.preview import DecoderPreview, fit_to_vae, unpack_latents, upsample2x
from lightray.world.shapes import SHAPE_COLORS, Scene, render


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
    projection = fit_to_vae(vae)
    got = np.asarray(projection.images(vae.encode([Image.new("RGB", (128, 128), colour)]), 128, 128)[0], float)
    tolerance = {(255, 255, 255): 8, (128, 128, 128): 25, (0, 0, 0): 60}[colour]
    assert np.abs(got.mean((0, 1)) - colour).max() < tolerance


def test_the_embedded_model_previews_through_its_distilled_decoder(local_pipeline):
    assert isinstance(local_pipeline.vae.latent_preview, DecoderPreview)


@pytest.mark.parametrize("background", ["white", "black", "gray"])
def test_decoder_previews_show_each_shape_colour(local_pipeline, background):
    """A centred square of every colour the world draws: the preview's mean colour over the square (a quarter of
    the side, so the square's middle 4×4 preview pixels) is that of the full decode there."""
    vae = local_pipeline.vae
    for colour in SHAPE_COLORS:
        latents = vae.encode([render(Scene(colour, "square", "center", background), 128)])
        preview = np.asarray(vae.preview(latents, 128, 128)[0], float)[14:18, 14:18].mean((0, 1))
        decoded = np.asarray(vae.decode(latents, 128, 128)[0], float)[56:72, 56:72].mean((0, 1))
        assert np.abs(preview - decoded).max() < 40, (colour, background, preview.round(), decoded.round())


def test_decoder_previews_are_close_to_the_full_decode_of_generations(local_pipeline):
    """The x0-predictions a stream previews, against their full decode averaged to the preview's size: measured
    31 dB held out (`python -m lightray.world.preview_decoder`); the fitted projection reaches 18."""
    pipe, scores = local_pipeline, []
    for i, prompt in enumerate(["a red circle on the left, white background", "黑色背景，上方有一个绿色的三角形",
                                "a blue square at the bottom, gray background"]):
        previews: list[np.ndarray] = []
        spec = ImageGenerationRequest.model_validate(
            {"prompt": prompt, "seed": 70 + i, "stream": True, "partial_images": 3}).resolve(pipe.preset, 0)
        final = pipe.denoiser.denoise(spec.denoise_params(), pipe.encode(spec),
                                      on_progress=lambda p: p.preview is not None and previews.append(p.preview))
        for x in [*previews, final]:
            got = np.asarray(pipe.vae.preview(x, 128, 128)[0], float) / 255
            full = np.asarray(pipe.vae.decode(x, 128, 128)[0], float).reshape(32, 4, 32, 4, 3).mean((1, 3)) / 255
            scores.append(10 * np.log10(1 / np.mean((got - full) ** 2)))
    assert np.mean(scores) > 26, scores


def test_the_vae_deployment_makes_fast_previews_in_the_asked_format(local_pipeline):
    """`VaeDecoder.preview`: the path of a model that ships no preview decoder (the Denoiser makes them otherwise),
    here with the projection fitted at load."""
    import copy
    import io

    from deployments.vae import VaeDecoder
    from lightray.contracts import OutputEncoding

    stage = copy.copy(local_pipeline.vae)
    stage.latent_preview = fit_to_vae(stage)
    cls = VaeDecoder.func_or_class
    decoder = cls.__new__(cls)  # without __init__: the session's loaded stage
    decoder.stage = stage
    latents = stage.encode([Image.new("RGB", (128, 64), (255, 255, 255))] * 2)
    out = decoder.preview(latents, 128, 64, encoding=OutputEncoding("jpeg", 90))
    images = [Image.open(io.BytesIO(b)) for b in out.pngs]
    assert [(im.format, im.size) for im in images] == [("JPEG", (32, 16))] * 2
    assert np.asarray(images[0].convert("RGB"), float).mean() > 240  # white
    assert "preview_ms" in out.timings
