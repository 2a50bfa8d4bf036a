"""Stage 2: embeddings + seeds → packed latents (QwenImageTransformer2DModel + flow-matching scheduler).

The stage owns the LoRA state of its transformer: the Lightning LoRA of each variant is loaded once at start as a
named adapter, tenant adapters come and go through `load_adapter` / `unload_adapter`, and each call activates
exactly the adapters its job names. diffusers keeps that state on the pipeline, so calls are serialised by a lock:
two concurrent jobs never see each other's adapters.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from lightray.config import ModelPreset, VariantConfig
from lightray.stages.common import generators, torch_dtype


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
    """Name of a tenant adapter already loaded with `load_adapter`, applied on top of the variant's LoRA."""
    adapter_scale: float = 1.0


class DenoiseStage:
    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.device = preset.device
        self.dtype = torch_dtype(preset.dtype)
        self.pipe = QwenImagePipeline.from_pretrained(
            preset.root, text_encoder=None, tokenizer=None, vae=None, dtype=self.dtype
        ).to(self.device)
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
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- adapters

    def load_adapter(self, name: str, path: str) -> None:
        """Load a tenant LoRA (a folder or file in peft/diffusers format) under `name`."""
        with self._lock:
            self.pipe.load_lora_weights(path, adapter_name=_adapter_name("tenant", name))
            self.tenant_adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self.tenant_adapters:
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
        if names:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, weights)
        else:
            self.pipe.disable_lora()

    # ------------------------------------------------------------------------------------------ denoise

    def denoise(self, job: DenoiseJob) -> np.ndarray:
        """Packed latents [n, tokens, 64] float32 for the job's n seeds, exactly as
        `QwenImagePipeline.__call__(..., output_type="latent")` computes them."""
        if job.prompt_embeds is None:
            raise ValueError("job has no prompt embeddings")
        variant = self.preset.variant(job.variant)
        prompt = torch.from_numpy(job.prompt_embeds)[None].to(self.device, self.dtype)
        negative = None
        if job.negative_embeds is not None and job.true_cfg_scale > 1:
            negative = torch.from_numpy(job.negative_embeds)[None].to(self.device, self.dtype)
        with self._lock, torch.inference_mode():
            self._activate(variant, job.adapter, job.adapter_scale)
            self.pipe.scheduler = self.schedulers[variant.id]
            latents = self.pipe(
                prompt=None,
                prompt_embeds=prompt,
                # Unpadded single-prompt embeddings: all-ones masks (which the pipeline turns into None, exactly
                # as it does for its own single-prompt encodings).
                prompt_embeds_mask=torch.ones(prompt.shape[:2], dtype=torch.long, device=self.device),
                negative_prompt_embeds=negative,
                negative_prompt_embeds_mask=None if negative is None else torch.ones(
                    negative.shape[:2], dtype=torch.long, device=self.device),
                true_cfg_scale=job.true_cfg_scale,
                height=job.height,
                width=job.width,
                num_inference_steps=job.num_inference_steps,
                num_images_per_prompt=len(job.seeds),
                generator=generators(job.seeds, self.device),
                output_type="latent",
            ).images
        return np.ascontiguousarray(latents.float().cpu().numpy())


def _adapter_name(kind: str, name: str) -> str:
    # peft adapter names become module attribute keys: no dots or slashes.
    return f"{kind}__" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)
