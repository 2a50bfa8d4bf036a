"""Qwen-Image-2.1 through the engine: a request alone gives exactly the latents of diffusers' 2.1 modular denoise
blocks (`QwenImage21TurboCoreDenoiseStep`, `QwenImage21CoreDenoiseStep` with `ClassifierFreeGuidance`, and their
image-conditioned twins) on a mini real-layout folder (`tests/mini_real.py`, `build_mini_real_21`), with the prefix
KV cache on as the pipelines run it; the cache is per-request state, kept while paused and freed when the request
ends; batched requests equal each alone.

Most tests give both sides the same Qwen3-VL-shaped embeddings and image slots (what `get_qwenimage21_prompt_embeds`
returns) and condition latents, to vary prompt lengths and layouts freely; the last one starts from the prompt's text
and the pictures, through the mini folder's Qwen3-VL encoder and VAE, on both sides.
Every test pins torch to one thread, as the Serve replicas run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.qwenimage21.inputs import pack_latents
from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21 import (
    QwenImage21CoreDenoiseStep,
    QwenImage21ImageConditionedCoreDenoiseStep,
)
from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21_turbo import (
    QwenImage21TurboCoreDenoiseStep,
    QwenImage21TurboImageConditionedCoreDenoiseStep,
)

from mini_real import MINI_21_TURBO_SIGMAS, MINI_TEXT, build_mini_real_21, mini_21_preset, write_mini_21_lora
from lightray.contracts import ConditionLatents, DenoiseParams, TextEmbeddings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TURBO, BASE = "qwen-image-2.1-turbo", "qwen-image-2.1"
TURBO_STEPS = len(MINI_21_TURBO_SIGMAS)


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    from lightray.engine import DenoiseEngine

    root = build_mini_real_21(tmp_path_factory.mktemp("mini-21") / "Qwen-Image-2.1-Turbo", turbo=True)
    return DenoiseEngine(mini_21_preset(root, "qwen-image-2.1-turbo.yaml"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lightray.engine import DenoiseEngine

    root = build_mini_real_21(tmp_path_factory.mktemp("mini-21") / "Qwen-Image-2.1", seed=1)
    return DenoiseEngine(mini_21_preset(root, "qwen-image-2.1.yaml"))


def embeddings(seed: int, tokens: int, slots: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL-shaped prompt embeddings [tokens, hidden] (bfloat16) and their image slots: `slots` holds each
    condition image's slot count, placed after two text tokens, one text token between images."""
    gen = torch.Generator().manual_seed(seed)
    image_slots = torch.zeros(tokens + sum(slots) + len(slots), dtype=torch.bool)
    at = 2
    for count in slots:
        image_slots[at: at + count] = True
        at += count + 1
    emb = torch.randn(image_slots.shape[0], MINI_TEXT.text_hidden_size, generator=gen).to(torch.bfloat16)
    return emb, image_slots


def text_of(prompt, negative=None) -> TextEmbeddings:
    return TextEmbeddings(prompt=prompt[0].float().numpy(), prompt_image_slots=prompt[1].numpy(),
                          negative=None if negative is None else negative[0].float().numpy(),
                          negative_image_slots=None if negative is None else negative[1].numpy())


