"""The real Qwen-Image modules on the meta device: exact parameter counts and measured activation peaks from the
published config.json files alone (no weights, no memory, no download). Serving's GPU budget
(`planning.capacity`) and the trainer's memory plan (`lightray.training.memory_plan`) are both computed from these.

Weights are counted: the modules are built on the meta device and their parameters summed at a dtype. Activations
are measured: the real forward (and backward) runs on storage-less tensors while `PeakLiveBytes` adds up the bytes
of every tensor it creates and subtracts them when they are freed, which is the eager peak (attention taken as
memory-efficient SDPA: its output only). What is neither (CUDA context, workspaces, fragmentation) is an assumption
of the GPU class (`GpuClass.reserved_mib_per_process`, a file under configs/capacity/).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import weakref
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lightray.config import ModelPreset
from lightray.models import FAMILIES
from lightray.models.base import ModelFamily
from lightray.models.qwen_image import QWEN_IMAGE
from lightray.models.qwen_image_21 import CHAT_TEMPLATE_TOKENS, VISION_PIXELS_PER_TOKEN

GIB = 1024**3
MIB = 1024**2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

LIGHTNING_LORA_TARGETS = QWEN_IMAGE.lora_targets
"""Linear layers of every transformer block that the published Qwen-Image-Lightning LoRAs adapt (DESIGN.md); tenant
adapters are budgeted on the same targets."""


def text_encoder_tokens(preset: ModelPreset, pictures: int | None = None) -> int:
    """Most tokens one prompt takes through the text encoder. Qwen-Image: `QwenImagePipeline` tokenizes the
    chat-templated prompt with truncation at its `tokenizer_max_length` plus the template prefix it drops afterwards
    (`prompt_template_encode_start_idx`, 34 for the real tokenizer); `max_sequence_length` only cuts the embeddings
    after the forward. A long prompt (up to `max_prompt_chars`) reaches this bound. Qwen-Image-2.1 truncates nothing
    (a longer prompt is refused): its `max_sequence_length` prompt tokens, its chat template, and one vision token
    per 32x32 pixels of each condition image (`pictures`, by default its most, each at the largest served area; the
    trainer's captions have none)."""
    if preset.model_family.prefix_cache:
        width, height = preset.largest_size
        pictures = preset.model_family.input_images[1] if pictures is None else pictures
        vision_tokens = pictures * (width * height // VISION_PIXELS_PER_TOKEN)
        return preset.max_sequence_length + CHAT_TEMPLATE_TOKENS + vision_tokens
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    prefix = preset.prompt_template_encode_start_idx or pipe.prompt_template_encode_start_idx
    return pipe.tokenizer_max_length + prefix


class GpuClass(BaseModel):
    """The GPU a Serve config is sized for, and the per-process costs that are not the model's."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """Marketing name, e.g. "NVIDIA H100 80GB HBM3"."""
    memory_mib: int = Field(gt=0)
    """Device memory as `nvidia-smi` reports it (81559 MiB on an H100 80GB HBM3, 81920 on an A100 80GB): the
    smaller of the class, so one config fits both."""
    node_selector: dict[str, str]
    """The node label (GPU feature discovery's `nvidia.com/gpu.product`) the k8s GPU worker group selects, so pods
    land only on this class."""
    reserved_mib_per_process: int = Field(ge=0)
    """Per replica process, not the model's: CUDA context, cuBLAS/cuDNN and flash-attention workspaces and the
    caching allocator's fragmentation (none of which a meta-device forward sees). Fractional replicas sharing a GPU
    each pay it."""
    dense_bf16_tflops: float = Field(gt=0)
    """Vendor peak for dense bf16 matmuls (no sparsity)."""


class PeakLiveBytes:
    """Peak bytes of the tensors an eager forward creates, on any device, the meta device included: a
    `TorchDispatchMode` adds each new storage an op returns and subtracts it when Python frees it. The storages of
    `existing` modules and tensors (weights, inputs) are never counted, even when an op returns a view of one (a
    weight's transpose)."""

    def __init__(self, *existing):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tensors = [t for x in existing for t in (
            [*x.parameters(), *x.buffers()] if isinstance(x, torch.nn.Module) else [x])]
        self._kept = [t.untyped_storage() for t in tensors]  # alive, so their ids are not reused
        known = {id(st) for st in self._kept}
        counted: set[int] = set()
        tracker = self
        self.live = self.peak = 0

        def free(key: int, nbytes: int) -> None:
            counted.discard(key)
            tracker.live -= nbytes

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        key = id(storage)
                        if key in known or key in counted:
                            continue
                        nbytes = storage.nbytes()
                        counted.add(key)
                        tracker.live += nbytes
                        tracker.peak = max(tracker.peak, tracker.live)
                        weakref.finalize(storage, free, key, nbytes)
                return out

        self._mode = Mode()

    def __enter__(self) -> "PeakLiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


@contextlib.contextmanager
def memory_efficient_attention():
    """SDPA as flash / memory-efficient attention behaves on a GPU: an output the size of the query and no
    tokens x tokens matrix (the meta device would otherwise take the math path and materialise one)."""
    import torch

    stock = torch.nn.functional.scaled_dot_product_attention

    def output_only(*args, **kwargs):
        query = kwargs.get("query", args[0] if args else None)
        value = kwargs.get("value", args[2] if len(args) > 2 else None)
        return query.new_empty(query.shape[:-1] + value.shape[-1:])

    torch.nn.functional.scaled_dot_product_attention = output_only
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = stock


def forward_peak_bytes(module, run) -> int:
    """Peak activation bytes of `run()` (a forward of `module` on meta tensors), without gradients."""
    import torch

    with torch.no_grad(), memory_efficient_attention(), PeakLiveBytes(module) as tracked:
        run()
    return tracked.peak


@dataclasses.dataclass(frozen=True)
class MetaModels:
    """The real modules with no storage: exact parameter shapes from the published configs."""

    transformer: object
    text_encoder: object
    vae: object
    configs: dict[str, dict]

    @classmethod
    def build(cls, folder: Path) -> "MetaModels":
        """The modules a folder's config.json files name: the transformer and VAE by their diffusers
        `_class_name`, the text encoder by its transformers `architectures` (Qwen2.5-VL for Qwen-Image, Qwen3-VL
        for 2.1)."""
        import diffusers
        import torch
        import transformers

        configs = {name: json.loads((folder / name / "config.json").read_text())
                   for name in ("transformer", "text_encoder", "vae")}
        text_config = transformers.AutoConfig.for_model(**configs["text_encoder"])
        with torch.device("meta"):
            transformer = getattr(diffusers, configs["transformer"]["_class_name"]).from_config(configs["transformer"])
            text_encoder = getattr(transformers, configs["text_encoder"]["architectures"][0])._from_config(text_config)
            vae = getattr(diffusers, configs["vae"]["_class_name"]).from_config(configs["vae"])
        return cls(transformer, text_encoder, vae, configs)

    @property
    def family(self) -> ModelFamily:
        """The model family whose transformer class this is (families that share a class, as Qwen-Image and
        Edit-Plus do, share its layers and LoRA targets)."""
        name = type(self.transformer).__name__
        return next(f for f in FAMILIES.values() if f.transformer_class == name)

    @property
    def single_stream(self) -> bool:
        """Qwen-Image-2.1's transformer: one token stream (text, condition and noise tokens through the same
        block weights) with a prefix KV cache, instead of Qwen-Image's two streams."""
        return self.family.prefix_cache

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The linear layers tenant adapters are budgeted on: the family's (Qwen-Image's are the Lightning LoRAs'
        targets)."""
        return self.family.lora_targets

    @property
    def inner_width(self) -> int:
        cfg = self.configs["transformer"]
        return cfg["num_attention_heads"] * cfg["attention_head_dim"]

    @staticmethod
    def parameters(module) -> int:
        return sum(p.numel() for p in module.parameters())

    def lora_parameters(self, rank: int, targets: tuple[str, ...] | list[str] | None = None) -> int:
        """Parameters of a rank-`rank` LoRA on the linear layers `targets` names (peft's matching: a module name
        equal to a target or ending in "." + target): rank x (in + out) each. Default: `lora_targets`."""
        targets = self.lora_targets if targets is None else targets
        total = 0
        for name, module in self.transformer.named_modules():
            if hasattr(module, "in_features") and any(name == t or name.endswith("." + t) for t in targets):
                total += rank * (module.in_features + module.out_features)
        return total

    def transformer_twin(self, layers: int, dtype: str, rank: int = 64, targets=None):
        """A `layers`-block twin of the transformer on the meta device at `dtype`, with a rank-`rank` LoRA on
        `targets` (default: `lora_targets`). A single-stream (2.1) twin's blocks and output norm move the real CPU
        masks `transformer_inputs` gives to the meta device as they receive them (see `transformer_inputs`)."""
        import diffusers
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        config = {**self.configs["transformer"], "num_layers": layers}
        with torch.device("meta"):
            model = getattr(diffusers, config["_class_name"]).from_config(config)
            model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(
                self.lora_targets if targets is None else targets)), model).to(getattr(torch, dtype))
        if self.single_stream:
            def masks_to_meta(module, args, kwargs):
                move = lambda x: x.to("meta") if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x
                return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

            for module in (*model.transformer_blocks, model.norm_out):
                module.register_forward_pre_hook(masks_to_meta, with_kwargs=True)
        return model

    def transformer_inputs(self, dtype: str, rows: int, width: int, height: int, text_tokens: int,
                           conditions: tuple[tuple[int, int], ...] = ()) -> dict:
        """The forward's keyword arguments for `rows` rows at `width` x `height` with `text_tokens` prompt tokens
        and condition images of the sizes `conditions` (each (width, height)), on the meta device. Qwen-Image: an
        instruction edit's condition tokens join the image sequence. Qwen-Image-2.1: its forward reads the values
        of the prompt's image-slot mask to lay out the sequence (slots expanded to 2x2 tokens, the block-causal
        segments), which the meta device has none of, so the mask is a real CPU tensor and every tensor the model
        computes stays on the meta device (`transformer_twin`)."""
        import torch

        kind = dict(device="meta", dtype=getattr(torch, dtype))
        config = self.configs["transformer"]
        timestep = torch.empty(rows, **kind)
        if not self.single_stream:
            shapes = [(1, height // 16, width // 16), *((1, h // 16, w // 16) for w, h in conditions)]
            tokens = sum(r * c for _, r, c in shapes)
            return dict(hidden_states=torch.empty(rows, tokens, config["in_channels"], **kind),
                        encoder_hidden_states=torch.empty(rows, text_tokens, config["joint_attention_dim"], **kind),
                        timestep=timestep, img_shapes=[shapes] * rows, return_dict=False)
        from diffusers.modular_pipelines.qwenimage21.denoise import joint_vision_mask

        target = image_tokens(width, height)
        grids = [(1, h // 16, w // 16) for w, h in conditions] + [(1, height // 16, width // 16)]
        condition_slots = sum(image_tokens(w, h) for w, h in conditions) // 4
        slots = torch.cat([torch.zeros(rows, text_tokens, dtype=torch.bool),
                           torch.ones(rows, condition_slots, dtype=torch.bool)], dim=1)
        return dict(hidden_states=torch.empty(rows, target + 4 * condition_slots, config["in_channels"], **kind),
                    encoder_hidden_states=torch.empty(rows, slots.shape[1], config["context_in_dim"], **kind),
                    timestep=timestep, img_shapes=[grids] * rows, img_mask=joint_vision_mask(slots, target),
                    return_dict=False)

    def transformer_activation_bytes(self, dtype: str, rows: int, width: int, height: int, text_tokens: int,
                                     layers: int = 2, conditions: tuple[tuple[int, int], ...] = (),
                                     cached: bool = False) -> int:
        """Peak activations of one engine step: a forward over `rows` rows at `width` x `height` with
        `text_tokens` prompt tokens each (the engine pads prompts to the longest) and condition images of the
        sizes `conditions`. It runs on a `layers`-block twin with a rank-64 LoRA (`transformer_twin`): a block's
        activations are freed before the next block runs, so the peak is reached by the second block and does
        not grow with depth (tests/test_gpu_budget.py checks it). The engine applies stacked adapters one after
        another, so one LoRA's temporaries stand for a stack's. `cached`: a single-stream (2.1) forward after the
        first step, the noise tokens alone reading the prefix from the KV cache; it first extracts the prefix
        (those keys and values are the cache, budgeted apart: `prefix_cache_bytes`)."""
        import torch

        model = self.transformer_twin(layers, dtype)
        inputs = self.transformer_inputs(dtype, rows, width, height, text_tokens, conditions)
        if not cached:
            return forward_peak_bytes(model, lambda: model(**inputs))
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

        cache = QwenImage21KVCache(layers)
        with torch.no_grad(), memory_efficient_attention():
            model(**inputs, kv_cache=cache, kv_cache_mode="extract")
        return forward_peak_bytes(model, lambda: model(**inputs, kv_cache=cache, kv_cache_mode="cached"))

    def text_encoder_activation_bytes(self, dtype: str, prompts: int, tokens: int) -> int:
        """Peak of one text-encoder forward as `encode_prompt` runs it (`output_hidden_states=True`), including the
        hidden states and logits it returns. No attention mask: building one reads tensor values, which the meta
        device has none of; a padded batch has the same shapes."""
        import torch

        model = self.text_encoder.to(getattr(torch, dtype))
        ids = torch.zeros(prompts, tokens, dtype=torch.int64, device="meta")
        return forward_peak_bytes(model, lambda: model(input_ids=ids, output_hidden_states=True))

    def vae_decode_activation_bytes(self, dtype: str, images: int, width: int, height: int) -> int:
        """Peak of one VAE decode of `images` images (one frame each) at `width` x `height`."""
        import torch

        model = self.vae.to(getattr(torch, dtype))
        scale = 2 ** len(self.configs["vae"]["temperal_downsample"])
        latents = torch.empty(images, self.configs["vae"]["z_dim"], 1, height // scale, width // scale,
                              device="meta", dtype=getattr(torch, dtype))
        return forward_peak_bytes(model, lambda: model.decode(latents, return_dict=False))

    def vae_encode_activation_bytes(self, dtype: str, images: int, width: int, height: int) -> int:
        """Peak of one VAE encode of `images` images (one frame each) at `width` x `height`, with the posterior it
        returns."""
        import torch

        model = self.vae.to(getattr(torch, dtype))
        channels = self.configs["vae"].get("in_channels", 3)  # 2.1's VAE reads RGBA
        pixels = torch.empty(images, channels, 1, height, width, device="meta", dtype=getattr(torch, dtype))
        return forward_peak_bytes(model, lambda: model.encode(pixels, return_dict=False))

    def transformer_flops_per_row(self, image_tokens: int, text_tokens: int) -> float:
        """Forward FLOPs of one row (one image, or one CFG half) of one denoising step: 2 x in x out per token for
        every linear layer on the path its tokens take (image stream: img_in, to_q/k/v, to_out, img_mlp, proj_out;
        text stream: txt_in, add_*_proj, to_add_out, txt_mlp), plus joint attention's QK^T and AV (4 x tokens² x
        inner_dim per block). Per-image modulation linears are negligible and left out."""
        text_path = ("txt_in", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "txt_mlp")
        per_image_token = per_text_token = 0
        for name, module in self.transformer.named_modules():
            if type(module).__name__ != "Linear" or "_mod" in name or "time_text_embed" in name or "norm_out" in name:
                continue
            flops = 2 * module.in_features * module.out_features
            if any(part in name for part in text_path):
                per_text_token += flops
            else:
                per_image_token += flops
        tokens = image_tokens + text_tokens
        attention = self.configs["transformer"]["num_layers"] * 4 * tokens * tokens * self.inner_width
        return per_image_token * image_tokens + per_text_token * text_tokens + attention

    def single_stream_flops_per_row(self, target_tokens: int, prefix_tokens: int, cached: bool) -> float:
        """Forward FLOPs of one row of one Qwen-Image-2.1 step: 2 x in x out per token through every block
        linear (all tokens take the same weights), and attention's QK^T and AV (4 x queries x keys x inner width
        per block). `cached`: the noise tokens alone, their queries against the cached prefix and themselves (every
        step after the first); otherwise the whole sequence, as a server without the cache pays every step (its
        prefix counted as full attention: the block-causal mask makes it at most that)."""
        linear = sum(2 * module.in_features * module.out_features
                     for module in self.transformer.transformer_blocks.modules()
                     if type(module).__name__ == "Linear")
        layers, tokens = self.configs["transformer"]["num_layers"], target_tokens + prefix_tokens
        attention = 4 * layers * self.inner_width
        if cached:
            return linear * target_tokens + attention * target_tokens * tokens
        return linear * tokens + attention * tokens * tokens

    def text_encoder_flops_per_prompt(self, tokens: int) -> float:
        """2 x parameters of the language model per token (the vision tower is idle for text prompts) plus its
        attention, for one prompt of `tokens` tokens."""
        text = self.configs["text_encoder"]["text_config"]
        language = self.parameters(self.text_encoder.model.language_model)
        attention = text["num_hidden_layers"] * 4 * tokens * tokens * text["hidden_size"]
        return 2 * language * tokens + attention


def image_tokens(width: int, height: int) -> int:
    """Transformer tokens of one image: (width/16) x (height/16) (VAE 8x, then 2x2 patches)."""
    return (width // 16) * (height // 16)


def condition_sizes(preset: ModelPreset, width: int, height: int) -> tuple[tuple[int, int], ...]:
    """(width, height) of every condition image an edit at `width` x `height` can carry at most: the family's most
    input images, each square at the preset's `edit.vae_image_area` (the output's size when it has none). Empty for
    a family without condition tokens."""
    family = preset.model_family
    if not family.condition_tokens:
        return ()
    from lightray.models.qwen_image_edit import calculate_dimensions

    area = preset.edit.vae_image_area
    size = (width, height) if area is None else calculate_dimensions(area, 1.0)
    return (size,) * family.input_images[1]


def sequence_tokens(preset: ModelPreset, width: int, height: int) -> int:
    """Image tokens of one transformer row at `width` x `height`: the noise tokens, plus an instruction edit's
    condition tokens at most (at 1024² with three 1024² inputs, four times the text-to-image sequence)."""
    return image_tokens(width, height) + sum(image_tokens(w, h) for w, h in condition_sizes(preset, width, height))
