"""A "mini real" Qwen-Image folder: the published configs of Qwen/Qwen-Image with the widths shrunk, random weights
in bfloat16, and random Lightning LoRA files in both published key layouts. Built by tests/test_real_model.py.

What is real: model_index.json, the scheduler config, the VAE config (z_dim 16, latents_mean/latents_std, dim_mult,
res blocks, temporal downsampling; only base_dim shrinks), the transformer's class, key names and config keys
(only depth and widths shrink), a Qwen2.5-VL text encoder and Qwen2 tokenizer (tiny, from
`lightray.world.build`), the pipeline's chat template, and its 34-token template prefix (the drop index).

No hub is reachable here, so the published configs are written below as constants, from Qwen/Qwen-Image's
`model_index.json`, `scheduler/scheduler_config.json`, `vae/config.json` and `transformer/config.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from safetensors.torch import save_file

from lightray.world.build import EmbeddedArchitecture, build_text_encoder, build_tokenizer, template_prefix_length

# Qwen/Qwen-Image model_index.json.
QWEN_IMAGE_MODEL_INDEX = {
    "_class_name": "QwenImagePipeline",
    "_diffusers_version": "0.34.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}

# Qwen/Qwen-Image scheduler/scheduler_config.json: resolution-dependent exponential shift (0.5 at 256 tokens to
# 0.9 at 8192) and a terminal shift to 0.02.
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.34.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Qwen/Qwen-Image vae/config.json (the Wan 2.1 VAE's latent statistics).
QWEN_IMAGE_VAE_CONFIG = {
    "_class_name": "AutoencoderKLQwenImage",
    "_diffusers_version": "0.34.0.dev0",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}

# Qwen/Qwen-Image transformer/config.json (60 layers, 24 heads of 128, a 3584-wide text encoder).
QWEN_IMAGE_TRANSFORMER_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": "0.34.0.dev0",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 768,
}

# ModelTC/Qwen-Image-Lightning generate_with_diffusers.py: the scheduler the Lightning LoRAs were distilled with.
# Written here independently of configs/models/qwen-image-lightning.yaml, as the reference to hold it against.
MODELTC_LIGHTNING_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

MINI_TEXT = EmbeddedArchitecture(text_hidden_size=64, text_layers=2, text_heads=4, text_kv_heads=2,
                                 tokenizer_max_token_length=16)
"""The tiny Qwen2.5-VL text encoder (64 wide, 2 layers) and a tokenizer whose template words are single tokens."""
MINI_TRANSFORMER = {"num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                    "joint_attention_dim": MINI_TEXT.text_hidden_size, "axes_dims_rope": [8, 12, 12]}
"""What shrinks in the transformer config: depth 2, inner width 64 (2 heads of 32, rope axes summing to 32)."""
MINI_VAE_BASE_DIM = 16

REAL_TEMPLATE_PREFIX_TOKENS = 34
"""QwenImagePipeline's `prompt_template_encode_start_idx` for the real tokenizer (the preset's value)."""

LIGHTNING_RANK = 64
LIGHTNING_ALPHA = 32.0
"""alpha / rank = 0.5, so a file whose alpha were ignored would give other numbers."""
LIGHTNING_TARGETS = ("img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                     "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                     "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
"""Every linear layer of a transformer block: what the Lightning files adapt."""


def build_mini_real(root: Path, seed: int = 0) -> Path:
    """Write the mini real diffusers folder at `root` (about 5 MB) and return it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(QWEN_IMAGE_MODEL_INDEX, indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(QWEN_IMAGE_SCHEDULER_CONFIG, indent=2))

    tokenizer = build_tokenizer(MINI_TEXT)
    prefix = template_prefix_length(tokenizer)
    if prefix != REAL_TEMPLATE_PREFIX_TOKENS:
        raise AssertionError(f"the mini tokenizer's template prefix is {prefix} tokens, not the real 34")
    tokenizer.save_pretrained(root / "tokenizer")
    build_text_encoder(MINI_TEXT, tokenizer, seed).to(torch.bfloat16).save_pretrained(root / "text_encoder")

    torch.manual_seed(seed)
    config = {k: v for k, v in QWEN_IMAGE_TRANSFORMER_CONFIG.items()
              if not k.startswith("_") and k != "pooled_projection_dim"}  # a key diffusers no longer takes
    transformer = QwenImageTransformer2DModel(**{**config, **MINI_TRANSFORMER})
    transformer.to(torch.bfloat16).save_pretrained(root / "transformer")

    vae_config = {k: v for k, v in QWEN_IMAGE_VAE_CONFIG.items() if not k.startswith("_")}
    AutoencoderKLQwenImage(**{**vae_config, "base_dim": MINI_VAE_BASE_DIM}).to(torch.bfloat16).save_pretrained(
        root / "vae")
    return root


