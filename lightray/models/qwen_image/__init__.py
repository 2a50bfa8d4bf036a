"""Qwen-Image (and Qwen-Image-2512): text-to-image, `QwenImagePipeline`; edits are img2img or inpainting
(`QwenImageImg2ImgPipeline`, `QwenImageInpaintPipeline`)."""

from __future__ import annotations

from lightray.models.base import ModelFamily

TRANSFORMER_BLOCK_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
)
"""Every linear layer of a `QwenImageTransformer2DModel` block (peft `target_modules` suffixes): what the published
Lightning LoRAs adapt, and the default of tenant adapters."""

QWEN_IMAGE = ModelFamily(
    name="qwen-image",
    pipeline="QwenImagePipeline",
    task="text-to-image",
    endpoints=("generations", "edits"),
    input_images=(1, 1),
    condition_tokens=False,
    lora_targets=TRANSFORMER_BLOCK_LINEARS,
)


def template_prefix_length(tokenizer, template: str) -> int:
    """Tokens the chat template puts before the prompt: what the family's pipelines drop from the encoder's hidden
    states (`prompt_template_encode_start_idx`, 34 for the real Qwen tokenizer and the text-to-image template)."""
    prefix = template.split("{}")[0]
    ids = tokenizer(prefix)["input_ids"]
    if tokenizer(prefix + "a red circle")["input_ids"][: len(ids)] != ids:
        raise ValueError("the template prefix does not tokenize independently of the prompt")
    return len(ids)
