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

from pathlib import Path
from typing import TYPE_CHECKING

from lightray.models.qwen_image import QWEN_IMAGE

if TYPE_CHECKING:  # torch is imported where it is used: the config (which reads LORA_TARGETS) stays torch-free
    import torch

    from lightray.config import ModelPreset
    from lightray.training.config import TrainConfig

LORA_TARGETS = list(QWEN_IMAGE.lora_targets)
"""The default of tenant adapters: every linear layer of a transformer block (the family's `lora_targets`)."""

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

UNREAD_IN_LAST_BLOCK = ("attn.to_add_out", "txt_mlp.")
"""Modules of the last transformer block whose output the model never reads. A block updates both streams, but
after the last one the model keeps only the image stream (`norm_out`, `proj_out`), so what that block writes into
the text stream *after* joint attention (the text attention output and the text MLP) is dropped. Everything before
(q/k/v of both streams, both modulations, whose first half modulates the attention input) reaches the image stream
through joint attention. LoRA matrices on these modules would get no gradient: they are frozen instead, which also
lets DDP run without `find_unused_parameters` (it otherwise fails on the second step)."""


TRAINED_ADAPTER = "default"
"""The peft adapter name of the LoRA being trained (a Lightning LoRA active during training has its own)."""
LIGHTNING_ADAPTER = "lightning"


def is_trained_lora(name: str) -> bool:
    """Is parameter `name` a matrix of the LoRA being trained (not of a frozen Lightning LoRA)?"""
    return "lora_" in name and f".{TRAINED_ADAPTER}." in name


def unread_lora_parameters(transformer: torch.nn.Module) -> list[str]:
    """Names of the trained LoRA's parameters of `transformer` on `UNREAD_IN_LAST_BLOCK` modules of its last block,
    derived from the module structure (no forward pass)."""
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}."
    return [name for name, _ in transformer.named_parameters()
            if is_trained_lora(name) and name.startswith(last)
            and name[len(last):].startswith(UNREAD_IN_LAST_BLOCK)]


def lightning_lora_path(config: TrainConfig, preset: ModelPreset) -> Path | None:
    """The Lightning LoRA file `config.train_with_lightning` asks for, or None; ValueError for a variant without
    one."""
    if config.train_with_lightning is None:
        return None
    if config.train_with_lightning not in preset.lightning_variant_ids:
        raise ValueError(f"train_with_lightning {config.train_with_lightning!r} is not a Lightning variant of "
                         f"{preset.name} (those are {preset.lightning_variant_ids})")
    return preset.resolve(preset.variant(config.train_with_lightning).lightning_lora)


def load_lightning(transformer: torch.nn.Module, path: str | Path) -> None:
    """Load a published Lightning LoRA into `transformer` as the frozen `LIGHTNING_ADAPTER` (diffusers converts
    the lora_down / lora_up / alpha layout and folds alpha in, as serving's engine does)."""
    from diffusers import QwenImagePipeline

    state, metadata = QwenImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    QwenImagePipeline.load_lora_into_transformer(state, transformer=transformer, adapter_name=LIGHTNING_ADAPTER,
                                                 metadata=metadata)


def add_lora(transformer: torch.nn.Module, config: TrainConfig, base_model_id: str) -> list[torch.nn.Parameter]:
    """Freeze `transformer` (in whatever dtype it was loaded, with a Lightning LoRA if `load_lightning` put one
    there), add the config's LoRA and return the parameters to train: float32 whatever the base's dtype (bf16
    updates of small LoRA steps would round away), without the `unread_lora_parameters`. With a Lightning LoRA both
    adapters are active (scale 1), only the new one trains. The LoRA initialisation draws from torch's global RNG:
    seed it first."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(
        r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
        lora_dropout=config.lora_dropout, init_lora_weights=True,
    ))
    transformer.peft_config[TRAINED_ADAPTER].base_model_name_or_path = base_model_id
    if LIGHTNING_ADAPTER in transformer.peft_config:
        # Activating both marks both trainable in peft: requires_grad is set below, by name.
        transformer.set_adapters([LIGHTNING_ADAPTER, TRAINED_ADAPTER], [1.0, 1.0])
    unread = set(unread_lora_parameters(transformer))
    params = []
    for name, p in transformer.named_parameters():
        p.requires_grad_(is_trained_lora(name) and name not in unread)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(f"target_modules {config.target_modules} matched no module of the transformer")
    cast_training_params(transformer, dtype=torch.float32)
    return params


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights (peft keys without the adapter name), float32 on the CPU."""
    import torch
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=TRAINED_ADAPTER, save_embedding_layers=False)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_adapter(transformer: torch.nn.Module, folder: str | Path) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (see the module docstring) into `folder`."""
    from diffusers import QwenImagePipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora_config = transformer.peft_config[TRAINED_ADAPTER]
    QwenImagePipeline.save_lora_weights(
        folder, transformer_lora_layers=lora_state_dict(transformer), weight_name=ADAPTER_WEIGHTS,
        transformer_lora_adapter_metadata=lora_config.to_dict(),
    )
    lora_config.save_pretrained(str(folder))
    return folder


def load_adapter_weights(transformer: torch.nn.Module, folder: str | Path) -> None:
    """Set the LoRA of `transformer` to the weights saved in `folder` (`save_adapter`'s files), in place (the
    parameters keep their dtype and identity, so an optimizer holding them stays valid)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(folder / ADAPTER_WEIGHTS).items()}
    result = set_peft_model_state_dict(transformer, weights, adapter_name=TRAINED_ADAPTER)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks {len(missing)} LoRA weights (e.g. {missing[0]})")
