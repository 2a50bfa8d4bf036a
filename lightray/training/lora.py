"""Which transformer modules get LoRA matrices, and the adapter files serving loads.

Adapter folder written by `LoraTrainer.save_adapter` (what the registry publishes)::

    adapter_model.safetensors   diffusers LoRA keys ("transformer.<module>.lora_A.weight"), with the peft
                                LoraConfig in the safetensors metadata (so rank/alpha round-trip exactly)
    adapter_config.json         that LoraConfig as peft writes it (base_model_name_or_path = the preset's id)

`QwenImagePipeline.load_lora_weights(folder)` (hence the denoising engine's adapter loading) reads the folder as is: it
picks the folder's only ``.safetensors`` file. A folder from `save_pretrained` of a peft model
(``base_model.model.*`` keys) is *not* what serving loads, which is why the trainer does not write one.
"""

from __future__ import annotations

LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
]
"""Every linear layer of a Qwen-Image transformer block (peft `target_modules` suffixes): what the published
Lightning LoRAs adapt, and the default of tenant adapters."""

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
