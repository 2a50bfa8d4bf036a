"""The single-frame VAE (lightray/stages/vae_single_frame.py) against diffusers' causal 3D `AutoencoderKLQwenImage`:
the same weights, equal up to the order of float sums. The README's "Numerics" section states these tolerances;
the tests measure them over many latents and sizes, with slicing and tiling on and off, on the embedded VAE
(float32) and on a VAE of the real layout in bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

from lightray.stages.vae_single_frame import TOLERANCE_GREY_LEVELS, FoldedConv2d, SingleFrameVae
from mini_real import MINI_VAE_BASE_DIM, QWEN_IMAGE_VAE_CONFIG

FLOAT32_TOLERANCE = {"grey_max": TOLERANCE_GREY_LEVELS[torch.float32], "float_max": 5e-5, "encode_max": 1e-5}
BFLOAT16_TOLERANCE = {"grey_max": TOLERANCE_GREY_LEVELS[torch.bfloat16], "grey_mean": 0.5}


def grey(x: torch.Tensor) -> np.ndarray:
    """VaeImageProcessor's quantisation of decoder output: [-1, 1] → 0..255."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().numpy().astype(int)


@pytest.fixture(scope="module")
def embedded(preset) -> tuple[AutoencoderKLQwenImage, SingleFrameVae]:
    vae = AutoencoderKLQwenImage.from_pretrained(preset.root / "vae").eval()
    return vae, SingleFrameVae(vae)


@pytest.fixture(scope="module")
def real_layout_bf16() -> tuple[AutoencoderKLQwenImage, SingleFrameVae]:
    torch.manual_seed(0)
    config = {k: v for k, v in QWEN_IMAGE_VAE_CONFIG.items() if not k.startswith("_")}
    vae = AutoencoderKLQwenImage(**{**config, "base_dim": MINI_VAE_BASE_DIM}).to(torch.bfloat16).eval()
    return vae, SingleFrameVae(vae)


def latents(seed: int, n: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 16, 1, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)


@torch.inference_mode()
def test_decode_matches_diffusers_over_many_latents_and_sizes(embedded):
    vae, folded = embedded
    worst_grey, worst_float = 0, 0.0
    for seed, (h, w) in enumerate([(8, 8), (16, 16), (24, 16), (16, 24), (12, 12), (32, 32)]):
        z = latents(seed, 3, h, w) * 1.5  # wider than N(0, 1): saturated pixels too
        theirs, ours = vae.decode(z, return_dict=False)[0], folded.decode(z)[0]
        assert ours.shape == theirs.shape == (3, 3, 1, 8 * h, 8 * w)
        worst_float = max(worst_float, (ours - theirs).abs().max().item())
        worst_grey = max(worst_grey, np.abs(grey(ours) - grey(theirs)).max())
    assert worst_float <= FLOAT32_TOLERANCE["float_max"], worst_float
    assert worst_grey <= FLOAT32_TOLERANCE["grey_max"], worst_grey
    assert worst_float > 0  # float sums are reordered: a test that compared one model with itself would read 0


