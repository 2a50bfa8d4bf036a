"""Stage 1: prompt → embeddings (tokenizer + Qwen2.5-VL text encoder)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import QwenImagePipeline

from lightray.config import ModelPreset
from lightray.stages.common import torch_dtype


def template_prefix_length(tokenizer, template: str) -> int:
    """Tokens the chat template puts before the prompt: what QwenImagePipeline must drop
    (`prompt_template_encode_start_idx`, 34 for the real Qwen tokenizer)."""
    prefix = template.split("{}")[0]
    ids = tokenizer(prefix)["input_ids"]
    if tokenizer(prefix + "a red circle")["input_ids"][: len(ids)] != ids:
        raise ValueError("the template prefix does not tokenize independently of the prompt")
    return len(ids)


class TextEncodeStage:
    """Encodes prompts exactly as `QwenImagePipeline.encode_prompt` does (it *is* that method, on a pipeline
    loaded without transformer and VAE)."""

    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.device = preset.device
        self.pipe = QwenImagePipeline.from_pretrained(
            preset.root, transformer=None, vae=None, dtype=torch_dtype(preset.dtype)
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        start = preset.prompt_template_encode_start_idx
        if start is None:
            start = template_prefix_length(self.pipe.tokenizer, self.pipe.prompt_template_encode)
        self.pipe.prompt_template_encode_start_idx = start

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> list[np.ndarray]:
        """One float32 array [tokens, hidden] per prompt, without padding.

        Prompts are encoded one at a time: that is what the pipeline does for a single prompt, so the graph's
        output matches it bit for bit, and a batch of mixed lengths would waste work on padding anyway.
        """
        out = []
        for prompt in prompts:
            embeds, _ = self.pipe.encode_prompt(
                prompt, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.preset.max_sequence_length,
            )
            out.append(np.ascontiguousarray(embeds[0].float().cpu().numpy()))
        return out

    def count_tokens(self, prompt: str) -> int:
        return len(self.pipe.tokenizer(prompt)["input_ids"])
