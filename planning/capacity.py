"""GPU memory budgets and capacity arithmetic for the real Qwen-Image deployment of a Serve config, from configs alone.

Weights are counted exactly and activations measured on the meta device (no memory, no download) from the published
config.json files in `configs/qwen-image/` (`lightray.meta_models`, which the trainer's memory plan shares). What is neither (per-process CUDA
overhead, workspaces, stage times, cold-start parts) is an *assumption* with its reason,
declared in a GPU-class file under `configs/capacity/` and loaded into `CapacityAssumptions`: tests check that the
Serve config fits the GPU under them (tests/test_gpu_budget.py), docs/capacity.md is the table
`python -m planning.capacity` prints from them, and a measured GPU run should replace them.
It is a planning tool beside the layers, not part of the running app: it reads what the Serve config deploys
(`deployments/`) and counts work as the ingress's admission does (`serve_app.admission`); nothing here starts Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from deployments.text_encoder import MAX_BATCH_SIZE as TEXT_ENCODER_BATCH_SIZE
from lightray.config import REPO_ROOT, EngineConfig, ModelPreset, load_preset
# The meta-device models and measurements, shared with the trainer's memory plan.
from lightray.meta_models import (
    DTYPE_BYTES,
    GIB,
    MIB,
    GpuClass,
    MetaModels,
    condition_sizes,
    image_tokens,
    sequence_tokens,
    text_encoder_tokens,
)
from lightray.models.qwen_image_21 import prefix_cache_bytes
from serve_app.admission import WORK_UNIT_PIXELS


class StageTimeAssumptions(BaseModel):
    """How long a stage takes on this GPU class: assumed until a GPU run measures it (docs/capacity.md)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    transformer_mfu: float = Field(gt=0, le=1)
    """Fraction of `dense_bf16_tflops` the 20B transformer's forward reaches at 1024² (large GEMMs, flash
    attention): the step time is its FLOPs, counted from the config, over this."""
    text_encoder_mfu: float = Field(gt=0, le=1)
    """The same for one prompt through the 7B text encoder (short sequences: lower)."""
    vae_decode_s_per_megapixel: float = Field(gt=0)
    """VAE decode time per output megapixel, one image per call."""
    fixed_step_overhead_s: float = Field(ge=0)
    """Per engine step, independent of rows: Python scheduling, per-segment conditioning linears, launches. The
    CPU engine curve (benchmarks/results/engine.json) shows such an intercept; on a GPU it is assumed, not
    measured."""


class LifecycleAssumptions(BaseModel):
    """What a replica's cold start is made of, to size scale-down and shutdown delays."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    pod_start_s: float = Field(ge=0)
    """A worker pod scheduled on a node already in the pool until its raylet joins (no node provisioning)."""
    image_pull_s: float = Field(ge=0)
    """Pulling the CUDA image onto a node that does not have it."""
    weights_read_mib_s: float = Field(gt=0)
    """Sustained read of the ReadOnlyMany model volume into GPU memory."""
    warmup_s: float = Field(ge=0)
    """CUDA init, first forwards and the health check's warm-up after the weights are in."""