def write_lightning_lora(path: Path, seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """A random Lightning LoRA for the mini transformer in the published layout: per adapted linear
    `{prefix}transformer_blocks.N.<module>.lora_down.weight` [rank, in], `.lora_up.weight` [out, rank] and `.alpha`
    (a scalar), all bfloat16. `prefix` "" is the bare layout, "diffusion_model." the other published one."""
    inner = MINI_TRANSFORMER["num_attention_heads"] * MINI_TRANSFORMER["attention_head_dim"]
    shapes = {"img_mod.1": (inner, 6 * inner), "txt_mod.1": (inner, 6 * inner),
              "img_mlp.net.0.proj": (inner, 4 * inner), "img_mlp.net.2": (4 * inner, inner),
              "txt_mlp.net.0.proj": (inner, 4 * inner), "txt_mlp.net.2": (4 * inner, inner)}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for block in range(MINI_TRANSFORMER["num_layers"]):
        for target in LIGHTNING_TARGETS:
            fan_in, fan_out = shapes.get(target, (inner, inner))
            key = f"{prefix}transformer_blocks.{block}.{target}"
            state[f"{key}.lora_down.weight"] = (torch.randn(LIGHTNING_RANK, fan_in, generator=gen)
                                                / math.sqrt(fan_in)).to(torch.bfloat16)
            state[f"{key}.lora_up.weight"] = (torch.randn(fan_out, LIGHTNING_RANK, generator=gen)
                                              * 0.2 / math.sqrt(LIGHTNING_RANK)).to(torch.bfloat16)
            state[f"{key}.alpha"] = torch.tensor(LIGHTNING_ALPHA, dtype=torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


# Qwen/Qwen-Image-Edit-2511 model_index.json: the Edit-Plus pipeline, with the Qwen2-VL processor.
QWEN_IMAGE_EDIT_MODEL_INDEX = {
    "_class_name": "QwenImageEditPlusPipeline",
    "_diffusers_version": "0.36.0.dev0",
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}
# Qwen/Qwen-Image-Edit-2511 transformer/config.json: Qwen-Image's, with the condition tokens modulated at t = 0.
QWEN_IMAGE_EDIT_2511_TRANSFORMER_CONFIG = {**QWEN_IMAGE_TRANSFORMER_CONFIG, "zero_cond_t": True}
# Qwen/Qwen-Image-Edit-2511 processor/preprocessor_config.json (Qwen2.5-VL's image processor).
QWEN_IMAGE_EDIT_PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def build_mini_real_edit(root: Path, seed: int = 0) -> Path:
    """A mini real Qwen-Image-Edit-2511 folder at `root`: `build_mini_real`'s components with Edit-2511's index,
    transformer config (`zero_cond_t`) and processor config; the text encoder is a Qwen2.5-VL with its vision
    tower (tiny)."""
    build_mini_real(root, seed)
    (root / "model_index.json").write_text(json.dumps(QWEN_IMAGE_EDIT_MODEL_INDEX, indent=2))
    (root / "processor").mkdir(exist_ok=True)
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(QWEN_IMAGE_EDIT_PREPROCESSOR_CONFIG))
    torch.manual_seed(seed + 1)
    config = {k: v for k, v in QWEN_IMAGE_EDIT_2511_TRANSFORMER_CONFIG.items()
              if not k.startswith("_") and k != "pooled_projection_dim"}
    QwenImageTransformer2DModel(**{**config, **MINI_TRANSFORMER}).to(torch.bfloat16).save_pretrained(
        root / "transformer")
    return root


# Qwen-Image-2.1. No hub is reachable here: the class names, component names and config keys below are diffusers
# 0.42's (`QwenImage21Pipeline.__init__`, `QwenImage21Transformer2DModel` and `AutoencoderKLQwenImage21`
# `register_to_config` signatures), the values their defaults, which the conversion targets; the published
# `Qwen/Qwen-Image-2.1` files were not available to compare. Compare them before relying on a value here.
QWEN_IMAGE_21_MODEL_INDEX = {
    "_class_name": "QwenImage21Pipeline",
    "_diffusers_version": "0.42.0",
    "processor": ["transformers", "Qwen3VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
    "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage21"],
}
QWEN_IMAGE_21_TRANSFORMER_CONFIG = {
    "_class_name": "QwenImage21Transformer2DModel",
    "_diffusers_version": "0.42.0",
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 32,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "context_in_dim": 4096,
    "mlp_ratio": 3,
    "axes_dims_rope": [16, 56, 56],
    "eps": 1e-6,
    "causal_condition": True,
}
QWEN_IMAGE_21_VAE_SHRUNK = {"base_dim": 8, "decoder_base_dim": 8}
"""What shrinks in `AutoencoderKLQwenImage21`'s config (its 16× compression, `temperal_downsample`'s four entries,
64 latent channels and latent statistics stay)."""
MINI_21_TRANSFORMER = {"num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                       "context_in_dim": MINI_TEXT.text_hidden_size, "axes_dims_rope": [8, 12, 12]}
"""What shrinks in the 2.1 transformer: depth 2, inner width 64 (2 heads of 32, rope axes summing to 32), the text
width the mini text encoder's."""
MINI_21_TURBO_SIGMAS = [1.0, 0.9375, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25]
"""The mini Turbo's `sample_sigmas` (8 steps, without the terminal 0): a fixture value, not the checkpoint's."""


# Qwen3-VL's processor/preprocessor_config.json (16-pixel patches merged 2×2: one vision token per 32×32 pixels,
# the 2×2 condition tokens of the 16× VAE it stands for), with the smallest side shrunk with the widths: the mini
# pictures are far below the real 65,536-pixel minimum, which would upscale them and break the slot count.
QWEN3_VL_PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 1024, "longest_edge": 16777216},
}
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The part of Qwen3-VL's chat template the 2.1 encoder uses (a system message, to measure the prefix it drops);
the published template has more (tools, vision content), not reproduced here."""


def build_mini_qwen3_vl(tokenizer, seed: int):
    """A tiny Qwen3-VL (64 wide, 2 text layers, a 1-block vision tower, no deepstack) on `tokenizer`'s ids."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from lightray.world.build import SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads, head_dim = MINI_TEXT.text_heads, MINI_TEXT.text_hidden_size // MINI_TEXT.text_heads
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=MINI_TEXT.text_hidden_size,
                         intermediate_size=2 * MINI_TEXT.text_hidden_size, num_hidden_layers=MINI_TEXT.text_layers,
                         num_attention_heads=heads, num_key_value_heads=MINI_TEXT.text_kv_heads, head_dim=head_dim,
                         max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=MINI_TEXT.text_hidden_size, deepstack_visual_indexes=[],
                           num_position_embeddings=64),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # unit-scale token embeddings, as the embedded encoder's (lightray.world.build)
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def build_mini_real_21(root: Path, seed: int = 0, turbo: bool = False, transformer: dict | None = None) -> Path:
    """A mini Qwen-Image-2.1 folder at `root` (Turbo: `sample_sigmas` in its model_index.json): the 2.1 index,
    Qwen-Image's scheduler config, a tiny Qwen3-VL encoder and its processor folder (tokenizer, preprocessor
    config, chat template), the 2.1 transformer and VAE at toy width, bfloat16. `transformer`: config values
    over `MINI_21_TRANSFORMER` (benchmarks/bench_prefix_cache.py's wider, deeper toy)."""
    root.mkdir(parents=True, exist_ok=True)
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

    index = {**QWEN_IMAGE_21_MODEL_INDEX, **({"sample_sigmas": MINI_21_TURBO_SIGMAS} if turbo else {})}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(QWEN_IMAGE_SCHEDULER_CONFIG, indent=2))
    torch.manual_seed(seed)
    config = {k: v for k, v in QWEN_IMAGE_21_TRANSFORMER_CONFIG.items() if not k.startswith("_")}
    model = QwenImage21Transformer2DModel(**{**config, **MINI_21_TRANSFORMER, **(transformer or {})})
    with torch.no_grad():  # zero-initialised norm weights would hide a wrong scale: give them values
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.1)
    model.to(torch.bfloat16).save_pretrained(root / "transformer")
    AutoencoderKLQwenImage21(**QWEN_IMAGE_21_VAE_SHRUNK).to(torch.bfloat16).save_pretrained(root / "vae")
    tokenizer = build_tokenizer(MINI_TEXT)
    tokenizer.save_pretrained(root / "processor")
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR_CONFIG, indent=2))
    (root / "processor" / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE)
    build_mini_qwen3_vl(tokenizer, seed).to(torch.bfloat16).save_pretrained(root / "text_encoder")
    return root


