"""Cheap streamed previews: a latent-to-RGB linear projection fitted to the model's own VAE at load.

A streamed request's previews (`partial_images`) are x0-predictions of the final latents. Decoding each with the
full VAE costs as much as decoding the final image (on the embedded model at 128², about two Lightning steps per
preview: three previews added ~75 % to a request, issue 27). A preview only has to show the image forming, so
`preview: "fast"` (the default) projects each latent pixel to one RGB colour instead: `rgb = latent · W + b`,
16 latent channels → 3, then a 2× bilinear upsample. The preview is a quarter of the output's side (the VAE
downsamples 8×, the projection gives one colour per latent pixel, the upsample doubles it), and costs well under a
millisecond (docs/streaming.md has the figures). ComfyUI's latent previews work the same way.

The projection is fitted at load, by least squares, to the VAE it stands in for (so a preset with other weights
gets its own fit, and nothing is shipped or kept in step with the weights): a small fixed set of synthetic images
(coloured blocks spanning the RGB cube on white, black and grey backgrounds; `fit_images`) is encoded by the
stage's own encoder to the normalised packed latents the denoiser works in, and each latent pixel's colour target
is its image's 8×8 pixel block, averaged. Deterministic: the same weights give the same fit.

What it is good for depends on the VAE. Qwen-Image's VAE (the Wan 2.1 VAE) is close to linear in colour, which is
why ComfyUI ships a 16×3 matrix for it. The embedded model's small VAE is not: on its generations the projection
gets the layout and the background right (white, black, grey) but not the shapes' colours, which come out dark or
greyish (docs/streaming.md: measured, and why no per-pixel fit can do better there). For such a VAE a model folder
ships a distilled preview decoder (`PreviewDecoder`, `vae/preview_decoder.safetensors`): a few small convolutions
that see each latent pixel's neighbourhood, trained on the model's own decodes (the embedded model's:
`python -m lightray.world.preview_decoder`). `load_preview` takes it when the folder has one, and fits the projection
otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

PREVIEW_DECODER_FILE = "preview_decoder.safetensors"
"""A distilled preview decoder's weights, in the model folder's `vae/` (its config in the file's metadata)."""

FIT_IMAGE_SIDE = 64
"""Side of the synthetic fit images (a 64×64 image is an 8×8 latent grid with the VAE's 8× downsampling)."""
PREVIEW_UPSCALE = 2
"""Preview pixels per latent pixel along each side (bilinear): 2 gives a quarter of the output's side."""
RIDGE = 1e-3
"""Ridge penalty on the projection's weights, relative to the mean latent energy of the fit set: keeps a latent
channel that the synthetic images barely move from getting a large weight that would amplify it on generated
latents."""

_LEVELS = (0, 64, 128, 192, 255)
"""Levels per RGB channel of the fit colours: the 125 colours of this 5×5×5 grid span the RGB cube."""
_BACKGROUNDS = ((255, 255, 255), (0, 0, 0), (128, 128, 128))
"""Backgrounds of the fit images, in turn (white, black and grey: the embedded model draws on these, and a flat
background is most of most pictures)."""


def fit_images(side: int = FIT_IMAGE_SIDE) -> np.ndarray:
    """The synthetic fit set, uint8 [32, side, side, 3], fixed and deterministic (no RNG): the 125 colours of the
    5-level RGB grid, four per image as side/4-pixel blocks (two latent pixels square at 64×64, on the latent grid)
    on a white, black or grey background in turn.

    Blocks on backgrounds rather than solid images: measured on the embedded model's own generations (held-out
    PSNR in docs/streaming.md), this set fits 2-3 dB better than solid colours, block mosaics and gradients; the
    VAE's latent of a colour depends on what surrounds it, and pictures are mostly a background with things on it.
    """
    grid = np.array([(r, g, b) for r in _LEVELS for g in _LEVELS for b in _LEVELS], np.uint8)
    block, far = side // 4, side - side // 4 - side // 8
    corners = ((side // 8, side // 8), (side // 8, far), (far, side // 8), (far, far))
    images = []
    for i, first in enumerate(range(0, len(grid), 4)):
        image = np.broadcast_to(np.array(_BACKGROUNDS[i % len(_BACKGROUNDS)], np.uint8), (side, side, 3)).copy()
        for k, (top, left) in enumerate(corners):
            image[top:top + block, left:left + block] = grid[(first + k) % len(grid)]
        images.append(image)
    return np.stack(images)


def unpack_latents(packed: np.ndarray, height: int, width: int, scale_factor: int, patch: int = 2) -> np.ndarray:
    """Packed latents [n, tokens, 4·c] (2×2 patches, the denoiser's layout) → [n, h, w, c] on the latent grid
    (h = height / scale_factor): `QwenImagePipeline._unpack_latents`, channels last, in numpy. `patch` 1: unpatched
    tokens [n, tokens, c], one per latent pixel (Qwen-Image-2.1)."""
    if patch == 1:
        return packed.reshape(packed.shape[0], height // scale_factor, width // scale_factor, packed.shape[2])
    n, _, packed_channels = packed.shape
    h, w = 2 * (height // (scale_factor * 2)), 2 * (width // (scale_factor * 2))
    c = packed_channels // 4
    return packed.reshape(n, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(n, h, w, c)


def upsample2x(x: np.ndarray) -> np.ndarray:
    """[n, h, w, k] → [n, 2h, 2w, k], bilinear with half-pixel centres and edge clamping (torch's
    `interpolate(scale_factor=2, mode="bilinear", align_corners=False)`): each output pixel is 3/4 of its
    source pixel and 1/4 of the nearer neighbour along each axis."""
    for axis in (1, 2):
        before = np.concatenate([np.take(x, [0], axis), np.take(x, np.arange(x.shape[axis] - 1), axis)], axis)
        after = np.concatenate([np.take(x, np.arange(1, x.shape[axis]), axis), np.take(x, [-1], axis)], axis)
        even, odd = 0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after
        x = np.stack([even, odd], axis + 1).reshape(*x.shape[:axis], 2 * x.shape[axis], *x.shape[axis + 1:])
    return x


@dataclasses.dataclass(frozen=True)
class LatentPreview:
    """The fitted projection: `rgb = latent · weight + bias`, RGB in [0, 1], per latent pixel."""

    weight: np.ndarray
    """[c, 3] float32, over the normalised latent channels (the denoiser's, not the VAE's raw latents)."""
    bias: np.ndarray
    """[3] float32."""
    scale_factor: int
    """The VAE's spatial downsampling (8; 16 for Qwen-Image-2.1): output pixels per latent pixel along each side."""
    patch: int = 2
    """Latent pixels along a token's side (`ModelFamily.latent_patch`: 1 for 2.1's unpatched tokens)."""

    def rgb(self, packed: np.ndarray, height: int, width: int) -> np.ndarray:
        """Packed latents [n, tokens, 4·c] → float RGB [n, h, w, 3] in about [0, 1] on the latent grid."""
        latents = unpack_latents(np.asarray(packed, np.float32), height, width, self.scale_factor, self.patch)
        return latents @ self.weight + self.bias

    def images(self, packed: np.ndarray, height: int, width: int) -> list[Image.Image]:
        """Packed latents [n, tokens, 4·c] for height×width images → n RGB previews, a quarter of the side."""
        return to_images(upsample2x(self.rgb(packed, height, width)))


def to_images(rgb: np.ndarray) -> list[Image.Image]:
    """Float RGB [n, h, w, 3] in about [0, 1] → n 8-bit RGB images."""
    return [Image.fromarray(p) for p in (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)]


class Preview(Protocol):
    """What makes fast previews (`VaeStage.preview`): packed latents → RGB images of a quarter of the side."""

    def images(self, packed: np.ndarray, height: int, width: int) -> list[Image.Image]: ...


class PreviewDecoder(nn.Module):
    """A distilled preview decoder: normalised latents [n, c, h, w] → RGB [n, 3, 2h, 2w] in about [0, 1]. `depth`
    3×3 convolutions see each latent pixel's (2·depth + 1)² neighbourhood (where a small VAE's decoder takes hue
    from), and a 1×1 one gives the 2×2 output pixels of each latent pixel (pixel shuffle). About 45 k parameters
    at width 48 and depth 3: under half a millisecond at 128² on one CPU thread."""

    def __init__(self, latent_channels: int = 16, width: int = 48, depth: int = 3):
        super().__init__()
        self.config = {"latent_channels": latent_channels, "width": width, "depth": depth}
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(latent_channels if i == 0 else width, width, 3, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(width, 3 * PREVIEW_UPSCALE**2, 1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(self.net(latents), PREVIEW_UPSCALE)

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"config": json.dumps(self.config)})

    @classmethod
    def load(cls, path: Path) -> "PreviewDecoder":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            config = json.loads(f.metadata()["config"])
        decoder = cls(**config)
        decoder.load_state_dict(load_file(str(path)))
        return decoder.eval()


@dataclasses.dataclass
class DecoderPreview:
    """Fast previews from a `PreviewDecoder` (float32, on the CPU: a preview is a few thousand pixels)."""

    decoder: PreviewDecoder
    scale_factor: int

    @torch.inference_mode()
    def rgb(self, packed: np.ndarray, height: int, width: int) -> np.ndarray:
        """Packed latents [n, tokens, 4·c] → float RGB [n, 2h, 2w, 3] in about [0, 1]."""
        latents = unpack_latents(np.asarray(packed, np.float32), height, width, self.scale_factor)
        x = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
        return self.decoder(x).permute(0, 2, 3, 1).numpy()

    def images(self, packed: np.ndarray, height: int, width: int) -> list[Image.Image]:
        return to_images(self.rgb(packed, height, width))


def shipped_preview(preset) -> DecoderPreview | None:
    """The model folder's distilled preview decoder (`vae/preview_decoder.safetensors`), or None when it ships none.
    Needs no VAE, so the Denoiser makes fast previews with it where the latents are, without a hop."""
    path = preset.root / "vae" / PREVIEW_DECODER_FILE
    if not path.is_file():
        return None
    return DecoderPreview(PreviewDecoder.load(path), preset.vae_scale_factor)


def load_preview(stage) -> Preview:
    """The fast-preview maker for a `lightray.stages.vae.VaeStage`: the model folder's distilled decoder when it
    ships one, else the projection fitted to the stage's VAE now."""
    return shipped_preview(stage.preset) or fit_to_vae(stage)


def fit_latent_preview(encode: Callable[[np.ndarray], np.ndarray], scale_factor: int,
                       images: np.ndarray | None = None, patch: int = 2) -> LatentPreview:
    """Least-squares fit of the projection to a VAE: `encode` (uint8 images [k, s, s, 3] → normalised packed
    latents [k, tokens, 4·c], the stage's own encoder) on `images` (default `fit_images()`), each latent pixel's
    target the mean of its scale_factor² pixel block, in [0, 1]. A small ridge on the weights (`RIDGE`), none on
    the bias."""
    images = fit_images() if images is None else images
    k, side, _, _ = images.shape
    latents = unpack_latents(encode(images), side, side, scale_factor, patch)  # [k, cells, cells, c]
    cells = side // scale_factor
    target = images.astype(np.float64).reshape(k, cells, scale_factor, cells, scale_factor, 3).mean((2, 4)) / 255.0
    x = latents.astype(np.float64).reshape(-1, latents.shape[-1])
    y = target.reshape(-1, 3)
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    penalty = np.eye(design.shape[1]) * RIDGE * len(x) * np.mean(x**2)
    penalty[-1, -1] = 0.0
    solution = np.linalg.solve(design.T @ design + penalty, design.T @ y)
    return LatentPreview(solution[:-1].astype(np.float32), solution[-1].astype(np.float32), scale_factor, patch)


def fit_to_vae(stage) -> LatentPreview:
    """The projection for a `lightray.stages.vae.VaeStage`, fitted with its own encoder (`encode_pixels`, in one
    VAE call; 2.1: `encode_conditions`, an image a call, as it encodes condition pictures) on `fit_images()`."""
    if stage.unpatched:
        def encode_each(images: np.ndarray) -> np.ndarray:
            pictures = [Image.fromarray(im) for im in images]
            tokens = [stage.encode_conditions([p], p.width, p.height).latents for p in pictures]
            return np.stack(tokens)

        return fit_latent_preview(encode_each, stage.scale_factor, patch=1)

    def encode(images: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).unsqueeze(2)
        return stage.encode_pixels(pixels.float() / 127.5 - 1.0)  # [k, 3, 1, s, s] in [-1, 1]

    return fit_latent_preview(encode, stage.scale_factor)
