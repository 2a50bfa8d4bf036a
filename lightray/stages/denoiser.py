"""Stage 2: embeddings + seeds → packed latents (QwenImageTransformer2DModel + flow-matching scheduler).

The stage owns the LoRA state of its transformer: the Lightning LoRA of each variant is loaded once at start as a
named adapter, tenant adapters come and go through `load_adapter` / `unload_adapter`, and each call activates
exactly the adapters its job names. diffusers keeps that state on the pipeline, so calls are serialised by a lock:
two concurrent jobs never see each other's adapters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from lightray.config import ModelPreset, VariantConfig
from lightray.stages.common import generators, torch_dtype
from lightray.stages.vae import ImageLatents


@dataclasses.dataclass
class DenoiseJob:
    """Everything the denoiser needs for the n images of one request."""

    seeds: list[int]
    """One per image; len(seeds) is the batch size."""
    width: int
    height: int
    num_inference_steps: int
    prompt_embeds: np.ndarray | None = None
    """[tokens, hidden] float32, the text encoder's output for the prompt (no padding)."""
    true_cfg_scale: float = 1.0
    negative_embeds: np.ndarray | None = None
    """Embeddings of the negative prompt; required for true CFG (scale > 1)."""
    variant: str | None = None
    """Model id of the variant (selects its Lightning LoRA and scheduler); None: the preset's first."""
    adapter: str | None = None
    """Tenant adapter (its registry ref), applied on top of the variant's LoRA."""
    adapter_path: str | None = None
    """Local path of that adapter's files: loaded on first use, and again if it was evicted in the meantime."""
    adapter_scale: float = 1.0


class DenoiseCancelled(RuntimeError):
    """A job's `cancel` event was set while it ran: it stopped at the end of a step, and the stage is free."""


