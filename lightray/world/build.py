"""Builds the embedded model's components from configs alone: the same classes as Qwen-Image, scaled down.

Everything here is architecture and tokenizer; learning happens in `lightray.world.train`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
from diffusers import QwenImageTransformer2DModel
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lightray.models import qwen_image
from lightray.world.shapes import EXTRA_SHAPES, SHAPES, all_scenes

# Qwen2's pre-tokenizer split pattern (what the real Qwen tokenizer uses before byte-level BPE).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# QwenImagePipeline's `prompt_template_encode` (set per instance in its __init__; a test keeps this in step).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)


@dataclasses.dataclass(frozen=True)
class EmbeddedArchitecture:
    """Sizes of the embedded model. The latent layout (8× spatial, 16 channels, 2×2 packing) is the real
    Qwen-Image's, so serving code has no special case for it."""

    text_hidden_size: int = 128  # == transformer joint_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 1024
    transformer_layers: int = 6
    transformer_heads: int = 4
    transformer_head_dim: int = 32
    vae_base_dim: int = 16
    sample_size: int = 64
    """Side of the images the first stages (vae, transformer) train at; the multi-resolution stages then cover
    every served size (`lightray.world.train.TRAIN_SIZES`)."""
    tokenizer_max_token_length: int = 7
    """Longest BPE token, in byte-level symbols (see `build_tokenizer`). tests/mini_real.py raises it so that every
    word of the chat template becomes one token, as in the real Qwen tokenizer (a 34-token template prefix)."""


def corpus_texts() -> list[str]:
    """Every caption phrasing of every scene (extra shapes included, so adapter prompts tokenize compactly)
    plus the pipeline's chat template, so its prefix becomes a handful of tokens."""
    texts = [PROMPT_TEMPLATE.format("")]
    for scene in all_scenes(SHAPES + EXTRA_SHAPES):
        for language in ("en", "zh"):
            for t in range(4):
                texts.append(scene.caption(language, t))
    return texts


def build_tokenizer(arch: EmbeddedArchitecture) -> Qwen2Tokenizer:
    """Byte-level BPE trained on the world's EN+ZH captions, wrapped as a Qwen2 tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=arch.vocab_size - len(SPECIAL_TOKENS),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        # Caps a token at 7 byte-level symbols: an English word, or two CJK characters (3 bytes each). Without the
        # cap, a tiny corpus lets BPE merge a whole Chinese clause (no spaces) into one token, and a prompt whose
        # clause never occurred in training would be unreadable; with it, 红色 / 圆形 / 左边 are tokens to compose.
        max_token_length=arch.tokenizer_max_token_length,
    )
    texts = corpus_texts()
    # The template is one string against thousands of captions: repeat it so its words merge into few tokens.
    tok.train_from_iterator(texts[:1] * 500 + texts, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=2048,
    )


def template_prefix_length(tokenizer) -> int:
    """The `prompt_template_encode_start_idx` that goes with `tokenizer` (34 for the real Qwen tokenizer)."""
    return qwen_image.template_prefix_length(tokenizer, PROMPT_TEMPLATE)


def build_text_encoder(arch: EmbeddedArchitecture, tokenizer, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    head_dim = arch.text_hidden_size // arch.text_heads
    quarter = head_dim // 2
    mrope = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]  # sums to head_dim / 2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_hidden_size,
            intermediate_size=arch.text_hidden_size * 2,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            num_key_value_heads=arch.text_kv_heads,
            max_position_embeddings=2048,
            rope_parameters={"mrope_section": mrope, "rope_type": "default", "rope_theta": 1e6},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=arch.text_hidden_size,
            fullatt_block_indexes=[0], patch_size=14, window_size=112,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # A frozen random encoder: the default init (std 0.02) makes token embeddings so small that the two random
    # layers' residual updates dominate them; a unit-scale embedding keeps each token's identity legible in the
    # last hidden state, which is all a one-object world needs the denoiser to read.
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0.0, 1.0)
    return model.eval()


def build_vae(arch: EmbeddedArchitecture) -> AutoencoderKLQwenImage:
    return AutoencoderKLQwenImage(
        base_dim=arch.vae_base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    )


def build_transformer(arch: EmbeddedArchitecture) -> QwenImageTransformer2DModel:
    d = arch.transformer_head_dim
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=arch.transformer_layers,
        attention_head_dim=d,
        num_attention_heads=arch.transformer_heads,
        joint_attention_dim=arch.text_hidden_size,
        axes_dims_rope=(d - 2 * (3 * d // 8), 3 * d // 8, 3 * d // 8),
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Shift-3 exponential time shift, as the Lightning authors configure Qwen-Image; with tiny latents
    (16 tokens) resolution-dependent shifting would be meaningless, so base_shift == max_shift."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=math.log(3),
        max_image_seq_len=8192,
        max_shift=math.log(3),
        num_train_timesteps=1000,
        shift=1.0,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