def condition_images(seed: int, grids: tuple[tuple[int, int], ...]) -> list[torch.Tensor]:
    """Condition images' VAE latents [1, 64, 1, rows, columns] (bfloat16), as the VAE encoder step gives them."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 64, 1, *g, generator=gen).to(torch.bfloat16) for g in grids]


def condition_of(latents: list[torch.Tensor]) -> ConditionLatents:
    """The engine's condition input: the images' packed latents in order, and their grids."""
    return ConditionLatents(torch.cat([pack_latents(x) for x in latents], dim=1)[0].float().numpy(),
                            tuple(tuple(x.shape[-2:]) for x in latents))


def reference_latents(engine, prompt, steps, seed, size=(128, 128), cfg=1.0, negative=None, n=1, turbo=False,
                      condition=None, lora=None):
    """The modular denoise blocks' packed latents [n, tokens, 64] for the same embeddings (prefix cache on, as the
    pipelines default)."""
    width, height = size
    if condition is not None:
        blocks = QwenImage21TurboImageConditionedCoreDenoiseStep() if turbo else QwenImage21ImageConditionedCoreDenoiseStep()
    else:
        blocks = QwenImage21TurboCoreDenoiseStep() if turbo else QwenImage21CoreDenoiseStep()
    pipe = blocks.init_pipeline()
    components = {"transformer": QwenImage21Transformer2DModel.from_pretrained(
                      engine.preset.root / "transformer", torch_dtype=torch.bfloat16),
                  "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(engine.preset.root / "scheduler")}
    if not turbo:
        components["guider"] = ClassifierFreeGuidance(guidance_scale=cfg)
    pipe.update_components(**components)
    if turbo:
        pipe.register_to_config(sample_sigmas=MINI_21_TURBO_SIGMAS)
    if lora is not None:  # (path, scale)
        pipe.load_lora_weights(str(lora[0]), adapter_name="tenant")
        pipe.set_adapters(["tenant"], [lora[1]])
    inputs = dict(prompt_embeds=prompt[0][None], prompt_embeds_mask=torch.ones(1, prompt[0].shape[0], dtype=torch.long),
                  image_pad_mask=prompt[1][None], height=height, width=width, num_images_per_prompt=n,
                  num_inference_steps=steps, generator=[torch.Generator().manual_seed(seed + i) for i in range(n)])
    if negative is not None:
        inputs.update(negative_prompt_embeds=negative[0][None],
                      negative_prompt_embeds_mask=torch.ones(1, negative[0].shape[0], dtype=torch.long),
                      negative_image_pad_mask=negative[1][None])
    if condition is not None:
        inputs.update(image_latents=condition)
    latents = pipe(**inputs, output="latents")
    return pack_latents(latents)


def params(variant, steps, seed, cfg=1.0, n=1, size=(128, 128), **extra) -> DenoiseParams:
    return DenoiseParams(seeds=tuple(seed + i for i in range(n)), width=size[0], height=size[1],
                         num_inference_steps=steps, true_cfg_scale=cfg, variant=variant, **extra)


TURBO_CASES = [
    # prompt tokens, condition grids, size, n, seed
    (9, (), (128, 128), 1, 3),
    (12, (), (96, 160), 2, 4),
    (7, ((6, 8),), (128, 96), 1, 5),
    (10, ((8, 8), (4, 6)), (128, 128), 1, 6),
]


@pytest.mark.parametrize("tokens, grids, size, n, seed", TURBO_CASES)
def test_turbo_alone_equals_the_modular_pipeline(turbo, tokens, grids, size, n, seed):
    """Turbo (the checkpoint's `sample_sigmas`, no guidance), text-only and with 1-2 condition images, square and
    not, n = 1-2: the latents are the modular pipeline's bit for bit."""
    images = condition_images(seed, grids)
    prompt = embeddings(seed, tokens, tuple(g[0] * g[1] // 4 for g in grids))
    ours = turbo.denoise(params(TURBO, TURBO_STEPS, seed, n=n, size=size), text_of(prompt),
                         condition=condition_of(images) if grids else None)
    theirs = reference_latents(turbo, prompt, TURBO_STEPS, seed, size=size, n=n, turbo=True,
                               condition=images if grids else None)
    assert ours.shape == tuple(theirs.shape) == (n, size[0] * size[1] // 256, 64)
    assert np.array_equal(ours, theirs.float().numpy()), np.abs(ours - theirs.float().numpy()).max()


BASE_CASES = [
    # prompt tokens, negative tokens, condition grids, CFG, steps, seed
    (9, 3, (), 4.0, 3, 11),
    (8, 8, (), 4.0, 2, 12),  # equal layouts: both branches share the cached forwards
    (9, 1, (), 1.0, 2, 14),
    (7, 2, ((6, 8),), 4.0, 3, 13),
]


@pytest.mark.parametrize("tokens, negative_tokens, grids, cfg, steps, seed", BASE_CASES)
def test_base_alone_equals_the_modular_pipeline(base, tokens, negative_tokens, grids, cfg, steps, seed):
    """The base (linspace sigmas with the dynamic shift), with CFG through `ClassifierFreeGuidance` (a prompt and
    a negative of other lengths: two prefix caches) and without, text-only and with a condition image."""
    images = condition_images(seed, grids)
    slots = tuple(g[0] * g[1] // 4 for g in grids)
    prompt, negative = embeddings(seed, tokens, slots), embeddings(seed + 100, negative_tokens, slots)
    ours = base.denoise(params(BASE, steps, seed, cfg=cfg), text_of(prompt, negative if cfg > 1 else None),
                        condition=condition_of(images) if grids else None)
    theirs = reference_latents(base, prompt, steps, seed, cfg=cfg, negative=negative if cfg > 1 else None,
                               condition=images if grids else None)
    assert np.array_equal(ours, theirs.float().numpy()), np.abs(ours - theirs.float().numpy()).max()



def submit_all(engine, requests):
    return [engine.submit(p, t, condition=c) for p, t, c in requests]


def run_until_done(engine, submitted):
    while not all(r.done() for r in submitted):
        engine.step()


def turbo_request(seed, tokens, grids=(), n=1, size=(128, 128), **extra):
    prompt = embeddings(seed, tokens, tuple(g[0] * g[1] // 4 for g in grids))
    condition = condition_of(condition_images(seed, grids)) if grids else None
    return params(TURBO, TURBO_STEPS, seed, n=n, size=size, **extra), text_of(prompt), condition


def test_the_prefix_cache_is_built_at_the_first_forward_kept_while_paused_and_freed_at_the_end(turbo, monkeypatch):
    """With room for one request a step, an interactive request pauses a started batch one: the paused request
    keeps its cache (the same tensors), resumes to its result alone, and both caches are freed when they finish."""
    monkeypatch.setattr(turbo.scheduler.config, "max_batch_rows", 1)
    slow_request = turbo_request(21, 9, ((6, 8),), priority="batch")
    fast_request = turbo_request(22, 9, ((6, 8),), priority="interactive")
    alone = [turbo.denoise(*r[:2], condition=r[2]) for r in (slow_request, fast_request)]
    slow = turbo.submit(*slow_request[:2], condition=slow_request[2])
    assert "cond" not in slow.prefix_cache
    turbo.step()
    assert "cond" in slow.prefix_cache and slow.prefix_cache.nbytes > 0
    keys = slow.prefix_cache.branches["cond"].get_layer(0).k
    # [n, prefix tokens, heads, head dim] per layer: 10 text tokens (9, and 1 between the images' slots) and the
    # 12 slots' 48 condition tokens
    assert keys.shape == (1, 10 + 48, 2, 32)
    fast = turbo.submit(*fast_request[:2], condition=fast_request[2])
    turbo.step()
    assert slow.paused_steps == 1 and slow.prefix_cache.branches["cond"].get_layer(0).k is keys
    run_until_done(turbo, [slow, fast])
    assert slow.paused_steps >= TURBO_STEPS - 1 and fast.paused_steps == 0
    assert np.array_equal(slow.result(), alone[0]) and np.array_equal(fast.result(), alone[1])
    assert slow.prefix_cache.nbytes == 0 and fast.prefix_cache.nbytes == 0


def test_a_cancelled_request_frees_its_prefix_cache(turbo):
    request = turbo.submit(*turbo_request(23, 9)[:2])
    turbo.step()
    assert request.prefix_cache.nbytes > 0
    request.cancel()
    turbo.step()
    with pytest.raises(Exception, match="cancelled"):
        request.result()
    assert request.prefix_cache.nbytes == 0


def test_a_failed_request_frees_its_prefix_cache(turbo, monkeypatch):
    request = turbo.submit(*turbo_request(24, 9)[:2])
    turbo.step()
    assert request.prefix_cache.nbytes > 0

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(turbo, "_advance", fail)
    turbo.step()
    with pytest.raises(RuntimeError, match="simulated"):
        request.result()
    assert request.prefix_cache.nbytes == 0


def test_requests_batched_at_different_steps_equal_each_alone(turbo, base):
    """Turbo requests of one signature, started at different steps, with prompts of equal and unequal layouts and
    n = 1-2, and base requests with CFG beside requests without: each result equals the request alone."""
    for engine, requests in (
        (turbo, [turbo_request(31, 9, ((6, 8),)), turbo_request(32, 9, ((6, 8),), n=2),
                 turbo_request(33, 11, ((6, 8),)), turbo_request(34, 9, ((6, 8),))]),
        (base, [(params(BASE, 3, 41, cfg=4.0), text_of(embeddings(41, 8), embeddings(141, 8)), None),
                (params(BASE, 3, 42, cfg=4.0), text_of(embeddings(42, 8), embeddings(142, 3)), None),
                (params(BASE, 2, 43), text_of(embeddings(43, 8)), None)]),
    ):
        alone = [engine.denoise(p, t, condition=c) for p, t, c in requests]
        first = submit_all(engine, requests[:1])
        engine.step()  # the first request is a step ahead: its rows are cached while the others extract
        rest = submit_all(engine, requests[1:])
        run_until_done(engine, first + rest)
        for request, expected in zip(first + rest, alone):
            assert np.array_equal(request.result(), expected), np.abs(request.result() - expected).max()


def test_what_splits_a_batch_into_forwards(turbo):
    """Extracting branches run alone; cached branches share one forward per prompt layout."""
    from lightray.engine.prefix_cache import plan_forwards

    same_a, same_b, longer = (turbo.submit(*turbo_request(seed, tokens)[:2]) for seed, tokens in
                              ((51, 9), (52, 9), (53, 12)))
    turbo.step()
    fresh = turbo.submit(*turbo_request(54, 9)[:2])
    turbo._admit()
    plan = plan_forwards([same_a, same_b, longer, fresh])
    assert [[(e.request, e.branch) for e in forward] for forward in plan] == [
        [(fresh, "cond")], [(same_a, "cond"), (same_b, "cond")], [(longer, "cond")]]
    run_until_done(turbo, [same_a, same_b, longer, fresh])


def test_the_engine_refuses_what_2_1_does_not_take(turbo):
    p, text, _ = turbo_request(61, 9)
    with pytest.raises(ValueError, match="^num_inference_steps: .* 8 steps, got 4"):
        turbo.submit(params(TURBO, 4, 61), text)
    with pytest.raises(ValueError, match="^text.prompt_image_slots: 0 image slots hold 0 condition tokens, the "
                                         "images give 48"):
        turbo.submit(p, text, condition=condition_of(condition_images(61, ((6, 8),))))
    p, text, condition = turbo_request(62, 9, ((6, 8),))
    with pytest.raises(ValueError, match="^text.prompt_image_slots: 12 image slots hold 48 condition tokens, the "
                                         "images give 0"):
        turbo.submit(p, text)


def test_the_timestep_rows_of_a_cached_forward_are_computed_per_request_with_the_shared_row():
    """2.1's timestep conditioning runs over the forward's rows plus one t = 0 row. Each request's rows are
    computed with that row as one matmul, the M its forward alone has (on this CPU a linear layer's rows are
    batch-invariant only from 4 rows up; at the mini width the kernels happen to agree, so this is checked on the
    routing itself)."""
    from lightray.engine.batched_model import RowRouting

    routing = RowRouting([(), (), (), ()], [(0, 1), (1, 3), (3, 4)], "cpu", shared_tail=True)
    blocks = routing.blocks_for(torch.zeros(5, 8))
    rows = [b.rows.tolist() if isinstance(b.rows, torch.Tensor) else list(range(b.rows.start, b.rows.stop))
            for b in blocks]
    assert rows == [[0, 4], [1, 2, 4], [3, 4]]
    assert RowRouting([()] * 2, [(0, 2)], "cpu", shared_tail=True).blocks_for(torch.zeros(3, 8)) is None


def test_a_tenant_lora_on_2_1_equals_the_pipeline_and_batches_beside_rows_without(turbo, tmp_path):
    """A LoRA over 2.1's block linears (diffusers' saved layout) at scale 0.8: alone, the modular pipeline with
    `load_lora_weights` + `set_adapters` bit for bit; batched with a request without it and one with it at
    another scale, each equals its request alone, and the adapter changes the result."""
    from lightray.contracts import AdapterUse

    lora = write_mini_21_lora(tmp_path / "acme-a.safetensors", seed=71)
    paths = {"acme/a@v1": str(lora)}
    requests = []
    for seed, adapters in ((72, (AdapterUse("acme/a@v1", 0.8),)), (73, ()), (74, (AdapterUse("acme/a@v1", 0.3),))):
        p, text, condition = turbo_request(seed, 9, ((6, 8),))
        requests.append((DenoiseParams(**{**p.__dict__, "adapters": adapters}), text, condition))
    alone = [turbo.denoise(p, t, condition=c, adapter_paths=paths) for p, t, c in requests]
    prompt = embeddings(72, 9, (12,))
    theirs = reference_latents(turbo, prompt, TURBO_STEPS, 72, turbo=True, condition=condition_images(72, ((6, 8),)),
                               lora=(lora, 0.8))
    assert np.array_equal(alone[0], theirs.float().numpy()), np.abs(alone[0] - theirs.float().numpy()).max()
    submitted = [turbo.submit(p, t, condition=c, adapter_paths=paths) for p, t, c in requests]
    run_until_done(turbo, submitted)
    for request, expected in zip(submitted, alone):
        assert np.array_equal(request.result(), expected)
    unadapted = turbo.denoise(*turbo_request(72, 9, ((6, 8),))[:2], condition=requests[0][2])
    assert not np.array_equal(alone[0], unadapted)


def test_the_engine_budgets_prefix_caches(base, monkeypatch):
    """A request's cache size is known at submit (and equals what its first forward stores, CFG's two branches of
    n rows); `max_prefix_cache_bytes` refuses what would pass it; a row counts its prefix tokens only at the step
    that computes them."""
    from lightray.contracts import EngineFull

    p, text = params(BASE, 2, 81, cfg=4.0, n=2), text_of(embeddings(81, 9, (12,)), embeddings(181, 3, (12,)))
    condition = condition_of(condition_images(81, ((6, 8),)))
    request = base.submit(p, text, condition=condition)
    assert request.prefix_tokens == 10 + 48 and request.sequence_tokens == 64 + 58
    base.step()
    assert request.prefix_cache.nbytes == request.prefix_cache_bytes > 0
    assert request.sequence_tokens == 64 and base.stats()["prefix_cache_bytes"] == request.prefix_cache_bytes
    monkeypatch.setattr(base.config, "max_prefix_cache_bytes", 2 * request.prefix_cache_bytes - 1)
    with pytest.raises(EngineFull, match="^prefix caches"):
        base.submit(p, text, condition=condition)
    run_until_done(base, [request])
    assert base.stats()["prefix_cache_bytes"] == 0


def pictures(count: int):
    from lightray.world.shapes import Scene, render

    scenes = [Scene("red", "circle", "left", "white"), Scene("blue", "square", "top", "gray")]
    return [render(s, size) for s, size in zip(scenes[:count], [(96, 64), (64, 64)])]


@pytest.mark.parametrize("count, cfg", [(0, 1.0), (1, 1.0), (2, 1.0), (1, 4.0)])
def test_from_the_prompt_and_pictures_equals_the_whole_modular_pipeline(turbo, base, count, cfg):
    """The whole path from text: the pictures resized, encoded by the Qwen3-VL encoder with the prompt (and the
    negative, with CFG) and by the VAE (`lightray.models.qwen_image_21.conditioning`), then denoised by the engine,
    gives the latents of the whole modular pipeline (`QwenImage21TurboAutoBlocks`, `QwenImage21AutoBlocks`) from
    the same prompt and pictures."""
    from diffusers import AutoencoderKLQwenImage21
    from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21 import QwenImage21AutoBlocks
    from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21_turbo import QwenImage21TurboAutoBlocks

    from lightray.models.qwen_image_21.conditioning import (
        encode_conditions,
        encode_prompt,
        load_text_encoder,
        resize_conditions,
    )

    engine, variant, steps = (turbo, TURBO, TURBO_STEPS) if cfg == 1.0 else (base, BASE, 3)
    root = engine.preset.root
    text_encoder, processor = load_text_encoder(root, torch.bfloat16)
    vae = AutoencoderKLQwenImage21.from_pretrained(root / "vae", torch_dtype=torch.bfloat16)
    images, prompt = pictures(count), "make the circle blue"
    resized = resize_conditions(images, 128 * 128)
    embeds, slots = encode_prompt(text_encoder, processor, prompt, resized)
    negative = encode_prompt(text_encoder, processor, " ", resized) if cfg > 1 else None
    text = TextEmbeddings(prompt=embeds.float().numpy(), prompt_image_slots=slots.numpy(),
                          negative=None if negative is None else negative[0].float().numpy(),
                          negative_image_slots=None if negative is None else negative[1].numpy())
    condition = None
    if count:
        latents, grids = encode_conditions(vae, resized)
        condition = ConditionLatents(latents.float().numpy(), grids)
    ours = engine.denoise(params(variant, steps, 9, cfg=cfg), text, condition=condition)

    blocks = QwenImage21TurboAutoBlocks() if engine is turbo else QwenImage21AutoBlocks()
    pipe = blocks.init_pipeline()
    components = dict(text_encoder=text_encoder, processor=processor, vae=vae,
                      transformer=QwenImage21Transformer2DModel.from_pretrained(root / "transformer",
                                                                                torch_dtype=torch.bfloat16),
                      scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"))
    if engine is base:
        components["guider"] = ClassifierFreeGuidance(guidance_scale=cfg)
    pipe.update_components(**components)
    if engine is turbo:
        pipe.register_to_config(sample_sigmas=MINI_21_TURBO_SIGMAS)
    inputs = dict(prompt=prompt, height=128, width=128, output_resolution=128, num_inference_steps=steps,
                  generator=[torch.Generator().manual_seed(9)])
    if count:
        inputs["image"] = images
    if cfg > 1:
        inputs["negative_prompt"] = " "
    theirs = pack_latents(pipe(**inputs, output="latents"))
    assert np.array_equal(ours, theirs.float().numpy()), np.abs(ours - theirs.float().numpy()).max()


def test_a_failed_batched_step_is_retried_alone_from_its_extraction(turbo, monkeypatch):
    """A batched step that fails is retried one request at a time; a request whose cache that step had extracted
    extracts again on the retry (its first step computed the cached way would not be the pipeline's), and every
    result still equals its request alone."""
    from lightray.engine import prefix_cache

    requests = [turbo_request(91, 9), turbo_request(92, 9)]
    alone = [turbo.denoise(p, t, condition=c) for p, t, c in requests]
    submitted = submit_all(turbo, requests)
    stock, calls = prefix_cache.prefix_forward, []

    def second_forward_fails_once(*args):
        calls.append([entry.cached for entry in args[3]])
        if len(calls) == 2:
            raise RuntimeError("a transient failure")
        return stock(*args)

    monkeypatch.setattr(prefix_cache, "prefix_forward", second_forward_fails_once)
    turbo.step()
    monkeypatch.setattr(prefix_cache, "prefix_forward", stock)
    assert calls == [[False], [False], [False], [False]]  # both extract, the second fails; then each alone
    run_until_done(turbo, submitted)
    for request, expected in zip(submitted, alone):
        assert np.array_equal(request.result(), expected)


def test_the_health_probe_runs_the_2_1_transformer(turbo):
    assert torch.isfinite(turbo._probe_forward()).all()
    turbo.check_health(timeout_s=30)
