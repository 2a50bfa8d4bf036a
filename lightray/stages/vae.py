"""Stage 3 (and the encoder for image inputs): packed latents ↔ pixels with AutoencoderKLQwenImage.

AutoencoderKLQwenImage keeps per-call state on the module (its causal-convolution feature cache, `_feat_map` /
`_conv_idx`, reset at the start of every encode and decode), so two threads in one VAE corrupt each other's images.
Ray Serve runs a replica's synchronous methods in a thread pool (the VaeDecoder takes up to
`max_ongoing_requests` at once): every VAE call here holds the stage's lock.

Two forms of the VAE (`ModelPreset.vae_exact`): diffusers' causal 3D `AutoencoderKLQwenImage` as it is, or, by
default, the same weights folded into 2D convolutions for a single frame (`SingleFrameVae`,
lightray/stages/vae_single_frame.py): equal up to the order of floating-point sums, several times faster on a CPU.

Batching decodes (`VaeStage.decode_many`, what the VaeDecoder deployment runs for the requests `serve.batch` hands
it). A request's images are always decoded in one call, as the in-process pipeline decodes them (`decode`). Whether
requests are stacked into a shared call is `stack`:

* "exact" stacks only where that is bit-identical to decoding each request alone. The 3D VAE decodes every batch
  size >= 2 alike (max abs difference 0.0 for batches of 2..9 at 64x64 and 128x128), but a batch of 1 takes
  another path from its first convolution: so its requests of one size with n >= 2 images are stacked, and a
  request of n = 1 is decoded alone. The 2D VAE's convolutions (oneDNN) are exact for no batch size: every
  request is decoded alone.
* "all" stacks every request of one size into one call: more throughput under load, at the cost of float
  reordering (up to ~2e-5 before quantisation on the embedded model, at most one grey level in rare pixels).

docs/batching.md has the numbers and timings.

Memory (`ModelPreset.vae_decode`, off for the embedded model): with `slice_images` a call decodes its images one at a
time (each as a batch of one, so stacking stays exact and only saves lock round trips), and above
`tile_above_pixels` a decode is tiled, which approximates (docs/real_model.md has the measured difference).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

import diffusers
import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from lightray.config import ModelPreset
from lightray.contracts import ConditionLatents, ImageLatents
from lightray.models.qwen_image_edit import condition_size
from lightray.stages.common import HealthProbe, check_parameter_dtype, generators, torch_dtype
from lightray.stages.preview import Preview, load_preview
from lightray.stages.vae_single_frame import SingleFrameVae

StackPolicy = Literal["exact", "all"]


class VaeStage:
    """The family's VAE (`ModelFamily.vae_class`). Qwen-Image-2.1's (`AutoencoderKLQwenImage21`: 16×, 64 latent
    channels, unpatched tokens, RGBA pixels) runs as diffusers runs it: the single-frame form and img2img are
    Qwen-Image's only."""

    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.device = preset.device
        self.family = preset.model_family
        self.unpatched = self.family.latent_patch == 1
        vae_class = getattr(diffusers, self.family.vae_class)
        self.vae = vae_class.from_pretrained(preset.root / "vae", dtype=torch_dtype(preset.dtype)).to(self.device).eval()
        check_parameter_dtype(self.vae, torch_dtype(preset.dtype), "vae")
        if not (preset.vae_exact or self.unpatched):
            # The 3D model is dropped here: only the folded kernels (copied once) and the shared 1x1 ones stay.
            self.vae = SingleFrameVae(self.vae)
        self.exact_stack_from: int | None = 2 if preset.vae_exact and not self.unpatched else None
        """The smallest n whose requests stack bit-exactly with each other (module docstring); None: no n."""
        self.scale_factor = 2 ** len(self.vae.temperal_downsample)
        self._lock = threading.Lock()  # see the module docstring
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.scale_factor * self.family.latent_patch)
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1)
        memory = preset.vae_decode
        if memory.slice_images:
            self.vae.enable_slicing()
        if memory.tile_above_pixels is not None:
            # Sets the tile geometry; whether a call tiles is decided per call (`_tiling`), by its size.
            self.vae.enable_tiling(tile_sample_min_height=memory.tile_size, tile_sample_min_width=memory.tile_size,
                                   tile_sample_stride_height=memory.tile_stride,
                                   tile_sample_stride_width=memory.tile_stride)
        self.vae.use_tiling = False
        self._health = HealthProbe("vae", self._probe_forward)
        # Streamed previews without the VAE: the folder's distilled preview decoder, or a latent-to-RGB projection
        # fitted to this VAE's encoder (one encode of 32 small images at load; lightray/stages/preview.py).
        self.latent_preview: Preview = load_preview(self)

    @torch.inference_mode()
    def _probe_forward(self) -> torch.Tensor:
        """The VAE's `post_quant_conv` on one latent pixel: a real kernel on the device, with the decoder's first
        weights, that keeps no state, so it runs without the VAE lock (a probe that waited behind a long decode
        would time out on a healthy replica) and changes nothing for a decode in progress."""
        z = torch.ones((1, self.vae.config.z_dim, 1, 1, 1), device=self.device, dtype=self.vae.dtype)
        return self.vae.post_quant_conv(z[:, :, 0] if isinstance(self.vae, SingleFrameVae) else z)

    def check_health(self, timeout_s: float | None = None) -> None:
        """Raise unless the VAE still computes finite output on its device within the timeout (`HealthProbe`)."""
        self._health.check(timeout_s)

    @contextlib.contextmanager
    def _tiling(self, height: int, width: int) -> Iterator[None]:
        """Hold the VAE (see the module docstring) with tiling on exactly when the preset tiles this size."""
        with self._lock:
            self.vae.use_tiling = self.preset.vae_decode.tiles(height, width)
            try:
                yield
            finally:
                self.vae.use_tiling = False

    @torch.inference_mode()
    def decode(self, packed: np.ndarray, height: int, width: int) -> list[Image.Image]:
        """Packed latents [n, tokens, 64] (the denoiser's output) → n RGB images, as QwenImagePipeline decodes (2.1:
        RGBA images, as `QwenImage21DecodeStep`)."""
        latents = torch.from_numpy(packed).to(self.device)
        if self.unpatched:
            return self._decode_unpatched(latents, height, width)
        latents = QwenImagePipeline._unpack_latents(latents, height, width, self.scale_factor)
        latents = latents.to(self.vae.dtype)
        mean = self.latents_mean.to(latents.device, latents.dtype)
        # The pipeline's exact ops: divide by 1/std, the reciprocal taken after the cast to the latents' dtype (in
        # bfloat16, 1/bf16(std) and bf16(1/std) differ).
        std_inv = 1.0 / self.latents_std.to(latents.device, latents.dtype)
        latents = latents / std_inv + mean
        with self._tiling(height, width):
            image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type="pil")

    def _decode_unpatched(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """2.1's `QwenImage21UnpackLatentsStep` and `QwenImage21DecodeStep`: unpacked, `z · std + mean`, decoded."""
        from diffusers.modular_pipelines.qwenimage21.decoders import unpack_latents

        latents = unpack_latents(latents, height, width, self.scale_factor).to(self.vae.dtype)
        mean = self.latents_mean.to(latents.device, latents.dtype)
        std = self.latents_std.to(latents.device, latents.dtype)
        with self._tiling(height, width):
            image = self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type="pil")

    def preview(self, packed: np.ndarray, height: int, width: int) -> list[Image.Image]:
        """Packed latents [n, tokens, 64] → n cheap RGB previews of a quarter of height×width's side
        (`lightray.stages.preview`): no VAE call, so no lock, and well under a millisecond at 128²."""
        return self.latent_preview.images(packed, height, width)

    def decode_plan(self, requests: list[tuple[np.ndarray, int, int]], max_images: int | None = None,
                    stack: StackPolicy = "exact") -> list[list[int]]:
        """Indices of `requests` ((packed [n, tokens, 64], height, width) each) grouped into VAE calls, in order of
        first appearance: per size, the requests that `stack` lets share a call (module docstring) together, in
        calls of at most `max_images` images (a request is never split); every other request alone."""
        return stack_plan(requests, max_images, 1 if stack == "all" else self.exact_stack_from)

    def decode_calls(self, requests: list[tuple[np.ndarray, int, int]], max_images: int | None = None,
                     stack: StackPolicy = "exact") -> Iterator[list[tuple[int, list[Image.Image]]]]:
        """The VAE calls of `decode_plan`, one at a time (so a caller can time each): per call, (request index,
        its images) for the requests it decoded."""
        for call in self.decode_plan(requests, max_images, stack):
            _, height, width = requests[call[0]]
            images = self.decode(np.concatenate([requests[i][0] for i in call]), height, width)
            done, start = [], 0
            for i in call:
                n = len(requests[i][0])
                done.append((i, images[start:start + n]))
                start += n
            yield done

    def decode_many(self, requests: list[tuple[np.ndarray, int, int]], max_images: int | None = None,
                    stack: StackPolicy = "exact") -> list[list[Image.Image]]:
        """`[decode(*r) for r in requests]` in the VAE calls of `decode_plan`: bit for bit with "exact"."""
        out: dict[int, list[Image.Image]] = {}
        for call in self.decode_calls(requests, max_images, stack):
            out.update(call)
        return [out[i] for i in range(len(requests))]

    # ------------------------------------------------------------------------------------- image inputs

    def _posterior(self, image: Image.Image, height: int | None, width: int | None):
        """The VAE posterior of one image, preprocessed as the img2img/inpaint pipelines do (lanczos resize to
        height×width, [-1, 1], one frame) and encoded alone (batch 1, as they encode image[i : i + 1])."""
        x = self.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        x = x.unsqueeze(2).to(device=self.device, dtype=self.vae.dtype)
        with self._lock:
            return self.vae.encode(x).latent_dist

    def _normalise_and_pack(self, z: torch.Tensor, divide: bool = False) -> np.ndarray:
        """[b, z, 1, h, w] raw latents → [b, tokens, 4·z] normalised and packed, with the pipelines' exact ops:
        `(z - mean) * (1 / std)`, the reciprocal taken after the cast to the latents' dtype (img2img, inpainting),
        or with `divide` `(z - mean) / std` (the Edit pipelines' `_encode_vae_image`)."""
        c = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        z = (z - mean) / std if divide else (z - mean) * (1.0 / std)
        b, _, _, h, w = z.shape
        packed = QwenImagePipeline._pack_latents(z[:, :, 0], b, c, h, w)
        return np.ascontiguousarray(packed.float().cpu().numpy())

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """[b, 3, 1, h, w] pixels in [-1, 1] → normalised packed latents [b, tokens, 4·z] float32, from the
        posterior's mean, in one VAE call (the trainer's caching pass: images already at their bucket size). 2.1:
        the pixels with an opaque alpha (the RGBA its pipelines make of an RGB picture), normalised as
        `encode_vae_image` and unpatched (`pack_latents`): [b, tokens, z]."""
        x = pixels.to(device=self.device, dtype=self.vae.dtype)
        if self.unpatched:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        with self._lock:
            z = self.vae.encode(x).latent_dist.mode()
        if self.unpatched:
            from diffusers.modular_pipelines.qwenimage21.inputs import pack_latents

            mean = self.latents_mean.to(z.device, z.dtype)
            z = (z - mean) / self.latents_std.to(z.device, z.dtype)
            return np.ascontiguousarray(pack_latents(z).float().cpu().numpy())
        return self._normalise_and_pack(z)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], height: int | None = None, width: int | None = None) -> np.ndarray:
        """RGB images → normalised packed latents [len(images), tokens, 4·z] float32 (the denoiser's layout),
        from the posterior's mean (mode "argmax"): deterministic, the same for every seed. Images are resized
        to height×width (default: their own size, floored to a multiple of 16) with the pipelines' lanczos."""
        return self._normalise_and_pack(torch.cat([self._posterior(im, height, width).mode() for im in images]))

    def condition_size(self, image: Image.Image, width: int, height: int) -> tuple[int, int]:
        """(width, height) an instruction edit's input image is encoded at: the preset's `edit.vae_image_area` at
        the image's aspect ratio (`QwenImageEditPlusPipeline`), or the output's width × height when it has none."""
        area = self.preset.edit.vae_image_area
        return (width, height) if area is None else condition_size(image.size, area)

    @torch.inference_mode()
    def encode_conditions(self, images: list[Image.Image], width: int, height: int) -> ConditionLatents:
        """An instruction edit's input images as condition tokens for an output of width × height, exactly as
        `QwenImageEditPlusPipeline` computes its `image_latents`: each image resized (`condition_size`) and
        preprocessed, encoded alone, the posterior's mean normalised and packed, the images concatenated. 2.1: each
        image resized to the output's area and encoded as `QwenImage21VaeEncoderStep`
        (`lightray.models.qwen_image_21.conditioning`)."""
        if self.unpatched:
            from lightray.models.qwen_image_21.conditioning import encode_conditions, resize_conditions

            with self._lock:
                latents, grids = encode_conditions(self.vae, resize_conditions(images, width * height))
            return ConditionLatents(np.ascontiguousarray(latents.float().cpu().numpy()), grids)
        parts, grids = [], []
        for image in images:
            w, h = self.condition_size(image, width, height)
            packed = self._normalise_and_pack(self._posterior(image, h, w).mode(), divide=True)[0]
            parts.append(packed)
            grids.append((h // (self.scale_factor * 2), w // (self.scale_factor * 2)))
        return ConditionLatents(np.ascontiguousarray(np.concatenate(parts)), tuple(grids))

    @torch.inference_mode()
    def encode_for_seeds(self, image: Image.Image, seeds: list[int], height: int | None = None,
                         width: int | None = None, mode: str | None = None) -> ImageLatents:
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
        return ImageLatents(self._normalise_and_pack(torch.cat(samples)), tuple(states))



def stack_plan(requests: list[tuple[np.ndarray, int, int]], max_images: int | None,
               stack_from: int | None) -> list[list[int]]:
    """`VaeStage.decode_plan`'s grouping: requests of n >= `stack_from` images (None: none) share calls per size,
    capped at `max_images` images a call; the others go alone."""
    plan: list[list[int]] = []
    open_calls: dict[tuple[int, int], list[int]] = {}
    images: dict[tuple[int, int], int] = {}
    for i, (packed, height, width) in enumerate(requests):
        n = len(packed)
        if stack_from is None or n < stack_from:
            plan.append([i])
            continue
        key = (height, width)
        call = open_calls.get(key)
        if call is None or (max_images is not None and images[key] + n > max_images):
            call = open_calls[key] = []
            images[key] = 0
            plan.append(call)
        call.append(i)
        images[key] += n
    return plan
