"""Qwen-Image-2.1 (base and Turbo): one single-stream transformer that generates from a prompt and edits with 0-3
condition images, `QwenImage21ModularPipeline` / `QwenImage21TurboModularPipeline` (diffusers 0.42,
`diffusers/modular_pipelines/qwenimage21/`).

What differs from Qwen-Image:

* **Conditioning.** A Qwen3-VL encoder reads the prompt and the condition images in one chat template; the
  condition images' VAE latents replace the encoder's image slots in the transformer's sequence (one slot per 2×2
  latent tokens), and the target image's tokens follow the text (`conditioning`).
* **Packing.** The 16× VAE's 64-channel latents enter unpatched: one token per latent pixel (`latent_patch` 1).
* **Block-causal attention.** The joint sequence is causal, each image block bidirectional inside
  (`QwenImage21AttnProcessor`); text and condition tokens are modulated at t = 0 (`causal_condition`), so their
  keys and values do not change between steps: the transformer caches them per layer (`prefix_cache`), and a
  request keeps that cache from its first forward to its last (`lightray.engine.prefix_cache`).
* **Sampling.** The base: the Qwen-Image schedule (linspace sigmas, resolution-dependent shift), plain CFG
  (`ClassifierFreeGuidance`, no norm rescale), each CFG branch in its own forward. Turbo: the checkpoint's own
  `sample_sigmas` (its `model_index.json`), no guidance.

This module imports no torch (the ingress reads families).
"""

from __future__ import annotations

import json
from pathlib import Path

from lightray.models.base import ModelFamily

MAX_CONDITION_IMAGES = 3
"""Condition images a request takes (the 2.1 pipelines' image-conditioned mode, as Edit-Plus's 1-3)."""

CHAT_TEMPLATE_TOKENS = 48
"""Tokens of the 2.1 encoder's chat template around a prompt, at most, with three pictures' tags: its system message
("Comprehend and analyze the provided prompt."), the user and assistant turns' markers, and per picture
`<imageN><|vision_start|>...<|vision_end|>` (`diffusers/modular_pipelines/qwenimage21/encoders.py`). Counted from
the template's text (about 21 tokens plus 5 per picture), not with the published tokenizer, which is not here."""
VISION_PIXELS_PER_TOKEN = 32 * 32
"""Qwen3-VL's processor: 16-pixel patches merged 2x2, one vision token (and one image slot) per 32x32 pixels."""

TRANSFORMER_BLOCK_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out",
)
"""Every linear layer of a `QwenImage21TransformerBlock` (peft `target_modules` suffixes): the attention
projections and the SwiGLU feed-forward (the block has no modulation of its own: one shared `modulation` feeds
every block, as the transformer's tensor-parallel plan lists them)."""

QWEN_IMAGE_21 = ModelFamily(
    name="qwen-image-2.1",
    pipeline="QwenImage21ModularPipeline",
    task="text-to-image-and-edit",
    endpoints=("generations", "edits"),
    input_images=(1, MAX_CONDITION_IMAGES),
    condition_tokens=True,
    lora_targets=TRANSFORMER_BLOCK_LINEARS,
    transformer_class="QwenImage21Transformer2DModel",
    vae_class="AutoencoderKLQwenImage21",
    text_encoder="qwen3-vl",
    latent_patch=1,
    conditions_first=True,
    prefix_cache=True,
    cfg_norm_rescale=False,
)


def checkpoint_sample_sigmas(folder: Path) -> list[float] | None:
    """The sampling grid a checkpoint ships in its `model_index.json` (`sample_sigmas`, without the terminal 0):
    Turbo's; None for the base, which has none (`_qwenimage21_map_fn` tells the two apart the same way)."""
    sigmas = json.loads((Path(folder) / "model_index.json").read_text()).get("sample_sigmas")
    return [float(s) for s in sigmas] if sigmas else None


def prefix_cache_bytes(transformer_config, prefix_tokens: int, rows: int, element_bytes: int) -> int:
    """Bytes of the prefix KV cache of `rows` rows whose prefix (text and condition tokens) is `prefix_tokens`
    long: keys and values, every layer, [rows, prefix, heads x head_dim] each. The engine budgets a request by it
    (`DenoiseEngine`, `max_prefix_cache_bytes`) and the capacity planner sizes the Denoiser with it."""
    inner = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return 2 * transformer_config["num_layers"] * rows * prefix_tokens * inner * element_bytes