class CapacityAssumptions(BaseModel):
    """Everything the budget assumes about one GPU class (a YAML file under configs/capacity/)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    gpu: GpuClass
    """The GPU class and its per-process costs."""
    serve_config: str = "configs/serve/gpu.yaml"
    """The Serve config sized for this class (repository-relative)."""
    model_configs: str = "configs/qwen-image"
    """Folder with the published transformer/, text_encoder/ and vae/ config.json files."""
    tenant_adapter_rank: int = Field(ge=1)
    """Largest rank a tenant adapter is budgeted at (on `LIGHTNING_LORA_TARGETS`); the adapter cache holds
    `adapter_cache_size` of them per Denoiser replica."""
    vae_images_per_decode: int = Field(ge=1)
    """Images one VAE decode call holds at once (1 when the preset decodes in slices of one image, `vae_decode`)."""
    stage_times: StageTimeAssumptions
    """Per-stage speeds on this class (assumed until measured)."""
    lifecycle: LifecycleAssumptions
    """What a replica's cold start is made of."""

    @classmethod
    def load(cls, path: str | Path) -> "CapacityAssumptions":
        p = Path(path)
        return cls.model_validate(yaml.safe_load((p if p.is_absolute() else REPO_ROOT / p).read_text()))

    @cached_property
    def serve(self) -> dict:
        return yaml.safe_load((REPO_ROOT / self.serve_config).read_text())

    @cached_property
    def app(self) -> dict:
        return self.serve["applications"][0]

    @cached_property
    def deployments(self) -> dict[str, dict]:
        return {d["name"]: d for d in self.app["deployments"]}

    @cached_property
    def preset(self) -> ModelPreset:
        return load_preset(self.app["args"]["preset"])

    @cached_property
    def engine(self) -> EngineConfig:
        return EngineConfig(**self.app["args"].get("engine", {}))

    @cached_property
    def models(self) -> "MetaModels":
        return MetaModels.build(REPO_ROOT / self.model_configs)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.preset.dtype]

    def gpu_fraction_bytes(self, deployment: str) -> int:
        """Device memory a replica of `deployment` may use: its `num_gpus` share of the GPU. Ray does not enforce
        memory, so every replica staying within its share is what lets any packing of shares <= 1 fit."""
        return int(self.deployments[deployment]["ray_actor_options"].get("num_gpus", 0) * self.gpu.memory_mib * MIB)


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """Device memory one replica of a deployment needs, by item (bytes), and what its GPU share gives it."""

    deployment: str
    items: dict[str, int]
    available: int

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def headroom(self) -> int:
        return self.available - self.total

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.items.items())
        return (f"{self.deployment}: {self.total / GIB:.2f} GiB of {self.available / GIB:.2f} GiB ({parts}; "
                f"headroom {self.headroom / GIB:.2f} GiB)")


def text_tokens(preset: ModelPreset) -> int:
    """Most tokens a prompt reaches the transformer with (the template prefix is dropped before it)."""
    return preset.max_sequence_length


def denoiser_rows(a: CapacityAssumptions) -> int:
    """Most transformer rows in one step: the engine's budget, or the largest single request if larger (it runs
    alone, never split): n images, two rows each with true CFG."""
    return max(a.engine.max_batch_rows, a.preset.max_images_per_request * 2)


def budgets(a: CapacityAssumptions) -> dict[str, MemoryBudget]:
    """Per-replica device memory of the three GPU deployments at the largest served size."""
    m, b = a.models, a.dtype_bytes
    reserved = a.gpu.reserved_mib_per_process * MIB
    width, height = a.preset.largest_size
    img_tok, txt_tok = image_tokens(width, height), text_tokens(a.preset)
    t_cfg = m.configs["transformer"]
    lora = m.lora_parameters

    rows = denoiser_rows(a)
    live = a.engine.max_live_requests
    # Each live request keeps float32 packed latents (and the engine's copy for the Euler step), its prompt
    # embeddings (with the negative ones under CFG) and an edit's condition tokens between steps.
    condition_tok = sequence_tokens(a.preset, width, height) - img_tok
    engine_state = live * (a.preset.max_images_per_request * img_tok * t_cfg["in_channels"] * 4 * 2
                           + 2 * txt_tok * text_width(m) * b
                           + condition_tok * t_cfg["in_channels"] * b)
    denoiser = {
        "weights": m.parameters(m.transformer) * b,
        # Every served variant's distilled LoRA stays loaded (unfused: rows of different variants share a step);
        # a fused one (`fuse:`) is in the weights.
        "lightning_loras": resident_lightning_loras(a.preset) * lora(64) * b,
        "adapter_cache": adapter_cache_size(a) * lora(a.tenant_adapter_rank) * b,
        "activations": transformer_activation_bytes(a, rows, width, height),
        "engine_state": engine_state,
        "cuda_reserved": reserved,
    }
    text_encoder = {
        "weights": m.parameters(m.text_encoder) * b,
        # Measured with what the forward returns: encode_prompt asks for every layer's hidden states (it keeps the
        # last) and the model's head computes logits for every token.
        "activations": m.text_encoder_activation_bytes(a.preset.dtype, text_encoder_batch_prompts(a),
                                                       text_encoder_tokens(a.preset)),
        "cuda_reserved": reserved,
    }
    vae = {
        "weights": m.parameters(m.vae) * b,
        "activations": m.vae_decode_activation_bytes(a.preset.dtype, a.vae_images_per_decode, width, height),
        "cuda_reserved": reserved,
    }
    return {name: MemoryBudget(name, items, a.gpu_fraction_bytes(name))
            for name, items in (("TextEncoder", text_encoder), ("Denoiser", denoiser), ("VaeDecoder", vae))}


