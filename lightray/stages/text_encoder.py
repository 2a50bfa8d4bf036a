"""Stage 1: prompt → embeddings (tokenizer + Qwen2.5-VL text encoder).

Batching (`TextEncodeStage.encode_many`, what the TextEncoder deployment runs for the requests `serve.batch` hands
it): prompts are grouped by token length and each group is ONE unpadded text-encoder forward. The contract is that
a prompt's embeddings are bit-identical to encoding it alone (`encode`, what the in-process pipeline does), and on
the embedded model (CPU, float32, one torch thread) measured:

* a padded + masked batch (`QwenImagePipeline.encode_prompt` with 8 prompts of 52..87 tokens, EN and Chinese) is
  NOT exact: max abs difference 4.8e-7 (1.2e-7..4.8e-7 per prompt); only the longest, unpadded row matched. The
  attention mask changes the attention path;
* a batch of prompts of the same token length (no padding, so no mask) IS exact: max abs difference 0.0 for batches
  of 1..8, distinct prompts and repeats, four different lengths (60..63 tokens). Linear layers see >= 4 rows
  (tokens x prompts), where this CPU's GEMM is batch-invariant, and unmasked SDPA is batch-invariant.

So same-length prompts share a forward, other prompts do not (a lone length is a forward of one, as before), and a
prompt that appears several times in one batch (the served negative prompt " " of every CFG request) is encoded
once. On other hardware (cuBLAS picks kernels by shape) re-check before relying on it: tests/test_stage_batching.py.
docs/batching.md has the numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import QwenImagePipeline
from PIL import Image

from lightray.config import ModelPreset
from lightray.models.qwen_image import template_prefix_length
from lightray.stages.common import HealthProbe, check_parameter_dtype, torch_dtype


class TextEncodeStage:
    """Encodes prompts exactly as the family's pipeline's `encode_prompt` does (it *is* that method, on a pipeline
    loaded without transformer and VAE): `QwenImagePipeline`'s for text-to-image, `QwenImageEditPlusPipeline`'s,
    which reads the input images too, for instruction edits (`encode_instruction`)."""

    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.device = preset.device
        self.family = preset.model_family
        dtype = torch_dtype(preset.dtype)
        if self.family.condition_tokens:
            from lightray.models.qwen_image_edit.conditioning import text_pipeline

            self.pipe = text_pipeline(preset.root, dtype, preset.prompt_template_encode_start_idx).to(self.device)
        else:
            self.pipe = QwenImagePipeline.from_pretrained(preset.root, transformer=None, vae=None,
                                                          dtype=dtype).to(self.device)
            start = preset.prompt_template_encode_start_idx
            if start is None:
                start = template_prefix_length(self.pipe.tokenizer, self.pipe.prompt_template_encode)
            self.pipe.prompt_template_encode_start_idx = start
        self.pipe.set_progress_bar_config(disable=True)
        check_parameter_dtype(self.pipe.text_encoder, dtype, "text encoder")
        # The probe's input is tokenized once, here: a fast tokenizer used from two threads at once can raise
        # ("Already borrowed"), so the health check must not touch it while requests are being encoded.
        probe = self.pipe.tokenizer(self.pipe.prompt_template_encode.format(" "), return_tensors="pt")
        self._probe_ids = probe["input_ids"].to(self.device)
        self._probe_mask = probe["attention_mask"].to(self.device)
        self._health = HealthProbe("text encoder", self._probe_forward)

    @torch.inference_mode()
    def _probe_forward(self) -> torch.Tensor:
        """The text encoder's last hidden state for the template around " " (a few dozen tokens)."""
        out = self.pipe.text_encoder(input_ids=self._probe_ids, attention_mask=self._probe_mask,
                                     output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]

    def check_health(self, timeout_s: float | None = None) -> None:
        """Raise unless the text encoder still computes finite output on its device within the timeout
        (`HealthProbe`). Runs beside requests: the forward keeps no state, and the tokenizer is not used."""
        self._health.check(timeout_s)

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

    @torch.inference_mode()
    def encode_instruction(self, prompts: list[str], images: list[Image.Image]) -> list[np.ndarray]:
        """An instruction edit's prompts (the instruction, and the negative with true CFG), each encoded with the
        input `images` as `QwenImageEditPlusPipeline.__call__` encodes them: float32 [tokens, hidden] each."""
        from lightray.models.qwen_image_edit.conditioning import encode_instruction

        if not self.family.condition_tokens:
            raise ValueError(f"a {self.family.name} model encodes no images with its prompts")
        return [np.ascontiguousarray(encode_instruction(self.pipe, prompt, images,
                                                        self.preset.edit.condition_image_area).float().cpu().numpy())
                for prompt in prompts]

    def token_length(self, prompt: str) -> int:
        """Tokens of `prompt` inside the chat template, truncated as `encode_prompt` truncates: prompts of equal
        length share an unpadded forward (`batch_plan`)."""
        drop = self.pipe.prompt_template_encode_start_idx
        ids = self.pipe.tokenizer(self.pipe.prompt_template_encode.format(prompt),
                                  max_length=self.pipe.tokenizer_max_length + drop, truncation=True)["input_ids"]
        return len(ids)

    def batch_plan(self, prompts: list[str]) -> list[list[str]]:
        """The distinct prompts of `prompts` grouped by token length, one group per text-encoder forward (in
        order of first appearance). See the module docstring for why only equal lengths are grouped."""
        groups: dict[int, list[str]] = {}
        for prompt in dict.fromkeys(prompts):
            groups.setdefault(self.token_length(prompt), []).append(prompt)
        return list(groups.values())

    @torch.inference_mode()
    def encode_group(self, prompts: list[str]) -> list[np.ndarray]:
        """Prompts of one token length in one forward; bit-identical to `encode(prompts)` (no padding, no mask)."""
        if len(prompts) == 1:
            return self.encode(prompts)
        embeds, mask = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, max_sequence_length=self.preset.max_sequence_length,
        )
        if mask is not None:  # lengths differed after all: a padded batch is not exact, encode one at a time
            return self.encode(prompts)
        return [np.ascontiguousarray(e.float().cpu().numpy()) for e in embeds]

    def encode_many(self, prompts: list[str]) -> list[np.ndarray]:
        """`encode(prompts)` with same-length prompts batched: the same arrays, bit for bit, in fewer forwards."""
        encoded: dict[str, np.ndarray] = {}
        for group in self.batch_plan(prompts):
            encoded.update(zip(group, self.encode_group(group)))
        return [encoded[p] for p in prompts]