def mini_21_preset(root: Path, preset_file: str, **overrides):
    """A 2.1 preset of configs/models (`preset_file`) on the mini folder at `root`, on the CPU, with sizes the toy
    model serves (up to 256², 128² by default)."""
    import yaml

    from lightray.config import REPO_ROOT, load_preset

    raw = yaml.safe_load((REPO_ROOT / "configs/models" / preset_file).read_text())
    raw.update(path=str(root), device="cpu", min_side=32, max_side=256, max_pixels=256 * 256, default_size=[128, 128],
               **overrides)
    return load_preset(raw)


def write_mini_21_lora(path: Path, seed: int, rank: int = 4) -> Path:
    """A random LoRA for the mini 2.1 transformer in diffusers' saved layout (`transformer.<module>.lora_A.weight`
    [rank, in], `.lora_B.weight` [out, rank]; alpha = rank, as peft reads a file without it) over every block linear
    (`lightray.models.qwen_image_21.TRANSFORMER_BLOCK_LINEARS`), bfloat16."""
    from lightray.models.qwen_image_21 import TRANSFORMER_BLOCK_LINEARS

    inner = MINI_21_TRANSFORMER["num_attention_heads"] * MINI_21_TRANSFORMER["attention_head_dim"]
    hidden = QWEN_IMAGE_21_TRANSFORMER_CONFIG["mlp_ratio"] * inner
    shapes = {"img_mlp.proj": (inner, hidden), "img_mlp.gate_layer": (inner, hidden), "img_mlp.out": (hidden, inner)}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for block in range(MINI_21_TRANSFORMER["num_layers"]):
        for target in TRANSFORMER_BLOCK_LINEARS:
            fan_in, fan_out = shapes.get(target, (inner, inner))
            key = f"transformer.transformer_blocks.{block}.{target}"
            state[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)).to(
                torch.bfloat16)
            state[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.5 / math.sqrt(rank)).to(
                torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def captioned_dataset(folder: Path, sizes: tuple[tuple[int, int], tuple[int, int]]) -> Path:
    """Six captioned images (an image folder with its metadata file) alternating between the two (width, height)
    `sizes`, noise with a red square in the middle: a trainer's CPU proof data set."""
    import numpy as np
    from PIL import Image

    from lightray.training.data import METADATA_FILENAME

    folder.mkdir()
    records = []
    rng = np.random.default_rng(0)
    for i in range(6):
        size = sizes[i % 2]
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        pixels[size[1] // 3: 2 * size[1] // 3, size[0] // 3: 2 * size[0] // 3] = (220, 40, 40)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        records.append({"file_name": f"{i}.png", "text": f"lrzstyle, a red square, picture {i}"})
    (folder / METADATA_FILENAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def publish_trained(trainer, config, preset, data, metrics: dict, tmp_path: Path):
    """A CPU proof's publishing: the final checkpoint's adapter files (`save_checkpoint`, `stage_adapter`), with
    the worker's fingerprint, published to the config's local registry. (registry, manifest)."""
    from lightray.registry import AdapterRegistry
    from lightray.training.publish import checkpoint_fingerprint, manifest_fields, stage_adapter

    final = trainer.save_checkpoint(tmp_path / "final", metrics)
    registry = AdapterRegistry(config.registry, cache_dir=tmp_path / "cache")
    stage_adapter(final, tmp_path / "stage")
    manifest = registry.publish(config.tenant, config.name, tmp_path / "stage",
                                **manifest_fields(config, preset, checkpoint_fingerprint(final), data.hash, metrics))
    return registry, manifest