def text_width(m: MetaModels) -> int:
    """Width of the prompt embeddings the Denoiser holds: Qwen-Image's `joint_attention_dim`, 2.1's
    `context_in_dim`."""
    cfg = m.configs["transformer"]
    return cfg.get("joint_attention_dim") or cfg["context_in_dim"]


def transformer_activation_bytes(a: CapacityAssumptions, rows: int, width: int, height: int) -> int:
    """Peak activations of the Denoiser's largest step at `width` x `height`. A prefix-cache family (2.1) runs two
    kinds of forward: a request's first step extracts its prefix alone (its n rows, the whole sequence), later
    steps batch up to `rows` rows of noise tokens against their caches; the budget is the larger."""
    m, conditions = a.models, condition_sizes(a.preset, width, height)
    measure = dict(width=width, height=height, text_tokens=text_tokens(a.preset), conditions=conditions)
    if not m.single_stream:
        return m.transformer_activation_bytes(a.preset.dtype, rows, **measure)
    return max(m.transformer_activation_bytes(a.preset.dtype, a.preset.max_images_per_request, **measure),
               m.transformer_activation_bytes(a.preset.dtype, rows, cached=True, **measure))


def request_prefix_cache_bytes(a: CapacityAssumptions, width: int, height: int, pictures: int) -> int:
    """The prefix KV cache of one one-image request of a prefix-cache family at `width` x `height` with a prompt
    of the preset's longest and `pictures` condition images (each at the output's area): both CFG branches when
    the preset's default variant uses true CFG (the engine's `_size_prefix`)."""
    prefix = text_tokens(a.preset) + pictures * image_tokens(width, height)
    branches = 2 if a.preset.served_variants[0].true_cfg_scale > 1 else 1
    return prefix_cache_bytes(a.models.configs["transformer"], branches * prefix, 1, a.dtype_bytes)


def adapter_cache_size(a: CapacityAssumptions) -> int:
    """Tenant adapters a Denoiser replica keeps loaded: the Serve config's, or the service's default."""
    from serve_app.settings import ServiceSettings

    return int(a.app["args"].get("adapter_cache_size", ServiceSettings.model_fields["adapter_cache_size"].default))


def text_encoder_batch_prompts(a: CapacityAssumptions) -> int:
    """Prompts in one text-encoder forward at most: the deployment's `serve.batch` size, two prompts per request
    under true CFG (the prompt and its negative)."""
    return TEXT_ENCODER_BATCH_SIZE * 2


def gpus_for(shares: list[float]) -> int:
    """Whole GPUs that replicas with these `num_gpus` shares take, placed first-fit decreasing (Ray places a
    replica's share on one GPU; it never splits it)."""
    free: list[float] = []
    for share in sorted(shares, reverse=True):
        for i, room in enumerate(free):
            if share <= room + 1e-9:
                free[i] -= share
                break
        else:
            free.append(1.0 - share)
    return len(free)


# ----------------------------------------------------------------------------------------------- time and capacity

@dataclasses.dataclass(frozen=True)
class StageTimes:
    """Seconds per unit of work on one replica (assumed: FLOPs over an assumed utilisation, docs/capacity.md)."""

    encode_s_per_prompt: float
    step_s_per_row: float
    step_overhead_s: float
    decode_s_per_image: float

    def step_s(self, rows: int) -> float:
        """One engine step over `rows` rows: a fixed part plus a per-row part (the engine's CPU curve has this
        shape; a GPU at 1024² is compute-bound from one row, so the per-row part dominates)."""
        return self.step_overhead_s + rows * self.step_s_per_row


def stage_times(a: CapacityAssumptions, width: int = 1024, height: int = 1024) -> StageTimes:
    m, t = a.models, a.stage_times
    flops_s = a.gpu.dense_bf16_tflops * 1e12
    # A typical prompt (~64 tokens and the 39-token template), not the longest: capacity is about the usual request.
    prompt_tokens = 39 + 64
    return StageTimes(
        encode_s_per_prompt=m.text_encoder_flops_per_prompt(prompt_tokens) / (flops_s * t.text_encoder_mfu),
        step_s_per_row=row_step_s(a, width, height),
        step_overhead_s=t.fixed_step_overhead_s,
        decode_s_per_image=t.vae_decode_s_per_megapixel * width * height / 1e6,
    )