@torch.inference_mode()
def test_encode_matches_diffusers(embedded):
    vae, folded = embedded
    for seed, (h, w) in enumerate([(64, 64), (128, 96), (96, 128)]):
        x = torch.rand(2, 3, 1, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        theirs, ours = vae.encode(x).latent_dist, folded.encode(x).latent_dist
        assert ours.mean.shape == theirs.mean.shape == (2, 16, 1, h // 8, w // 8)
        assert (ours.mean - theirs.mean).abs().max().item() <= FLOAT32_TOLERANCE["encode_max"]
        assert (ours.logvar - theirs.logvar).abs().max().item() <= 10 * FLOAT32_TOLERANCE["encode_max"]


@torch.inference_mode()
@pytest.mark.parametrize("slicing", [False, True])
@pytest.mark.parametrize("tiling", [False, True])
def test_slicing_and_tiling_match_diffusers_doing_the_same(preset, slicing, tiling):
    """Tiles of 64 px every 48 px over a 128x96 image: several tiles, blended over their overlap, as diffusers."""
    vae = AutoencoderKLQwenImage.from_pretrained(preset.root / "vae").eval()
    folded = SingleFrameVae(vae)
    for model in (vae, folded):
        if slicing:
            model.enable_slicing()
        if tiling:
            model.enable_tiling(64, 64, 48, 48)
    z = latents(7, 2, 12, 16)
    theirs, ours = vae.decode(z, return_dict=False)[0], folded.decode(z)[0]
    assert np.abs(grey(ours) - grey(theirs)).max() <= FLOAT32_TOLERANCE["grey_max"]
    x = torch.rand(2, 3, 1, 96, 128, generator=torch.Generator().manual_seed(3)) * 2 - 1
    e_theirs, e_ours = vae.encode(x).latent_dist.mean, folded.encode(x).latent_dist.mean
    assert (e_ours - e_theirs).abs().max().item() <= FLOAT32_TOLERANCE["encode_max"]
    if tiling:  # the tiled path really ran: it differs from a whole decode
        whole = SingleFrameVae(AutoencoderKLQwenImage.from_pretrained(preset.root / "vae").eval()).decode(z)[0]
        assert (whole - ours).abs().max().item() > 1e-3


@torch.inference_mode()
def test_bfloat16_real_layout_within_its_tolerance(real_layout_bf16):
    vae, folded = real_layout_bf16
    diffs = []
    for seed, (h, w) in enumerate([(8, 8), (16, 16), (16, 32), (32, 16)]):
        z = latents(seed, 2, h, w, torch.bfloat16)
        theirs, ours = vae.decode(z, return_dict=False)[0], folded.decode(z)[0]
        assert ours.dtype == torch.bfloat16 and grey(theirs).std() > 5  # a picture, not a constant
        diffs.append(np.abs(grey(ours) - grey(theirs)))
    worst = max(d.max() for d in diffs)
    mean = float(np.mean([d.mean() for d in diffs]))
    assert worst <= BFLOAT16_TOLERANCE["grey_max"] and mean <= BFLOAT16_TOLERANCE["grey_mean"], (worst, mean)


def test_every_causal_conv_is_folded_once_and_weights_are_not_copied_per_call(embedded):
    vae, folded = embedded
    # Every causal conv the first frame runs (all but the resamplers' time convs) has its folded twin.
    first_frame = [m for name, m in vae.named_modules()
                   if isinstance(m, QwenImageCausalConv3d) and not name.endswith("time_conv")]
    folds = [m for m in folded.modules() if isinstance(m, FoldedConv2d)]
    assert len(folds) == len(first_frame) > 20
    # Copied once, at build, as channels-last 2D kernels; a decode reuses them.
    ptrs = [p.data_ptr() for p in folded.parameters()]
    with torch.inference_mode():
        folded.decode(latents(0, 1, 8, 8))
    assert [p.data_ptr() for p in folded.parameters()] == ptrs
    assert all(f.weight.ndim == 4 and f.weight.is_contiguous(memory_format=torch.channels_last) for f in folds)


def test_a_video_latent_is_refused(embedded):
    _, folded = embedded
    with pytest.raises(ValueError, match="one frame"):
        folded.decode(latents(0, 1, 8, 8).expand(1, 16, 2, 8, 8))


def test_the_stage_runs_the_single_frame_vae_unless_exact(preset, local_pipeline, exact_vae):
    assert isinstance(local_pipeline.vae.vae, SingleFrameVae)
    assert isinstance(exact_vae.vae, AutoencoderKLQwenImage) and exact_vae.exact_stack_from == 2
    packed = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
    fast = np.stack([np.asarray(im, dtype=int) for im in local_pipeline.vae.decode(packed, 128, 128)])
    exact = np.stack([np.asarray(im, dtype=int) for im in exact_vae.decode(packed, 128, 128)])
    assert np.abs(fast - exact).max() <= FLOAT32_TOLERANCE["grey_max"]
    local_pipeline.vae.check_health()
    exact_vae.check_health()

