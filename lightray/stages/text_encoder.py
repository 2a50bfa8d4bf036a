"""Stage 1: prompt → embeddings (tokenizer + Qwen2.5-VL text encoder; Qwen3-VL for Qwen-Image-2.1).

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
from lightray.contracts import TextEmbeddings
from lightray.models.qwen_image import template_prefix_length
from lightray.errors import RequestError
from lightray.stages.common import HealthProbe, check_parameter_dtype, torch_dtype


class TextEncodeStage:
    """Encodes prompts exactly as the family's pipeline does: `QwenImagePipeline`'s `encode_prompt` (it *is* that
    method, on a pipeline loaded without transformer and VAE) for text-to-image, `QwenImageEditPlusPipeline`'s,
    which reads the input images too, for instruction edits (`encode_instruction`), and for Qwen-Image-2.1 (family
    `text_encoder` "qwen3-vl") the 2.1 pipelines' Qwen3-VL encoding, with 0-3 condition images
    (`lightray.models.qwen_image_21.conditioning`)."""

    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.device = preset.device
        self.family = preset.model_family
        dtype = torch_dtype(preset.dtype)
        self.pipe = self.processor = None
        if self.family.text_encoder == "qwen3-vl":
            from lightray.models.qwen_image_21.conditioning import load_text_encoder

            self.text_encoder, self.processor = load_text_encoder(preset.root, dtype)
            self.text_encoder.to(self.device)
            tokenizer, probe_text = self.processor.tokenizer, "<|im_start|>user\n <|im_end|>\n"
        else:
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
            self.text_encoder, tokenizer = self.pipe.text_encoder, self.pipe.tokenizer
            probe_text = self.pipe.prompt_template_encode.format(" ")
        check_parameter_dtype(self.text_encoder, dtype, "text encoder")
        # The probe's input is tokenized once, here: a fast tokenizer used from two threads at once can raise
        # ("Already borrowed"), so the health check must not touch it while requests are being encoded.
        probe = tokenizer(probe_text, return_tensors="pt")
        self._probe_ids = probe["input_ids"].to(self.device)
        self._probe_mask = probe["attention_mask"].to(self.device)
        self._health = HealthProbe("text encoder", self._probe_forward)

    @torch.inference_mode()
    def _probe_forward(self) -> torch.Tensor:
        """The text encoder's last hidden state for the template around " " (a few dozen tokens)."""
        out = self.text_encoder(input_ids=self._probe_ids, attention_mask=self._probe_mask,
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
        output matches it bit for bit, and a batch of mixed lengths would waste work on padding anyway. A 2.1
        prompt without images has no image slots (`TextEmbeddings.prompt_image_slots` None: all False).
        """
        if self.family.text_encoder == "qwen3-vl":
            from lightray.models.qwen_image_21.conditioning import encode_prompt

            return [np.ascontiguousarray(encode_prompt(self.text_encoder, self.processor, p)[0].float().cpu().numpy())
                    for p in prompts]
        out = []
        for prompt in prompts:
            embeds, _ = self.pipe.encode_prompt(
                prompt, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.preset.max_sequence_length,
            )
            out.append(np.ascontiguousarray(embeds[0].float().cpu().numpy()))
        return out

    def check_prompts(self, prompt: str, negative_prompt: str | None = None) -> None:
        """A 2.1 prompt (and negative) of more tokens than the preset's `max_sequence_length` is a `RequestError`
        naming its field, with the limit: the 2.1 encoder truncates nothing (`conditioning.prompt_tokens`). The
        other families' pipelines truncate, so this checks nothing for them."""
        if self.family.text_encoder != "qwen3-vl":
            return
        from lightray.models.qwen_image_21.conditioning import prompt_tokens

        limit = self.preset.max_sequence_length
        for param, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is not None and (tokens := prompt_tokens(self.processor, text)) > limit:
                raise RequestError(param, f"{param} is {tokens} tokens; model {self.preset.name!r} reads at most "
                                          f"{limit} (its encoder truncates nothing: shorten it)")

    @torch.inference_mode()
    def encode_instruction(self, prompts: list[str], images: list[Image.Image], width: int,
                           height: int) -> TextEmbeddings:
        """A request's prompts about its input `images` (the prompt, and the negative with true CFG) for an output
        of width × height, as the family's pipeline encodes them: `QwenImageEditPlusPipeline.__call__` (the images
        resized to `edit.condition_image_area`), or 2.1's `get_qwenimage21_prompt_embeds` with the images resized
        to the output's area, with each prompt's image slots. Float32 [tokens, hidden] each."""
        if not self.family.condition_tokens:
            raise ValueError(f"a {self.family.name} model encodes no images with its prompts")
        self.check_prompts(*prompts)
        if self.family.text_encoder == "qwen3-vl":
            from lightray.models.qwen_image_21.conditioning import encode_prompt, resize_conditions

            resized = resize_conditions(images, width * height)
            encoded = [encode_prompt(self.text_encoder, self.processor, p, resized) for p in prompts]
            embeds = [np.ascontiguousarray(e.float().cpu().numpy()) for e, _ in encoded]
            slots = [s.cpu().numpy() for _, s in encoded]
        else:
            from lightray.models.qwen_image_edit.conditioning import encode_instruction

            area = self.preset.edit.condition_image_area
            embeds = [np.ascontiguousarray(encode_instruction(self.pipe, p, images, area).float().cpu().numpy())
                      for p in prompts]
            slots = [None] * len(prompts)
        negative = len(prompts) > 1
        return TextEmbeddings(prompt=embeds[0], negative=embeds[1] if negative else None,
                              prompt_image_slots=slots[0], negative_image_slots=slots[1] if negative else None)

    def token_length(self, prompt: str) -> int:
        """Tokens of `prompt` inside the chat template, truncated as `encode_prompt` truncates: prompts of equal
        length share an unpadded forward (`batch_plan`)."""
        drop = self.pipe.prompt_template_encode_start_idx
        ids = self.pipe.tokenizer(self.pipe.prompt_template_encode.format(prompt),
                                  max_length=self.pipe.tokenizer_max_length + drop, truncation=True)["input_ids"]
        return len(ids)

    def batch_plan(self, prompts: list[str]) -> list[list[str]]:
        """The distinct prompts of `prompts` grouped by token length, one group per text-encoder forward (in
        order of first appearance). See the module docstring for why only equal lengths are grouped. A 2.1
        prompt is a forward of its own (batching its encoder has not been measured exact)."""
        if self.family.text_encoder == "qwen3-vl":
            return [[p] for p in dict.fromkeys(prompts)]
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