def row_step_flops(a: CapacityAssumptions, width: int, height: int, pictures: int | None = None,
                   cached: bool = True) -> float:
    """FLOPs of one row of a typical step (a ~64-token prompt) at `width` x `height`: with an instruction edit's
    most condition images, or `pictures` of them (each at the output's area) for a prefix-cache family, whose
    steps after the first read the prefix from its cache (`cached`) instead of recomputing it."""
    m = a.models
    if not m.single_stream:
        return m.transformer_flops_per_row(sequence_tokens(a.preset, width, height), 64)
    pictures = a.preset.model_family.input_images[1] if pictures is None else pictures
    prefix = 64 + pictures * image_tokens(width, height)
    return m.single_stream_flops_per_row(image_tokens(width, height), prefix, cached)


def row_step_s(a: CapacityAssumptions, width: int, height: int, pictures: int | None = None,
               cached: bool = True) -> float:
    """Seconds of `row_step_flops` on the GPU class, at its assumed transformer utilisation."""
    flops_s = a.gpu.dense_bf16_tflops * 1e12 * a.stage_times.transformer_mfu
    return row_step_flops(a, width, height, pictures, cached) / flops_s


def resident_lightning_loras(preset: ModelPreset) -> int:
    """Lightning LoRAs a Denoiser replica of `preset` holds as LoRA layers: every served variant's, but a fused one's."""
    return sum(1 for v in preset.served_variants if v.lightning_lora and v.id != preset.fuse)


def cold_start_s(a: CapacityAssumptions) -> float:
    """A Denoiser replica on a new pod: the pod, the image, the weights it reads (counted), the warm-up."""
    # A fused replica reads its Lightning file too (it merges it at load).
    loras = resident_lightning_loras(a.preset) + (a.preset.fuse is not None)
    weights = (a.models.parameters(a.models.transformer) + loras * a.models.lora_parameters(64)) * a.dtype_bytes
    lc = a.lifecycle
    return lc.pod_start_s + lc.image_pull_s + weights / MIB / lc.weights_read_mib_s + lc.warmup_s


def request_seconds(a: CapacityAssumptions, steps: int, rows: int, times: StageTimes | None = None) -> float:
    """Denoising time of one request of `rows` rows alone on a replica (engine steps of exactly its rows)."""
    times = times or stage_times(a)
    return steps * times.step_s(rows)


def weighted_bound_drain_s(a: CapacityAssumptions, ingress_replicas: int, times: StageTimes) -> float:
    """Seconds the Denoisers at max_replicas need to finish everything the ingresses may admit at once, at 1024²
    (the work unit of `serve_app.admission`)."""
    bound = a.app["args"]["max_admitted_work"]
    replicas = a.deployments["Denoiser"]["autoscaling_config"]["max_replicas"]
    row_steps = ingress_replicas * bound * (1024 * 1024) / WORK_UNIT_PIXELS
    rows = a.engine.max_batch_rows
    return row_steps / rows * times.step_s(rows) / replicas


def cpu_step_curve(path: Path = REPO_ROOT / "benchmarks/results/engine.json") -> dict[str, tuple[float, float, float]]:
    """The engine's measured CPU step time vs rows (benchmarks/bench_engine.py), fitted per size as
    t(rows) = fixed + rows x per_row by least squares: {size: (fixed_ms, per_row_ms, worst relative residual)}."""
    curve = json.loads(path.read_text())["step_ms_by_rows"]
    fits = {}
    for size in sorted({key.split("/")[0] for key in curve}):
        points = [(int(k.split("/")[1]), v) for k, v in curve.items() if k.startswith(size + "/")]
        n = len(points)
        mean_r = sum(r for r, _ in points) / n
        mean_t = sum(t for _, t in points) / n
        slope = sum((r - mean_r) * (t - mean_t) for r, t in points) / sum((r - mean_r) ** 2 for r, _ in points)
        fixed = mean_t - slope * mean_r
        worst = max(abs(fixed + slope * r - t) / t for r, t in points)
        fits[size] = (fixed, slope, worst)
    return fits


@dataclasses.dataclass(frozen=True)
class CapacityRow:
    """Replicas and GPUs for a target rate of Lightning 8-step 1024² images (one row each, no CFG)."""

    images_per_s: float
    denoisers: int
    text_encoders: int
    vae_decoders: int
    gpus: int
    latency_s: float


