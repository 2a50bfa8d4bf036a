"""The denoising engine: one step loop per replica that batches requests at step level.

A request enters with `submit` and is denoised by `step`, which the engine's loop thread calls again and again
(`start`), or an in-process caller drives itself (`denoise`). At every step boundary the engine

1. applies queued adapter commands (an eviction waits while a live request still uses the adapter),
2. admits new requests (loading their tenant adapters; a corrupt adapter fails that request alone),
3. drops cancelled requests,
4. asks `StepScheduler` which requests run now (priority, budget; the others are paused),
5. runs ONE transformer forward per latent grid over all chosen rows (CFG's conditional and unconditional rows,
   any step index, schedule, variant or LoRA stack; a Qwen-Image-2.1 grid splits further by prefix-cache mode and
   prompt layout, `lightray.engine.prefix_cache`), and
6. does each request's own Euler step (float32, as the scheduler does), true-CFG combination, inpainting blend
   and progress report.

It reuses diffusers' pieces (the transformer's `forward`, `prepare_latents`, `retrieve_timesteps` /
`calculate_shift`, `prepare_mask_latents`, the LoRA loader) but never calls a pipeline's `__call__`. A request
alone gives exactly its family's pipeline's latents (`QwenImagePipeline.__call__` and the img2img / inpaint
pipelines'; `QwenImageEditPlusPipeline.__call__` for an instruction edit, whose rows carry condition tokens after
the noise tokens), and a row's result does not depend on the rows beside it (`lightray.engine.batched_model` says
how), so batching, pausing and resuming change no pixel at a fixed thread count.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageInpaintPipeline, QwenImagePipeline
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.image_processor import VaeImageProcessor
from diffusers.modular_pipelines.qwenimage21.inputs import pack_latents as pack_unpatched_latents
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from lightray.config import EngineConfig, ModelPreset, VariantConfig, load_preset
from lightray.errors import NotFound, RequestError
from lightray.engine.load import StepCurve, work_seconds
from lightray.contracts import (
    AdapterLoadError,
    ConditionLatents,
    DenoiseCancelled,
    DenoiseParams,
    EngineFull,
    ImageLatents,
    StepProgress,
    TextEmbeddings,
)
from lightray.engine import batched_model, prefix_cache
from lightray.engine.scheduler import StepScheduler
from lightray.models.qwen_image_21 import checkpoint_sample_sigmas, prefix_cache_bytes
from lightray.stages.common import HealthProbe, check_parameter_dtype, generators, settle, torch_dtype

logger = logging.getLogger("lightray.engine")


@dataclasses.dataclass(frozen=True)
class StepStats:
    """One transformer forward of a step, for metrics."""

    rows: int
    requests: int
    grid: tuple[int, int]
    forward_ms: float
    condition_tokens: int = 0
    """Condition tokens per row (an instruction edit's input images), beside the grid's noise tokens."""


ProgressCallback = Callable[[StepProgress], None]


class EngineRequest:
    """A submitted request: its handle for the caller (`future`, `cancel`) and its state inside the engine."""

    def __init__(self, seq: int, params: DenoiseParams, variant: VariantConfig, on_progress: ProgressCallback | None):
        self.seq = seq
        self.params = params
        self.variant = variant
        self.priority = params.priority
        self.tenant = params.tenant
        self.on_progress = on_progress
        self.future: concurrent.futures.Future[np.ndarray] = concurrent.futures.Future()
        self.submitted_at = time.perf_counter()
        self.first_step_at: float | None = None
        """When the engine began this request's first step (perf_counter)."""
        self.paused_steps = 0
        self.waited_steps = 0
        self.adapter_paths: dict[str, str] = {}
        self._cancelled = threading.Event()
        # Filled by the engine when the request is prepared.
        self.rows = 0
        self.image_tokens = 0
        """Noise tokens of one image (what the schedule's shift is computed from)."""
        self.grid = (0, 0)
        self.condition: torch.Tensor | None = None
        """[1, tokens, 64]: an instruction edit's condition tokens, after every row's noise tokens."""
        self.condition_grids: tuple[tuple[int, int], ...] = ()
        self.prompt_slots: torch.Tensor | None = None
        """[text tokens] bool: the prompt's image slots (a prefix-cache family's `image_pad_mask`)."""
        self.negative_slots: torch.Tensor | None = None
        self.prefix_tokens: int | None = None
        """A prefix-cache family's prefix in the transformer's sequence: its text tokens and condition tokens."""
        self.prefix_cache_bytes = 0
        """What its prefix caches will hold once built (every layer's keys and values, every branch and row)."""
        self.prefix_cache = prefix_cache.PrefixCache()
        """A prefix-cache family's per-layer keys and values of the prompt and condition tokens, built by the first
        forward and freed when the request ends (`lightray.engine.prefix_cache`)."""
        self.step = 0
        self.stack: tuple[batched_model.AdapterKey, ...] = ()
        self.prompt: torch.Tensor
        self.negative: torch.Tensor | None = None
        self.latents: torch.Tensor
        self.timesteps: torch.Tensor
        self.sigmas: torch.Tensor
        self.image_latents: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def signature(self) -> tuple:
        """What one row's sequence looks like: requests batch together only on equal signatures."""
        return (self.grid, *self.condition_grids)

    @property
    def condition_tokens(self) -> int:
        return sum(r * c for r, c in self.condition_grids)

    @property
    def sequence_tokens(self) -> int:
        """Tokens one row computes at its next step: with a prefix cache built, the noise tokens alone."""
        if self.prefix_tokens is not None:
            return self.image_tokens + (0 if "cond" in self.prefix_cache else self.prefix_tokens)
        return self.image_tokens + self.condition_tokens

    @property
    def started(self) -> bool:
        """At least one step done: a request the scheduler leaves out is then paused, not waiting."""
        return self.step > 0

    @property
    def remaining_steps(self) -> int:
        return self.total_steps - self.step

    def cancel(self) -> None:
        """Stop this request at the next step boundary (its future then raises `DenoiseCancelled`)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> np.ndarray:
        return self.future.result(timeout)


class DenoiseEngine:
    """Owns one transformer (and its LoRA adapters) and denoises every request submitted to it."""

    def __init__(self, preset: ModelPreset | str | dict | None = None, config: EngineConfig | None = None,
                 on_step: Callable[[StepStats], None] | None = None, transformer: torch.nn.Module | None = None):
        """`transformer`: an already built transformer of the preset's family and dtype, used instead of loading
        the folder's `transformer/` (benchmarks/gpu_check.py's random full-size weights, 41 GB never written to
        disk); the folder still gives the scheduler and the VAE's config."""
        self.preset = load_preset(preset) if preset is not None else load_preset()
        self.config = config or EngineConfig()
        self.scheduler = StepScheduler(self.config)
        self.device = torch.device(self.preset.device)
        self.dtype = torch_dtype(self.preset.dtype)
        self.on_step = on_step
        self.family = self.preset.model_family
        # The pipeline object holds the components and lends its LoRA loader (Qwen-Image's, which 2.1's modular
        # pipeline uses too) and latent helpers; its __call__ is never used.
        transformer_class = getattr(diffusers, self.family.transformer_class)
        self.pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(self.preset.root / "scheduler"),
            vae=None, text_encoder=None, tokenizer=None,
            transformer=transformer if transformer is not None else transformer_class.from_pretrained(
                self.preset.root / "transformer", torch_dtype=self.dtype),
        ).to(self.device)
        self.pipe.vae_scale_factor = self.preset.vae_scale_factor  # without a VAE it would assume 8
        self.transformer = self.pipe.transformer
        self.latent_channels = self.transformer.config.in_channels // self.family.latent_patch ** 2
        self.text_width = self.transformer.config.get("joint_attention_dim") or self.transformer.config.context_in_dim
        """Width of the text encoder's embeddings the transformer reads (2.1's config calls it `context_in_dim`)."""
        self.checkpoint_sigmas = checkpoint_sample_sigmas(self.preset.root)
        """The checkpoint's own sigma grid (Qwen-Image-2.1 Turbo's `sample_sigmas`), for `checkpoint_sigmas`
        variants."""
        self._inpaint = QwenImageInpaintPipeline(scheduler=self.pipe.scheduler, vae=None, text_encoder=None,
                                                 tokenizer=None, transformer=None)
        self._inpaint.vae_scale_factor = self.preset.vae_scale_factor
        self._inpaint.latent_channels = self.latent_channels
        self._inpaint.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.preset.vae_scale_factor * 2, vae_latent_channels=self.latent_channels,
            do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        # A variant's own complete scheduler config, or the folder's (never a mix: see VariantConfig.scheduler).
        self.scheduler_configs = {
            v.id: FlowMatchEulerDiscreteScheduler.from_config(v.scheduler or self.pipe.scheduler.config).config
            for v in self.preset.served_variants
        }
        self._schedules: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._schedules_lock = threading.Lock()
        self.routing = batched_model.RoutingSlot()
        self.fused_variant: str | None = None
        """The variant whose Lightning LoRA is merged into the base weights (`ModelPreset.fuse`)."""
        if self.preset.fuse is not None:
            fuse_lightning(self.pipe, self.preset.resolve(self.preset.variant(self.preset.fuse).lightning_lora))
            self.fused_variant = self.preset.fuse
        self.lightning: dict[str, str] = {}  # variant id -> peft adapter name
        for variant in self.preset.served_variants:
            if variant.lightning_lora and variant.id != self.fused_variant:
                name = adapter_name("lightning", variant.id)
                with _many_adapters_expected():
                    self.pipe.load_lora_weights(str(self.preset.resolve(variant.lightning_lora)), adapter_name=name)
                self.lightning[variant.id] = name
        # Lightning LoRAs included: peft creates them in the base layer's dtype, and a stage that silently ran
        # in float32 would need twice the memory (the real transformer would no longer fit its GPU).
        check_parameter_dtype(self.transformer, self.dtype, "transformer")
        self._install_routing()
        self.tenant_adapters: set[str] = set()
        self._health = HealthProbe("denoise engine", self._probe_forward, launch=self._at_step_boundary)

        self._lock = threading.Condition()  # guards the inbox, commands and counters below
        self._inbox: list[EngineRequest] = []
        self._commands: list[Callable[[], None]] = []  # run by the loop at the next step boundary
        self._in_use: collections.Counter[str] = collections.Counter()
        self._pending_unload: set[str] = set()
        self._live: list[EngineRequest] = []  # touched only under the step lock
        self.step_curve = StepCurve()
        """This engine's forward time against token-rows, learnt from its own forwards (`load_seconds`)."""
        self._step_lock = threading.Lock()
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.fatal: BaseException | None = None
        """An error that stopped the loop thread (the replica is then unhealthy)."""
        self.steps_run = 0
        self.compiled = False
        """The repeated block is compiled (`compile_blocks`); forwards then route rows without splitting them
        (`batched_model.RowRouting`'s `split_rows`)."""
        self.compile_stance = "default"
        """`torch.compiler.set_stance` of this engine's forwards: "default" (compile what a batch needs) while the
        start-up warm-up runs, then "eager_on_recompile": a batch no start-up graph fits (a new make-up of tenant
        adapters) runs eagerly, so no user request ever waits for a compilation."""
        self.compile_s: float | None = None
        """Seconds the start-up compilation and its warm-up steps took (`EngineConfig.compile`); None: eager."""
        if self.config.compile:
            self.compile_s = self.compile_blocks()

    # ------------------------------------------------------------------------------------------ compiling

    def compile_blocks(self) -> float:
        """Compile the repeated transformer block (`EngineConfig.compile`) and run warm-up requests at each of
        `compile_warmup_rows` (`warm_up`), so that no user request pays for compilation. Returns the seconds it took. Raises
        `CompileUnavailable` when this torch cannot compile (no working backend, no C++ compiler for inductor on
        a CPU)."""
        start = time.perf_counter()
        check_compiler(self.config.compile_backend, self.device)
        # A graph per tenant-adapter make-up of a batch (the LoRA groups are Python structure the block unrolls):
        # dynamo's default of 8 graphs per block would fall back to eager after the ninth.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS_PER_BLOCK)
        # Regional compilation (diffusers' `compile_repeated_blocks`): one block's graph, reused by all of them.
        self.transformer.compile_repeated_blocks(backend=self.config.compile_backend, dynamic=True)
        self.compiled = True
        self.warm_up(self.config.compile_warmup_rows)
        self.compile_stance = "eager_on_recompile"
        seconds = time.perf_counter() - start
        logger.info("compiled the transformer's repeated block (%s) and warmed up %s rows in %.1f s",
                    self.config.compile_backend, self.config.compile_warmup_rows, seconds)
        return seconds

    def warm_up(self, row_counts: list[int]) -> None:
        """For each of `row_counts`, `rows` one-image requests of two steps denoised together, at the default size
        with the default variant's stack and a zero prompt; results are discarded. The routed path is the one
        requests take, so every graph a batch of that many rows needs is built here."""
        width, height = self.preset.default_size
        variant = self.preset.served_variants[0]
        text = TextEmbeddings(prompt=np.zeros((8, self.text_width), dtype=np.float32))
        condition = None
        if self.family.condition_tokens and not self.family.prefix_cache:  # an instruction edit: one input image
            token_side = self.preset.vae_scale_factor * self.family.latent_patch
            grid = (height // token_side, width // token_side)
            condition = ConditionLatents(np.zeros((grid[0] * grid[1], self.transformer.config.in_channels),
                                                  dtype=np.float32), (grid,))
        for rows in row_counts:
            # Two steps: one step of a schedule with a terminal shift (the base's) divides by zero in diffusers.
            requests = [self.submit(DenoiseParams(seeds=(i,), width=width, height=height, num_inference_steps=2,
                                                  variant=variant.id, request_id=f"warm-up-{rows}"), text,
                                    condition=condition)
                        for i in range(rows)]
            while not all(r.done() for r in requests):
                self.step()
            for request in requests:
                request.result()

    # ------------------------------------------------------------------------------------------ requests

    def submit(self, params: DenoiseParams, text: TextEmbeddings, image: ImageLatents | None = None,
               mask: np.ndarray | None = None, adapter_paths: Mapping[str, str] | None = None,
               on_progress: ProgressCallback | None = None, condition: ConditionLatents | None = None
               ) -> EngineRequest:
        """Queue a request; it starts at the next step boundary. Invalid input raises `ValueError` here, before
        anything is queued. `adapter_paths` maps each of `params.adapters`' keys (`AdapterUse.key`: the ref and its
        manifest's checksum, so other content under one ref is another adapter here) to its local files, for
        adapters this engine has not loaded (or has evicted). `mask`: uint8 [height, width], non-zero where the
        image is repainted (needs `image`). `condition`: an instruction edit's input images (families with
        condition tokens need it; the others refuse it). `on_progress` is called from the engine's thread after
        every step."""
        try:
            variant = self.preset.variant(params.variant)
        except KeyError:
            # Never a wrong image: a fused replica's weights hold one variant's Lightning LoRA (400 naming `model`).
            if (refusal := self.preset.unserved_refusal(params.variant)) is not None:
                raise RequestError("model", refusal) from None
            # A model being removed by a rolling update: a request pinned to it can reach a replica of the new
            # version, which no longer serves it. A refusal naming `model` (404), never a 500.
            raise NotFound("model", f"model {params.variant!r} is not served by this replica's preset "
                                    f"{self.preset.name!r} (being removed?); available: "
                                    f"{', '.join(self.preset.model_ids)}", code="model_not_found") from None
        with self._lock:
            self._seq += 1
            seq = self._seq
        request = EngineRequest(seq, params, variant, on_progress)
        self._prepare(request, text, image, mask)
        self._prepare_condition(request, condition, image)
        paths = dict(adapter_paths or {})
        with self._lock:
            missing = [a.key for a in params.adapters if a.key not in paths and a.key not in self.tenant_adapters]
            if missing:
                raise ValueError(f"adapters: {missing} are not loaded and no path was given")
            if len(self._inbox) + len(self._live) >= self.config.max_live_requests:
                raise EngineFull(f"the engine holds {self.config.max_live_requests} requests")
            cache_limit = self.config.max_prefix_cache_bytes
            if cache_limit is not None and request.prefix_cache_bytes:
                held = sum(r.prefix_cache_bytes for r in self._inbox + self._live)
                if held + request.prefix_cache_bytes > cache_limit:
                    raise EngineFull(f"prefix caches: the engine holds {held} bytes of {cache_limit}, this request "
                                     f"needs {request.prefix_cache_bytes}")
            for use in params.adapters:
                self._in_use[use.key] += 1
            request.adapter_paths = paths
            self._inbox.append(request)
            self._lock.notify_all()
        return request

    def denoise(self, params: DenoiseParams, text: TextEmbeddings, image: ImageLatents | None = None,
                mask: np.ndarray | None = None, adapter_paths: Mapping[str, str] | None = None,
                cancel: threading.Event | None = None, on_progress: ProgressCallback | None = None,
                condition: ConditionLatents | None = None) -> np.ndarray:
        """Submit and wait: packed latents [n, tokens, 64] float32. Without a loop thread (`start`), the calling
        thread drives the steps (other requests submitted meanwhile are batched in). Setting `cancel` stops it
        with `DenoiseCancelled` at the next step boundary."""
        request = self.submit(params, text, image, mask, adapter_paths, on_progress, condition)
        while not request.done():
            if cancel is not None and cancel.is_set():
                request.cancel()
            if self.running:
                try:
                    return request.result(timeout=0.05)
                except concurrent.futures.TimeoutError:
                    continue
            self.step()
        return request.result()

    # ---------------------------------------------------------------------------------------- the loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "DenoiseEngine":
        """Run the step loop in a daemon thread (what a Denoiser replica does)."""
        if not self.running:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="denoise-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.step():
                    with self._lock:
                        if not (self._inbox or self._commands or self._stopping):
                            self._lock.wait(self.config.idle_wait_s)
        except BaseException as err:  # a bug in the engine itself: fail everything, report unhealthy
            logger.exception("denoise engine loop stopped")
            self.fatal = err
            with self._step_lock:
                for request in self._live + self._take_inbox():
                    self._finish(request, error=RuntimeError(f"the denoise engine stopped: {err!r}"))
                self._live.clear()

    def step(self) -> bool:
        """One step boundary and one step of every scheduled request. False when there was nothing to run."""
        with self._step_lock:
            self._apply_commands()
            self._admit()
            for request in [r for r in self._live if r.cancelled]:
                self._live.remove(request)
                self._finish(request, error=DenoiseCancelled(
                    f"cancelled after step {request.step} of {request.total_steps}"))
            if not self._live:
                return False
            plan = self.scheduler.schedule(self._live)
            chosen = {id(r) for batch in plan.batches for r in batch}
            now = time.perf_counter()
            for request in self._live:
                request.waited_steps = 0 if id(request) in chosen else request.waited_steps + 1
                if request.first_step_at is None and id(request) in chosen:
                    request.first_step_at = now
            for request in plan.paused:
                request.paused_steps += 1
            for batch in plan.batches:
                self._run(list(batch))
            self.steps_run += 1
            return True

    def _take_inbox(self) -> list[EngineRequest]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        return inbox

    def _admit(self) -> None:
        for request in self._take_inbox():
            if request.cancelled:
                self._finish(request, error=DenoiseCancelled("cancelled before it started"))
                continue
            try:
                for use in request.params.adapters:
                    self._ensure_loaded(use.key, request.adapter_paths.get(use.key))
            except Exception as err:
                self._finish(request, error=AdapterLoadError(str(err)))
                continue
            request.stack = self._stack(request)
            self._live.append(request)
            p = request.params
            logger.info("admitted request %s: %d images at %dx%d, %d steps, %s, tenant %s, adapters %s",
                        p.request_id, p.n, p.width, p.height, p.total_steps, p.priority, p.tenant,
                        ",".join(a.ref for a in p.adapters) or None)

    def _run(self, batch: list[EngineRequest]) -> None:
        """One forward over `batch` and each request's step. A forward that raises is retried one request at a
        time (a row's result does not depend on its batch), so only the requests that fail alone fail."""
        start = time.perf_counter()
        try:
            outputs = self._forward(batch)
        except Exception as err:
            if len(batch) == 1:
                self._fail_live(batch[0], err)
                return
            logger.warning("a batched forward failed (%r); retrying its %d requests one by one", err, len(batch))
            for request in batch:
                self._run([request])
            return
        self.step_curve.observe(sum(r.rows * (r.image_tokens + r.condition_tokens) for r in batch),
                                time.perf_counter() - start)
        if self.on_step is not None:
            self.on_step(StepStats(sum(r.rows for r in batch), len(batch), batch[0].grid,
                                   (time.perf_counter() - start) * 1000,
                                   batch[0].condition_tokens))
        for request, (cond, uncond) in zip(batch, outputs):
            try:
                self._advance(request, cond, uncond)
            except Exception as err:
                self._fail_live(request, err)

    def _fail_live(self, request: EngineRequest, err: BaseException) -> None:
        logger.warning("denoise request %s failed: %r", request.params.request_id, err)
        if request in self._live:
            self._live.remove(request)
        self._finish(request, error=err)

    # -------------------------------------------------------------------------------------- preparing

    def schedule_for(self, variant: VariantConfig, steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) of `variant` for `steps` at `image_seq_len` tokens, exactly as the pipelines'
        `retrieve_timesteps(scheduler, steps, sigmas=linspace(1, 1/steps, steps), mu=calculate_shift(...))`; a
        `checkpoint_sigmas` variant samples the checkpoint's `sample_sigmas` instead (2.1 Turbo)."""
        sigmas = None
        if variant.checkpoint_sigmas:
            sigmas = self.checkpoint_sigmas
            if sigmas is None:
                raise ValueError(f"variant {variant.id!r} samples the checkpoint's sigmas, and "
                                 f"{self.preset.root / 'model_index.json'} has no sample_sigmas")
            if steps != len(sigmas):
                raise ValueError(f"num_inference_steps: {variant.id} samples its checkpoint's {len(sigmas)} steps, "
                                 f"got {steps}")
        key = (variant.id, steps, image_seq_len)
        with self._schedules_lock:
            if key not in self._schedules:
                self._schedules[key] = flow_match_schedule(self.scheduler_configs[variant.id], steps, image_seq_len,
                                                           self.device, sigmas)
            return self._schedules[key]

    def _prepare(self, request: EngineRequest, text: TextEmbeddings, image: ImageLatents | None,
                 mask: np.ndarray | None) -> None:
        p = request.params
        factor = self.preset.vae_scale_factor * 2
        if p.width % factor or p.height % factor:
            raise ValueError(f"size: width and height must be multiples of {factor}, got {p.width}x{p.height}")
        dim = self.text_width
        for name, emb in (("prompt", text.prompt), ("negative", text.negative)):
            if emb is not None and (emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] < 1):
                raise ValueError(f"text.{name}: expected [tokens, {dim}] embeddings, got {emb.shape}")
        if p.uses_cfg and text.negative is None:
            raise ValueError("text.negative: true CFG (true_cfg_scale > 1) needs negative embeddings")
        if mask is not None and image is None:
            raise ValueError("mask: inpainting needs an image")
        n = p.n
        h, w = 2 * (p.height // factor), 2 * (p.width // factor)
        token_side = self.preset.vae_scale_factor * self.family.latent_patch
        request.grid = (p.height // token_side, p.width // token_side)
        request.image_tokens = request.grid[0] * request.grid[1]
        request.rows = n * (2 if p.uses_cfg else 1)
        request.prompt = torch.from_numpy(np.ascontiguousarray(text.prompt)).to(self.device, self.dtype)
        if p.uses_cfg:
            request.negative = torch.from_numpy(np.ascontiguousarray(text.negative)).to(self.device, self.dtype)
        if self.family.prefix_cache:
            self._prepare_image_slots(request, text)
            if image is not None or mask is not None:
                raise ValueError(f"image: a {self.family.name} model conditions on its images, it does not start "
                                 "from one (no img2img or inpainting)")
        timesteps, sigmas = self.schedule_for(request.variant, p.num_inference_steps, request.image_tokens)
        gens = generators(list(p.seeds), self.preset.device)
        if image is None:
            request.timesteps, request.sigmas = timesteps, sigmas
            if self.family.latent_patch == 1:  # QwenImage21PrepareLatentsStep: the noise, flattened unpatched
                shape = (n, self.latent_channels, 1, *request.grid)
                request.latents = pack_unpatched_latents(
                    randn_tensor(shape, generator=gens, device=self.device, dtype=self.dtype))
            else:
                request.latents = self.pipe.prepare_latents(n, self.latent_channels, p.height, p.width, self.dtype,
                                                            self.device, gens)
            return
        # img2img / inpainting, as QwenImageImg2ImgPipeline / QwenImageInpaintPipeline: trim the schedule by
        # strength (`get_timesteps`), then noise the image latents to its first sigma (`scale_noise`).
        if image.latents.shape != (n, request.image_tokens, self.latent_channels * 4):
            raise ValueError(f"image: expected latents {(n, request.image_tokens, self.latent_channels * 4)}, "
                             f"got {image.latents.shape}")
        t_start = p.num_inference_steps - p.total_steps
        request.timesteps, request.sigmas = timesteps[t_start:], sigmas[t_start:]
        if image.generator_states is not None:
            # Continue each seed's stream after the VAE's posterior draw, as the pipelines' generators do.
            for g, state in zip(gens, image.generator_states, strict=True):
                g.set_state(torch.from_numpy(np.asarray(state, dtype=np.uint8)))
        image_latents = torch.from_numpy(np.ascontiguousarray(image.latents)).to(self.device, self.dtype)
        noise = randn_tensor((n, 1, self.latent_channels, h, w), generator=gens, device=self.device, dtype=self.dtype)
        noise = QwenImagePipeline._pack_latents(noise, n, self.latent_channels, h, w)
        sigma = request.sigmas[[0] * n].to(self.device, image_latents.dtype).flatten().view(n, 1, 1)
        request.latents = sigma * noise + (1.0 - sigma) * image_latents
        if mask is not None:
            if mask.shape != (p.height, p.width):
                raise ValueError(f"mask: is {mask.shape[1]}x{mask.shape[0]}, the request {p.width}x{p.height}")
            condition = self._inpaint.mask_processor.preprocess(
                Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)), height=p.height, width=p.width)
            unpacked = QwenImagePipeline._unpack_latents(image_latents, p.height, p.width,
                                                         self.preset.vae_scale_factor)[:, :, 0]
            request.mask, _ = self._inpaint.prepare_mask_latents(
                condition, unpacked, 1, self.latent_channels, n, p.height, p.width, self.dtype, self.device, None)
            request.image_latents, request.noise = image_latents, noise

    def _prepare_image_slots(self, request: EngineRequest, text: TextEmbeddings) -> None:
        """A prefix-cache family's prompt image slots (all False for a prompt without images)."""
        for name, emb, slots in (("prompt", text.prompt, text.prompt_image_slots),
                                 ("negative", text.negative, text.negative_image_slots)):
            if emb is None or (name == "negative" and not request.params.uses_cfg):
                continue
            slots = np.zeros(emb.shape[0], dtype=bool) if slots is None else np.asarray(slots, dtype=bool)
            if slots.shape != (emb.shape[0],):
                raise ValueError(f"text.{name}_image_slots: expected [{emb.shape[0]}] flags, got {slots.shape}")
            setattr(request, f"{name}_slots", torch.from_numpy(slots).to(self.device))

    def _prepare_condition(self, request: EngineRequest, condition: ConditionLatents | None,
                           image: ImageLatents | None) -> None:
        """An instruction edit's condition tokens, checked against the family (`QwenImageEditPlusPipeline`
        appends the same `image_latents` to every row, CFG's unconditional ones included; the 2.1 pipelines put
        them first, and each prompt's image slots must hold them, four tokens a slot)."""
        if not self.family.condition_tokens:
            if condition is not None:
                raise ValueError(f"image: a {self.family.name} model takes no condition images")
            return
        if self.family.prefix_cache:
            tokens = 0 if condition is None else condition.latents.shape[0]
            for name, slots in (("prompt", request.prompt_slots), ("negative", request.negative_slots)):
                if slots is not None and 4 * int(slots.sum()) != tokens:
                    raise ValueError(f"text.{name}_image_slots: {int(slots.sum())} image slots hold "
                                     f"{4 * int(slots.sum())} condition tokens, the images give {tokens}")
            self._size_prefix(request, tokens)
            if condition is None:
                return
        if condition is None:
            raise ValueError(f"image: a {self.family.name} model edits input images; none were given")
        if image is not None:
            raise ValueError(f"image: a {self.family.name} model conditions on its images, it does not start "
                             "from one (no img2img)")
        low, high = self.family.input_images
        if not low <= len(condition.grids) <= high:
            raise ValueError(f"image: {low} to {high} input images, got {len(condition.grids)}")
        channels = self.transformer.config.in_channels  # a token: 2x2 packed latent pixels, or one unpacked
        if condition.latents.ndim != 2 or condition.latents.shape[1] != channels:
            raise ValueError(f"image: expected condition latents [tokens, {channels}], got {condition.latents.shape}")
        request.condition = torch.from_numpy(np.ascontiguousarray(condition.latents))[None].to(self.device,
                                                                                              self.dtype)
        request.condition_grids = tuple((int(r), int(c)) for r, c in condition.grids)

    def _size_prefix(self, request: EngineRequest, condition_tokens: int) -> None:
        """The request's prefix (text tokens and condition tokens: what the prompt's image slots expand to) and
        the bytes its caches will take: keys and values, every layer, [rows, prefix, inner width] each."""
        cfg = self.transformer.config
        request.prefix_tokens = int((~request.prompt_slots).sum()) + condition_tokens
        prefixes = [request.prefix_tokens]
        if request.negative_slots is not None:
            prefixes.append(int((~request.negative_slots).sum()) + condition_tokens)
        request.prefix_cache_bytes = prefix_cache_bytes(cfg, sum(prefixes), request.params.n,
                                                        torch.finfo(self.dtype).bits // 8)

    def _stack(self, request: EngineRequest) -> tuple[batched_model.AdapterKey, ...]:
        stack = []
        if request.variant.id in self.lightning:
            stack.append((self.lightning[request.variant.id], 1.0))
        stack.extend((adapter_name("tenant", a.key), float(a.scale)) for a in request.params.adapters)
        return tuple(stack)

    # ---------------------------------------------------------------------------------------- stepping

    def _forward(self, batch: list[EngineRequest]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One transformer forward over every row of `batch`: per request, its n conditional rows, then (true
        CFG) its n unconditional rows. Returns each request's (conditional, unconditional) outputs. A prefix-cache
        family's batch takes the forwards `prefix_cache.plan_forwards` splits it into."""
        if self.family.prefix_cache:
            return self._prefix_forwards(batch)
        hidden, texts, stacks, segments, timesteps = [], [], [], [], []
        for request in batch:
            n = request.params.n
            t = request.timesteps[request.step]
            rows = request.latents
            if request.condition is not None:
                rows = torch.cat([rows, request.condition.expand(n, -1, -1)], dim=1)
            for emb in (request.prompt, request.negative) if request.params.uses_cfg else (request.prompt,):
                start = len(stacks)
                hidden.append(rows)
                texts.extend([emb] * n)
                stacks.extend([request.stack] * n)
                segments.append((start, start + n))
                timesteps.append(t.expand(n))
        longest = max(e.shape[0] for e in texts)
        if all(e.shape[0] == longest for e in texts):
            text, text_mask = torch.stack(texts), None
        else:  # padded at the end and masked; the row-wise attention processor keeps rows exact
            text = texts[0].new_zeros((len(texts), longest, texts[0].shape[1]))
            text_mask = torch.zeros((len(texts), longest), dtype=torch.bool, device=self.device)
            for i, e in enumerate(texts):
                text[i, : e.shape[0]] = e
                text_mask[i, : e.shape[0]] = True
        latents = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
        timestep = torch.cat(timesteps).to(latents.dtype)
        first = batch[0]
        self.routing.current = batched_model.RowRouting(stacks, segments, self.device,
                                                        doubled=bool(self.transformer.config.zero_cond_t),
                                                        split_rows=not self.compiled)
        try:
            with torch.inference_mode(), torch.compiler.set_stance(self.compile_stance):
                out = self.transformer(
                    hidden_states=latents, timestep=timestep / 1000, guidance=None,
                    encoder_hidden_states_mask=text_mask, encoder_hidden_states=text,
                    img_shapes=[self.family.img_shapes(first.grid, first.condition_grids)], attention_kwargs={},
                    return_dict=False,
                )[0]
        finally:
            self.routing.current = None
        # The prediction of the noise tokens alone (an edit's condition tokens follow them).
        tokens = first.image_tokens
        outputs, i = [], 0
        for request in batch:
            n = request.params.n
            cond = out[i: i + n, :tokens]
            uncond = out[i + n: i + 2 * n, :tokens] if request.params.uses_cfg else None
            i += request.rows
            outputs.append((cond, uncond))
        return outputs

    def _prefix_forwards(self, batch: list[EngineRequest]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """A prefix-cache family's step over `batch`: each extracting branch alone, cached branches by prompt
        layout (`prefix_cache.plan_forwards`); each request's (conditional, unconditional) outputs."""
        predictions: dict[tuple[int, str], torch.Tensor] = {}
        extracted = []
        for entries in prefix_cache.plan_forwards(batch):
            outputs, cache = prefix_cache.prefix_forward(self.transformer, self.routing, self.family, entries,
                                                         self.device)
            for entry, out in zip(entries, outputs):
                predictions[(id(entry.request), entry.branch)] = out
            if cache is not None:
                extracted.append((entries[0], cache))
        for entry, cache in extracted:  # only once every forward of the step has succeeded
            entry.request.prefix_cache.branches[entry.branch] = cache
        return [(predictions[(id(r), "cond")], predictions.get((id(r), "uncond"))) for r in batch]

    @torch.inference_mode()
    def _advance(self, request: EngineRequest, cond: torch.Tensor, uncond: torch.Tensor | None) -> None:
        """The request's step after its forward: true CFG, Euler (float32), inpainting blend, progress."""
        p = request.params
        noise_pred = cond
        if uncond is not None and not self.family.cfg_norm_rescale:
            noise_pred = _guider(p.true_cfg_scale).forward(cond, uncond).pred
        elif uncond is not None:
            comb_pred = uncond + p.true_cfg_scale * (cond - uncond)
            cond_norm = torch.norm(cond, dim=-1, keepdim=True)
            noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
            noise_pred = comb_pred * (cond_norm / noise_norm)
        i = request.step
        sigma, sigma_next = request.sigmas[i], request.sigmas[i + 1]
        sample = request.latents.to(torch.float32)
        preview = None
        if i + 1 in p.preview_steps:
            preview = np.ascontiguousarray((sample - sigma * noise_pred.to(torch.float32)).cpu().numpy())
        latents = (sample + (sigma_next - sigma) * noise_pred).to(noise_pred.dtype)
        if request.mask is not None:
            proper = request.image_latents
            if i < request.total_steps - 1:
                s = request.sigmas[i + 1: i + 2].to(proper.dtype).view(1, 1, 1)
                proper = s * request.noise + (1.0 - s) * proper
            latents = (1 - request.mask) * proper + request.mask * latents
        request.latents = latents
        request.step = i + 1
        if request.on_progress is not None:
            request.on_progress(StepProgress(step=i + 1, total_steps=request.total_steps, preview=preview))
        if request.step == request.total_steps:
            self._live.remove(request)
            self._finish(request, result=np.ascontiguousarray(request.latents.float().cpu().numpy()))

    def _finish(self, request: EngineRequest, result: np.ndarray | None = None,
                error: BaseException | None = None) -> None:
        request.prefix_cache.free()  # finished, failed or cancelled: its keys and values go with it
        logger.info("request %s %s after %d of %d steps", request.params.request_id,
                    "finished" if error is None else f"ended ({type(error).__name__})", request.step,
                    request.params.total_steps)
        with self._lock:
            for use in request.params.adapters:
                self._in_use[use.key] -= 1
                if self._in_use[use.key] <= 0:
                    del self._in_use[use.key]
                    if use.key in self._pending_unload:
                        self._commands.append(lambda ref=use.key: self._unload_now(ref))
        if request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)

    # ---------------------------------------------------------------------------------------- adapters

    def load_adapter(self, ref: str, path: str) -> None:
        """Load a tenant LoRA (peft/diffusers folder or file) under `ref`, at a step boundary."""
        self._at_step_boundary(lambda: self._ensure_loaded(ref, path)).result()

    def unload_adapter(self, ref: str) -> None:
        """Evict `ref` at the next step boundary, or once no live request uses it. Never blocks and never runs the
        eviction in this thread (it is called from the adapter cache's finaliser, possibly on the engine's own
        thread, or inside a step an in-process caller is driving)."""
        with self._lock:
            self._commands.append(lambda: self._unload_or_defer(ref))
            self._lock.notify_all()

    def _at_step_boundary(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` as a command at the next step boundary (at once, in this thread, when no loop runs); the
        future holds its result or what it raised."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._commands.append(lambda: settle(future, fn))
            self._lock.notify_all()
        if not self.running:
            with self._step_lock:
                self._apply_commands()
        return future

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            try:
                command()
            except Exception:
                logger.exception("engine command failed")

    def _ensure_loaded(self, ref: str, path: str | None) -> None:
        with self._lock:
            self._pending_unload.discard(ref)
        if ref in self.tenant_adapters:
            return
        if path is None:
            raise KeyError(f"adapter {ref!r} is not loaded and no path was given")
        name = adapter_name("tenant", ref)
        try:
            with _many_adapters_expected():
                self.pipe.load_lora_weights(path, adapter_name=name)
            _check_plain_lora(self.transformer, name)
        except Exception as err:
            if name in getattr(self.transformer, "peft_config", {}):
                with _many_adapters_expected():
                    self.pipe.delete_adapters(name)
            self._install_routing()
            raise AdapterLoadError(f"adapter {ref!r} could not be loaded: {err}") from err
        self.tenant_adapters.add(ref)
        self._install_routing()

    def _install_routing(self) -> None:
        # Qwen-Image's dual-stream attention gets the row-wise processor for padded text; a prefix-cache family's
        # forwards hold rows of one layout and keep the transformer's own processor.
        batched_model.install(self.transformer, self.routing, rowwise_text=not self.family.prefix_cache)

    def _unload_or_defer(self, ref: str) -> None:
        with self._lock:
            if self._in_use.get(ref, 0) > 0:
                self._pending_unload.add(ref)
                return
        self._unload_now(ref)

    def _unload_now(self, ref: str) -> None:
        with self._lock:
            if self._in_use.get(ref, 0) > 0:
                return
            self._pending_unload.discard(ref)
        if ref in self.tenant_adapters:
            with _many_adapters_expected():
                self.pipe.delete_adapters(adapter_name("tenant", ref))
            self.tenant_adapters.discard(ref)
            self._install_routing()

    # ------------------------------------------------------------------------------------------- health

    def load_seconds(self) -> float:
        """Seconds of work queued and live here, from this engine's measured step-time curve (`lightray.engine.load`):
        what the Denoiser reports to its autoscaler."""
        token_side = self.preset.vae_scale_factor * self.family.latent_patch
        with self._lock:
            waiting = list(self._inbox)
        work = []
        for r in [*waiting, *list(self._live)]:
            if r.rows and getattr(r, "timesteps", None) is not None:  # prepared: its rows, steps left, tokens
                work.append((r.rows, r.total_steps - r.step, r.image_tokens + r.condition_tokens))
            else:
                p = r.params
                work.append((p.n * (2 if p.uses_cfg else 1), max(1, round(p.num_inference_steps * p.strength)),
                             (p.height // token_side) * (p.width // token_side)))
        return work_seconds(work, self.step_curve, self.config.max_batch_rows)

    def stats(self) -> dict:
        with self._lock:
            waiting = len(self._inbox)
        return {"live": len(self._live) + waiting, "steps_run": self.steps_run,
                "prefix_cache_bytes": sum(r.prefix_cache.nbytes for r in list(self._live)),
                "adapters_loaded": len(self.tenant_adapters), "adapters_in_use": dict(self._in_use)}

    def check_health(self, timeout_s: float | None = None) -> None:
        """Raise unless the loop is alive and the transformer still computes on its device: a one-token forward
        (`_probe_forward`) run by the loop at its next step boundary, so it never runs beside a step (the
        routed layers read the step's routing) and adds one tiny forward between two steps. Waits at most
        `timeout_s` (default `EngineConfig.health_check_timeout_s`), which must exceed one step."""
        if self.fatal is not None:
            raise RuntimeError(f"the denoise engine stopped: {self.fatal!r}")
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("the denoise engine's loop thread is gone")
        self._health.check(self.config.health_check_timeout_s if timeout_s is None else timeout_s)

    @torch.inference_mode()
    def _probe_forward(self) -> torch.Tensor:
        """The transformer on one 1x1-token latent grid and one text token (stock path: no routing is set)."""
        cfg = self.transformer.config
        if self.family.prefix_cache:  # one text token and one 2x2 target image (one vision slot), no cache
            return self.transformer(
                hidden_states=torch.ones((1, 4, cfg.in_channels), device=self.device, dtype=self.dtype),
                encoder_hidden_states=torch.ones((1, 1, cfg.context_in_dim), device=self.device, dtype=self.dtype),
                timestep=torch.full((1,), 0.5, device=self.device, dtype=self.dtype), img_shapes=[[(1, 2, 2)]],
                img_mask=torch.tensor([[False, True]], device=self.device), return_dict=False)[0]
        latents = torch.ones((1, 1, cfg.in_channels), device=self.device, dtype=self.dtype)
        text = torch.ones((1, 1, cfg.joint_attention_dim), device=self.device, dtype=self.dtype)
        return self.transformer(hidden_states=latents, timestep=torch.full((1,), 0.5, device=self.device,
                                                                         dtype=self.dtype),
                                encoder_hidden_states=text, encoder_hidden_states_mask=None, guidance=None,
                                img_shapes=[[(1, 1, 1)]], return_dict=False)[0]


def flow_match_schedule(scheduler_config: Mapping, steps: int, image_seq_len: int,
                        device: torch.device | str = "cpu", grid: list[float] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of a FlowMatchEulerDiscreteScheduler config for `steps` at `image_seq_len` tokens,
    exactly as the Qwen-Image pipelines (and 2.1's `QwenImage21SetTimestepsStep`) compute them:
    `retrieve_timesteps(scheduler, steps, sigmas=grid or linspace(1, 1/steps, steps), mu=calculate_shift(
    image_seq_len, ...))`. `grid`: a checkpoint's own sigmas (2.1 Turbo's `sample_sigmas`). The returned `sigmas`
    end with the final 0."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps) if grid is None else grid
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    return timesteps, scheduler.sigmas


COMPILED_GRAPHS_PER_BLOCK = 64
"""Graphs dynamo may keep for the compiled block (its `recompile_limit`): one per LoRA make-up of a batch."""


class CompileUnavailable(RuntimeError):
    """`EngineConfig.compile` is on and this torch cannot compile for the device."""


def check_compiler(backend: str, device: torch.device) -> None:
    """Compile and run a two-op function with `backend` on `device`; `CompileUnavailable` saying what failed and
    how to go on (turn `compile` off) when it cannot. Run at start, so a replica never starts without the speed it
    was configured for, nor fails on its first request."""
    try:
        probe = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, backend=backend, fullgraph=True)
        probe(torch.ones(4, device=device))
    except Exception as err:
        raise CompileUnavailable(
            f"compile: true, but torch {torch.__version__} cannot compile with backend {backend!r} on {device} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}). Install "
            "what the backend needs (inductor: a C++ compiler on a CPU, Triton on a GPU) or set compile: false"
        ) from err


def fuse_lightning(pipe: QwenImagePipeline, path) -> None:
    """Merge the Lightning LoRA at `path` into `pipe`'s transformer weights and drop the LoRA layers (peft's
    `merge_and_unload`). The delta B·A·scaling is computed in float32 and added to the float32 copy of each
    weight, rounded once to the weight's dtype: peft's own merge computes a bfloat16 delta on a GPU and rounds
    twice (what fusing in bfloat16 still loses is stated in the README, "Fused Lightning replicas")."""
    name = "fused_lightning"
    with _many_adapters_expected():
        pipe.load_lora_weights(str(path), adapter_name=name)
    with torch.no_grad():
        for module in pipe.transformer.modules():
            if isinstance(module, batched_model.LoraLinear) and name in module.lora_A:
                for lora in (module.lora_A[name], module.lora_B[name]):
                    lora.float()
                base = module.get_base_layer()
                delta = module.get_delta_weight(name).float()
                base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
    pipe.unload_lora_weights()  # the LoRA layers go; the merged base weights stay


@functools.lru_cache(maxsize=32)
def _guider(scale: float) -> ClassifierFreeGuidance:
    """diffusers' CFG combination at `scale` (the 2.1 pipelines' guider; stateless as the engine uses it)."""
    return ClassifierFreeGuidance(guidance_scale=scale)


@contextlib.contextmanager
def _many_adapters_expected():
    """peft warns when a second adapter is injected ("Already found a `peft_config` attribute ... multiple adapters")
    and when an active adapter is deleted. Both are this engine's normal operation: it holds every variant's
    Lightning LoRA and the cached tenant adapters at once and picks each row's adapters itself (peft's active set
    is not used), so the warnings would only tell an operator something is wrong when nothing is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        yield


def _check_plain_lora(transformer: torch.nn.Module, name: str) -> None:
    """The batched path implements plain LoRA; a DoRA (or other variant) adapter is refused, not mis-applied."""
    for module in transformer.modules():
        variants = getattr(module, "lora_variant", None)
        if variants and name in variants:
            raise ValueError("only plain LoRA adapters are supported (this one uses a LoRA variant such as DoRA)")


def adapter_name(kind: str, name: str) -> str:
    """peft adapter name for a Lightning variant or tenant ref. peft names become module attribute keys: no
    dots or slashes; the hash keeps refs that differ only in punctuation ("a-b/x" vs "a_b/x") apart."""
    safe = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return f"{kind}__{safe}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