def _stop_when(cancel: threading.Event | None) -> dict:
    """Pipeline kwargs that end the denoising loop with `DenoiseCancelled` once `cancel` is set (checked after
    every step), so abandoned work (a request timed out, a client gone) frees the stage within a step."""
    if cancel is None:
        return {}

    def check(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if cancel.is_set():
            raise DenoiseCancelled(f"cancelled after step {step + 1} of {pipe.num_timesteps}")
        return callback_kwargs

    return {"callback_on_step_end": check}


class _KnownDevice:
    """A diffusers pipeline whose execution device is set, not searched for. diffusers finds it (and a
    model's `.device`) by walking every module of every component for offload hooks: once LoRA layers exist that
    is ~20 ms a call on the embedded model, a fifth of a whole 4-step Lightning image. A stage never offloads,
    so its pipelines run on the stage's device."""

    execution_device: torch.device

    @property
    def _execution_device(self) -> torch.device:
        return self.execution_device


class _QwenImagePipeline(_KnownDevice, QwenImagePipeline):
    pass


class _QwenImageImg2ImgPipeline(_KnownDevice, QwenImageImg2ImgPipeline):
    pass


class _QwenImageInpaintPipeline(_KnownDevice, QwenImageInpaintPipeline):
    pass


class DenoiseStage:
    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.device = preset.device
        self.dtype = torch_dtype(preset.dtype)
        self.pipe = _QwenImagePipeline.from_pretrained(
            preset.root, text_encoder=None, tokenizer=None, vae=None, dtype=self.dtype
        ).to(self.device)
        self.pipe.execution_device = torch.device(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        # Without a VAE the pipeline assumes 8×; carry the real factor so sizes and packing are right.
        self.pipe.vae_scale_factor = preset.vae_scale_factor
        base_scheduler = self.pipe.scheduler
        self.schedulers: dict[str, FlowMatchEulerDiscreteScheduler] = {}
        self.lightning: dict[str, str] = {}  # variant id -> adapter name
        for variant in preset.variants:
            self.schedulers[variant.id] = FlowMatchEulerDiscreteScheduler.from_config(
                base_scheduler.config, **variant.scheduler_overrides
            )
            if variant.lightning_lora:
                name = _adapter_name("lightning", variant.id)
                self.pipe.load_lora_weights(str(preset.resolve(variant.lightning_lora)), adapter_name=name)
                self.lightning[variant.id] = name
        self.tenant_adapters: set[str] = set()
        # The adapter activation last applied to the LoRA layers ((names, weights); None: unknown). Applying one
        # walks every module (~20 ms here), so a call that needs the same activation as the last skips it.
        # Loading or deleting an adapter changes peft's active set, so both forget it.
        self._activation: tuple | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- adapters

    def load_adapter(self, name: str, path: str) -> None:
        """Load a tenant LoRA (a folder or file in peft/diffusers format) under `name`."""
        with self._lock:
            self._load_adapter_locked(name, path)

    def _load_adapter_locked(self, name: str, path: str) -> None:
        if name in self.tenant_adapters:
            return
        self._activation = None
        self.pipe.load_lora_weights(path, adapter_name=_adapter_name("tenant", name))
        self.tenant_adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self.tenant_adapters:
                self._activation = None
                self.pipe.delete_adapters(_adapter_name("tenant", name))
                self.tenant_adapters.discard(name)

    def _activate(self, variant: VariantConfig, adapter: str | None, scale: float) -> None:
        names, weights = [], []
        if variant.id in self.lightning:
            names.append(self.lightning[variant.id])
            weights.append(1.0)
        if adapter is not None:
            if adapter not in self.tenant_adapters:
                raise KeyError(f"adapter {adapter!r} is not loaded")
            names.append(_adapter_name("tenant", adapter))
            weights.append(scale)
        if not (self.lightning or self.tenant_adapters):
            return  # no LoRA layers exist at all
        activation = (tuple(names), tuple(weights))
        if activation == self._activation:
            return
        self._activation = None  # unknown until the calls below have all succeeded
        if names:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, weights)
        else:
            self.pipe.disable_lora()
        self._activation = activation

    # ------------------------------------------------------------------------------------------ denoise

    def _conditioning(self, job: DenoiseJob) -> dict:
        """The job's embeddings as pipeline arguments. They are unpadded single-prompt embeddings, so the masks
        are all ones (which the pipeline turns into None, exactly as for its own single-prompt encodings)."""
        if job.prompt_embeds is None:
            raise ValueError("job has no prompt embeddings")
        prompt = torch.from_numpy(job.prompt_embeds)[None].to(self.device, self.dtype)
        negative = None
        if job.negative_embeds is not None and job.true_cfg_scale > 1:
            negative = torch.from_numpy(job.negative_embeds)[None].to(self.device, self.dtype)
        return {
            "prompt_embeds": prompt,
            "prompt_embeds_mask": torch.ones(prompt.shape[:2], dtype=torch.long, device=self.device),
            "negative_prompt_embeds": negative,
            "negative_prompt_embeds_mask": None if negative is None else torch.ones(
                negative.shape[:2], dtype=torch.long, device=self.device),
            "true_cfg_scale": job.true_cfg_scale,
        }

    def _prepare(self, job: DenoiseJob, pipe) -> None:
        """Under the lock: load the job's tenant adapter if it is not (or no longer) loaded, activate exactly the
        adapters the job names, and give `pipe` its variant's scheduler."""
        if job.adapter is not None and job.adapter not in self.tenant_adapters and job.adapter_path:
            self._load_adapter_locked(job.adapter, job.adapter_path)
        variant = self.preset.variant(job.variant)
        self._activate(variant, job.adapter, job.adapter_scale)
        pipe.scheduler = self.schedulers[variant.id]

    def denoise(self, job: DenoiseJob, cancel: threading.Event | None = None) -> np.ndarray:
        """Packed latents [n, tokens, 64] float32 for the job's n seeds, exactly as
        `QwenImagePipeline.__call__(..., output_type="latent")` computes them. Setting `cancel` stops it after the
        current step with `DenoiseCancelled`."""
        conditioning = self._conditioning(job)
        with self._lock, torch.inference_mode():
            self._prepare(job, self.pipe)
            latents = self.pipe(
                prompt=None,
                **conditioning,
                height=job.height,
                width=job.width,
                num_inference_steps=job.num_inference_steps,
                num_images_per_prompt=len(job.seeds),
                generator=generators(job.seeds, self.device),
                output_type="latent",
                **_stop_when(cancel),
            ).images
        return np.ascontiguousarray(latents.float().cpu().numpy())


    # ------------------------------------------------------------------------------------- image inputs

    def denoise_from_image(self, job: DenoiseJob, image: ImageLatents, strength: float,
                           mask: np.ndarray | None = None, cancel: threading.Event | None = None) -> np.ndarray:
        """Packed latents [n, tokens, 64] float32 for img2img (mask None) or inpainting, exactly as
        `QwenImageImg2ImgPipeline` / `QwenImageInpaintPipeline.__call__(..., output_type="latent")` compute them
        for `image=[picture] * n` and the job's per-seed generators.

        `image` is `VaeStage.encode_for_seeds`' output for the job's seeds; `strength` in (0, 1] trims the
        schedule (the pipelines' `get_timesteps`) and noises the image latents to its first timestep
        (`scale_noise`); `mask` is uint8 [height, width], non-zero where the image is repainted (diffusers'
        white), blended back in latent space after every step. The pipelines run here are diffusers' own, over
        this stage's transformer and schedulers, with the image given as latents (which they accept and do not
        re-encode); the adapter activation, the lock and `cancel` are the same as `denoise`'s.
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        n = len(job.seeds)
        if image.latents.shape[0] != n:
            raise ValueError(f"{image.latents.shape[0]} image latents for {n} seeds")
        if mask is not None and mask.shape != (job.height, job.width):
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, the job {job.width}x{job.height}")
        conditioning = self._conditioning(job)
        latents = torch.from_numpy(image.latents).to(self.device, self.dtype)
        # [n, z, h, w]: the layout in which the pipelines take latents as `image` (channels == latent channels).
        latents = QwenImagePipeline._unpack_latents(latents, job.height, job.width, self.preset.vae_scale_factor)[:, :, 0]
        gens = generators(job.seeds, self.device)
        if image.generator_states is not None:
            # Continue each seed's stream after the VAE's posterior draw, as the pipelines' single generator does.
            for g, state in zip(gens, image.generator_states, strict=True):
                g.set_state(torch.from_numpy(np.asarray(state, dtype=np.uint8)))
        extra = {}
        if mask is not None:
            # The pipeline builds its latent mask from this picture (resize, binarize, nearest to the latent grid).
            # masked_image_latents only stands in for the masked image's encoding, which the pipeline computes but
            # its denoising loop never reads; passing any latents skips that wasted VAE pass (and its generator
            # draws, which come after the initial noise and so change nothing).
            extra = {"mask_image": Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)),
                     "masked_image_latents": latents}
        with self._lock, torch.inference_mode():
            pipe = self._image_pipeline(inpaint=mask is not None)
            self._prepare(job, pipe)
            out = pipe(
                prompt=None,
                **conditioning,
                image=latents,
                strength=strength,
                height=job.height,
                width=job.width,
                num_inference_steps=job.num_inference_steps,
                num_images_per_prompt=n,
                generator=gens,
                output_type="latent",
                **extra,
                **_stop_when(cancel),
            ).images
        return np.ascontiguousarray(out.float().cpu().numpy())

    def _image_pipeline(self, inpaint: bool) -> QwenImageImg2ImgPipeline | QwenImageInpaintPipeline:
        """diffusers' img2img / inpaint pipeline over this stage's transformer (hence its LoRA layers), created on
        first use (under the lock). Without a VAE they would assume 8× / 16 latent channels: set the real ones."""
        pipes = self.__dict__.setdefault("_image_pipes", {})
        if inpaint not in pipes:
            cls = _QwenImageInpaintPipeline if inpaint else _QwenImageImg2ImgPipeline
            pipe = cls(scheduler=self.pipe.scheduler, vae=None, text_encoder=None, tokenizer=None,
                       transformer=self.pipe.transformer)
            pipe.execution_device = self.pipe.execution_device
            pipe.set_progress_bar_config(disable=True)
            pipe.vae_scale_factor = self.preset.vae_scale_factor
            pipe.latent_channels = self.pipe.transformer.config.in_channels // 4
            pipe.image_processor = VaeImageProcessor(
                vae_scale_factor=pipe.vae_scale_factor * 2, vae_latent_channels=pipe.latent_channels)
            if inpaint:
                pipe.mask_processor = VaeImageProcessor(
                    vae_scale_factor=pipe.vae_scale_factor * 2, vae_latent_channels=pipe.latent_channels,
                    do_normalize=False, do_binarize=True, do_convert_grayscale=True)
            pipes[inpaint] = pipe
        return pipes[inpaint]


def _adapter_name(kind: str, name: str) -> str:
    # peft adapter names become module attribute keys: no dots or slashes. The hash keeps distinct refs that
    # differ only in punctuation ("a-b/x" vs "a_b/x") from colliding.
    safe = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return f"{kind}__{safe}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