def capacity_plan(a: CapacityAssumptions, images_per_s: float, utilisation: float = 0.7,
                  steps: int = 8) -> CapacityRow:
    """Replicas per stage so each runs at most `utilisation` busy at `images_per_s` (the rest absorbs bursts and
    keeps queues short), GPUs as Ray packs their shares (whole GPUs for Denoisers, shares first-fit), and the
    latency of one image at that load: encode + `steps` engine steps at the rows each replica then carries +
    decode."""
    t = stage_times(a)
    rows = a.engine.max_batch_rows
    per_denoiser = rows / (steps * t.step_s(rows))  # images/s with every step full
    denoisers = math.ceil(images_per_s / (utilisation * per_denoiser))
    encoders = math.ceil(images_per_s * t.encode_s_per_prompt / utilisation)
    decoders = math.ceil(images_per_s * t.decode_s_per_image / utilisation)
    shares = [a.deployments[n]["ray_actor_options"]["num_gpus"] for n in ("TextEncoder", "VaeDecoder")]
    fractional = gpus_for([shares[0]] * encoders + [shares[1]] * decoders)
    # Rows a Denoiser carries per step at this load (Little's law: rate x time in the engine), at least 1.
    carried = min(rows, max(1.0, images_per_s / denoisers * steps * t.step_s(rows)))
    latency = t.encode_s_per_prompt + steps * t.step_s(math.ceil(carried)) + t.decode_s_per_image
    return CapacityRow(images_per_s, denoisers, encoders, decoders, denoisers + fractional, latency)


def capacity_markdown(a: CapacityAssumptions, targets: tuple[float, ...] = (0.5, 1, 2, 4, 8, 16)) -> str:
    """The tables of docs/capacity.md (between its GENERATED markers)."""
    t = stage_times(a)
    b = budgets(a)
    lines = ["| deployment | GPU share | weights | other items | total | available | headroom |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, budget in b.items():
        other = ", ".join(f"{k} {v / GIB:.2f}" for k, v in budget.items.items() if k != "weights")
        share = a.deployments[name]["ray_actor_options"]["num_gpus"]
        lines.append(f"| {name} | {share:g} | {budget.items['weights'] / GIB:.2f} GiB | {other} GiB | "
                     f"{budget.total / GIB:.2f} GiB | {budget.available / GIB:.2f} GiB | "
                     f"{budget.headroom / GIB:.2f} GiB |")
    width, height = a.preset.largest_size
    lines += ["", f"At the largest served size ({width}x{height}), {denoiser_rows(a)} Denoiser rows a step, "
              f"{text_encoder_batch_prompts(a)} prompts of {text_encoder_tokens(a.preset)} tokens a text-encoder "
              f"forward, {a.vae_images_per_decode} image a VAE call; {a.gpu.name}, {a.gpu.memory_mib} MiB.", ""]
    lines += ["| stage time at 1024² (assumed GPU figures) | value |", "| --- | --- |",
              f"| text encoder, one ~100-token prompt | {t.encode_s_per_prompt * 1000:.1f} ms |",
              f"| transformer, one row-step | {t.step_s_per_row * 1000:.0f} ms |",
              f"| engine step, fixed part | {t.step_overhead_s * 1000:.0f} ms |",
              f"| engine step, {a.engine.max_batch_rows} rows | {t.step_s(a.engine.max_batch_rows) * 1000:.0f} ms |",
              f"| VAE decode, one image | {t.decode_s_per_image * 1000:.0f} ms |",
              f"| Denoiser cold start | {cold_start_s(a):.0f} s |", ""]
    lines += ["| CPU engine step (measured, benchmarks/results/engine.json) | fixed | per row | worst fit error |",
              "| --- | --- | --- | --- |"]
    for size, (fixed, per_row, worst) in cpu_step_curve().items():
        lines.append(f"| {size}, 1-16 rows | {fixed:.1f} ms | {per_row:.2f} ms | {worst * 100:.0f} % |")
    lines += ["", "| target (1024², Lightning 8 steps) | Denoiser replicas | TextEncoder replicas | "
              "VaeDecoder replicas | GPUs | latency per image | fits configs/serve/gpu.yaml |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    max_of = {n: a.deployments[n]["autoscaling_config"]["max_replicas"] for n in GPU_DEPLOYMENTS}
    for rate in targets:
        row = capacity_plan(a, rate)
        fits = (row.denoisers <= max_of["Denoiser"] and row.text_encoders <= max_of["TextEncoder"]
                and row.vae_decoders <= max_of["VaeDecoder"])
        lines.append(f"| {rate:g} images/s | {row.denoisers} | {row.text_encoders} | {row.vae_decoders} | "
                     f"{row.gpus} | {row.latency_s:.1f} s | {'yes' if fits else 'no'} |")
    lines += ["", "| instruction-edit preset on the same shares, up to 3 input pictures (1024² each) | tokens per row "
              "at 1024² | Denoiser activations (largest size) | Denoiser total | headroom | transformer row-step at "
              "1024² |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name in EDIT_PRESETS:
        edit = with_preset(a, load_preset(name))
        budget, times = budgets(edit)["Denoiser"], stage_times(edit)
        lines.append(f"| {name} | {sequence_tokens(edit.preset, 1024, 1024)} | "
                     f"{budget.items['activations'] / GIB:.2f} GiB | {budget.total / GIB:.2f} GiB | "
                     f"{budget.headroom / GIB:.2f} GiB | {times.step_s_per_row * 1000:.0f} ms |")
    lines += ["", *qwen_image_21_markdown(a)]
    return "\n".join(lines)


EDIT_PRESETS = ("qwen-image-edit-2511-lightning", "qwen-image-edit-2509-lightning")
"""The instruction-edit presets the tables size on the GPU class (configs/serve/gpu.yaml serves Qwen-Image)."""


QWEN_IMAGE_21_PRESETS = ("qwen-image-2.1-turbo", "qwen-image-2.1")
"""The Qwen-Image-2.1 presets the tables size on the GPU class, with the published configs of
`QWEN_IMAGE_21_CONFIGS`."""
QWEN_IMAGE_21_CONFIGS = "configs/qwen-image-2.1"


def with_preset(a: CapacityAssumptions, preset: ModelPreset, model_configs: str | None = None
                ) -> CapacityAssumptions:
    """`a` with `preset` served instead of the Serve config's (same shares, engine and GPU class), its modules
    from `model_configs` when they are another family's."""
    other = a.model_copy(update={"model_configs": model_configs or a.model_configs})
    other.__dict__.pop("models", None)
    other.__dict__["preset"] = preset
    return other


def qwen_image_21_markdown(a: CapacityAssumptions, size: int = 1024) -> list[str]:
    """The 2.1 tables: its replicas' memory on the Serve config's shares (Turbo), and what its prefix KV cache costs
    and saves at `size`² (each 2.1 preset)."""
    sized = {name: with_preset(a, load_preset(name), QWEN_IMAGE_21_CONFIGS) for name in QWEN_IMAGE_21_PRESETS}
    budgets_of = {name: budgets(q) for name, q in sized.items()}
    turbo = QWEN_IMAGE_21_PRESETS[0]
    lines = [f"| {turbo} on the same shares, at its largest size | weights | other items | total | "
             "available | headroom |", "| --- | --- | --- | --- | --- | --- |"]
    for name, budget in budgets_of[turbo].items():
        other = ", ".join(f"{k} {v / GIB:.2f}" for k, v in budget.items.items() if k != "weights" and v)
        lines.append(f"| {name} | {budget.items['weights'] / GIB:.2f} GiB | {other} GiB | {budget.total / GIB:.2f} "
                     f"GiB | {budget.available / GIB:.2f} GiB | {budget.headroom / GIB:.2f} GiB |")
    lines += ["", f"| Qwen-Image-2.1 at {size}² | noise tokens per row | prefix KV cache per request: text only / 3 "
              "pictures | Denoiser room for caches | requests it holds: text only / 3 pictures | row-step, text only: "
              "cached prefix / recomputed | row-step, 3 pictures: cached / recomputed |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, q in sized.items():
        room = budgets_of[name]["Denoiser"].headroom
        caches = [request_prefix_cache_bytes(q, size, size, n) for n in (0, 3)]
        steps = [f"{row_step_s(q, size, size, n, cached=True) * 1000:.0f} / "
                 f"{row_step_s(q, size, size, n, cached=False) * 1000:.0f} ms" for n in (0, 3)]
        lines.append(f"| {name} | {image_tokens(size, size)} | {caches[0] / GIB:.2f} / {caches[1] / GIB:.2f} GiB | "
                     f"{room / GIB:.2f} GiB | {room // caches[0]} / {room // caches[1]} | {steps[0]} | {steps[1]} |")
    return lines


GPU_DEPLOYMENTS = ("TextEncoder", "Denoiser", "VaeDecoder")

if __name__ == "__main__":
    print(capacity_markdown(CapacityAssumptions.load("configs/capacity/h100-80gb.yaml")))
