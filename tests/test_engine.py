"""The denoising engine (lightray/engine), in-process: numerics against diffusers' `QwenImagePipeline.__call__`,
batch invariance across mixed requests, pausing, priorities, cancellation, progress, adapter isolation and
failures. Image inputs against diffusers' img2img / inpaint pipelines are in tests/test_image_inputs.py.

The numerics contract: the same seed gives the same pixels for the same model, config and torch thread count.
Every test here pins torch to one thread, as the Serve replicas run (OMP_NUM_THREADS=1)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from testing.adapters import make_lora_adapter
from lightray.config import EngineConfig
from lightray.contracts import AdapterLoadError, AdapterUse, DenoiseCancelled, DenoiseParams, TextEmbeddings
from lightray.engine import DenoiseEngine, StepScheduler

LIGHTNING_4, LIGHTNING_8, BASE = "lightray-shapes-lightning-4", "lightray-shapes-lightning-8", "lightray-shapes"
PROMPTS = ("a red circle on the left, white background", "黑色背景，上方有一个蓝色的正方形",
           "a green triangle at the bottom, gray background")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the numerics contract holds at a fixed thread count


@pytest.fixture(scope="module")
def text(local_pipeline):
    """Embeddings of PROMPTS and of the default negative prompt " "."""
    *prompts, negative = local_pipeline.text.encode([*PROMPTS, " "])
    return prompts, negative


@pytest.fixture(scope="module")
def adapters(preset, tmp_path_factory):
    """Two random tenant LoRAs on different target modules (B also on the timestep-conditioning linears)."""
    tmp = tmp_path_factory.mktemp("engine-adapters")
    a = make_lora_adapter(preset, tmp / "a", seed=1, std=0.1)
    b = make_lora_adapter(preset, tmp / "b", seed=2, std=0.1,
                          targets=("add_q_proj", "to_add_out", "img_mod.1", "txt_mod.1", "txt_mlp.net.0.proj"))
    return {"acme/a@v1": str(a), "acme/b@v1": str(b)}


@pytest.fixture(scope="module")
def engine(preset):
    return DenoiseEngine(preset)


def params(variant=LIGHTNING_4, seeds=(1,), steps=None, cfg=None, size=(64, 64), **kw) -> DenoiseParams:
    defaults = {LIGHTNING_4: (4, 1.0), LIGHTNING_8: (8, 1.0), BASE: (6, 2.0)}[variant]
    return DenoiseParams(seeds=tuple(seeds), width=size[0], height=size[1], num_inference_steps=steps or defaults[0],
                         true_cfg_scale=defaults[1] if cfg is None else cfg, variant=variant, **kw)


def embeddings(text, p: DenoiseParams, prompt: int = 0) -> TextEmbeddings:
    prompts, negative = text
    return TextEmbeddings(prompts[prompt], negative if p.uses_cfg else None)


def steps_to_finish(engine, text, p: DenoiseParams, each_step=lambda: None, max_steps: int = 1000):
    """Submit `p` and step `engine` until it is done (at most `max_steps`), calling `each_step` after every step:
    (its handle, the steps it took)."""
    handle = engine.submit(p, embeddings(text, p))
    steps = 0
    while not handle.done() and steps < max_steps:
        engine.step()
        each_step()
        steps += 1
    return handle, steps


# ------------------------------------------------------------------------------ alone == QwenImagePipeline


@pytest.fixture(scope="module")
def reference(preset, adapters):
    """diffusers' own pipeline over a separate copy of the transformer, with every LoRA loaded the usual way."""
    pipe = QwenImagePipeline.from_pretrained(preset.root, text_encoder=None, tokenizer=None, vae=None)
    pipe.vae_scale_factor = preset.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    for v in preset.variants:
        if v.lightning_lora:
            pipe.load_lora_weights(str(preset.resolve(v.lightning_lora)), adapter_name=v.id.replace("-", "_"))
    for ref, path in adapters.items():
        pipe.load_lora_weights(path, adapter_name=ref.replace("/", "_").replace("@", "_"))
    return pipe


def call_reference(pipe, preset, p: DenoiseParams, emb: TextEmbeddings) -> np.ndarray:
    variant = preset.variant(p.variant)
    names, weights = [], []
    if variant.lightning_lora:
        names.append(variant.id.replace("-", "_")), weights.append(1.0)
    for use in p.adapters:
        names.append(use.ref.replace("/", "_").replace("@", "_")), weights.append(use.scale)
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, weights)
    else:
        pipe.disable_lora()
    base = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(variant.scheduler or base.config)
    try:
        negative = None if emb.negative is None else torch.from_numpy(emb.negative)[None]
        out = pipe(prompt=None, prompt_embeds=torch.from_numpy(emb.prompt)[None], negative_prompt_embeds=negative,
                   true_cfg_scale=p.true_cfg_scale, height=p.height, width=p.width,
                   num_inference_steps=p.num_inference_steps, num_images_per_prompt=p.n,
                   generator=[torch.Generator().manual_seed(s) for s in p.seeds], output_type="latent").images
    finally:
        pipe.scheduler = base
    return out.float().numpy()


ALONE_CASES = [
    params(LIGHTNING_4, seeds=(5, 77)),
    params(LIGHTNING_8, seeds=(3,), size=(128, 64)),
    params(BASE, seeds=(11,)),                       # true CFG: prompt and " " differ in length (padded rows)
    params(BASE, seeds=(1, 2, 3, 4, 5), steps=3),    # n ≥ 4: the merged row-level GEMM path
    params(LIGHTNING_4, seeds=(9,), adapters=(AdapterUse("acme/a@v1", 0.8),)),
    params(BASE, seeds=(4, 6), steps=4, adapters=(AdapterUse("acme/b@v1", 1.0), AdapterUse("acme/a@v1", -0.5))),
]


@pytest.mark.parametrize("case", range(len(ALONE_CASES)))
def test_a_request_alone_equals_qwen_image_pipeline(engine, reference, preset, text, adapters, local_pipeline, case):
    p = ALONE_CASES[case]
    emb = embeddings(text, p)
    ours = engine.denoise(p, emb, adapter_paths=adapters)
    theirs = call_reference(reference, preset, p, emb)
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()
    pixels = [np.asarray(im) for im in local_pipeline.vae.decode(ours, p.height, p.width)]
    expected = [np.asarray(im) for im in local_pipeline.vae.decode(theirs, p.height, p.width)]
    assert all(np.array_equal(a, b) for a, b in zip(pixels, expected))


# ------------------------------------------------------------------------------------- batch invariance


def mixed_requests(rng: np.random.Generator) -> list[tuple[DenoiseParams, int]]:
    """Requests of every kind at once: variants, CFG, sizes, n, stacked adapters with scales, prompts."""
    stacks = [(), (AdapterUse("acme/a@v1"),), (AdapterUse("acme/b@v1", 0.7),),
              (AdapterUse("acme/a@v1", 0.5), AdapterUse("acme/b@v1", 1.3)), (AdapterUse("acme/b@v1"), AdapterUse("acme/a@v1"))]
    out = []
    for _ in range(10):
        variant = [LIGHTNING_4, LIGHTNING_8, BASE][rng.integers(3)]
        seeds = tuple(int(s) for s in rng.integers(0, 10_000, size=rng.integers(1, 4)))
        size = [(64, 64), (128, 64)][rng.integers(2)]
        p = params(variant, seeds=seeds, size=size, steps=4 if variant == BASE else None,
                   adapters=stacks[rng.integers(len(stacks))], priority="batch" if len(out) < 5 else "interactive")
        out.append((p, int(rng.integers(len(PROMPTS)))))
    return out


def test_mixed_batches_equal_each_request_alone(preset, text, adapters):
    """Ten mixed requests, five `batch` ones first and five `interactive` ones two steps later, under a budget
    that pauses the batch work: every request's latents are bit-identical to the same request run alone (3 random
    mixes, 30 requests)."""
    engine = DenoiseEngine(preset, EngineConfig(max_batch_rows=8))
    steps_before = 0
    for mix in range(3):
        requests = mixed_requests(np.random.default_rng(mix))
        alone = [engine.denoise(p, embeddings(text, p, i), adapter_paths=adapters) for p, i in requests]
        steps_alone = engine.steps_run - steps_before
        handles = [engine.submit(p, embeddings(text, p, i), adapter_paths=adapters) for p, i in requests[:5]]
        engine.step()
        engine.step()
        handles += [engine.submit(p, embeddings(text, p, i), adapter_paths=adapters) for p, i in requests[5:]]
        while engine.step():
            pass
        steps_batched = engine.steps_run - steps_before - steps_alone
        steps_before = engine.steps_run
        assert steps_batched < steps_alone  # they did share forwards
        assert any(h.paused_steps for h in handles)  # and the budget paused some
        for (p, _), h, a in zip(requests, handles, alone):
            assert np.array_equal(h.result(), a), (mix, p)


def test_adapters_never_leak_between_rows(engine, text, adapters):
    """In one forward: rows with adapter A, B, A+B stacked, B+A (other order) and none. Each equals its request alone,
    and the five settings draw different latents (else a leak could not show)."""
    stacks = {"none": (), "a": (AdapterUse("acme/a@v1"),), "b": (AdapterUse("acme/b@v1"),),
              "ab": (AdapterUse("acme/a@v1"), AdapterUse("acme/b@v1")), "ba": (AdapterUse("acme/b@v1"), AdapterUse("acme/a@v1"))}
    ps = {k: params(LIGHTNING_4, seeds=(3,), adapters=s) for k, s in stacks.items()}
    alone = {k: engine.denoise(p, embeddings(text, p), adapter_paths=adapters) for k, p in ps.items()}
    handles = {k: engine.submit(p, embeddings(text, p), adapter_paths=adapters) for k, p in ps.items()}
    while engine.step():
        pass
    for k, h in handles.items():
        assert np.array_equal(h.result(), alone[k]), k
    for x in ("none", "a", "b", "ab"):
        for y in ("none", "a", "b", "ab"):
            if x < y:
                assert np.abs(alone[x] - alone[y]).max() > 0.05, (x, y)


# ------------------------------------------------------------------------------------------- scheduling


def test_an_interactive_request_runs_first_and_paused_batch_work_is_unchanged(preset, text):
    engine = DenoiseEngine(preset, EngineConfig(max_batch_rows=4))
    slow = [params(BASE, seeds=(s, s + 1), steps=8, priority="batch") for s in (10, 20)]  # 4 rows each
    alone = [engine.denoise(p, embeddings(text, p)) for p in slow]
    batch = [engine.submit(p, embeddings(text, p)) for p in slow]
    engine.step()
    engine.step()  # the first batch request holds the whole budget; the second waits
    urgent, steps = steps_to_finish(engine, text, params(LIGHTNING_4, seeds=(7,), priority="interactive"))
    assert steps == 4  # it ran at once, every step, never waiting behind the batch work
    assert not batch[0].done() and batch[0].paused_steps >= 1  # the started batch request was paused for it
    while engine.step():
        pass
    for h, a in zip(batch, alone):
        assert np.array_equal(h.result(), a)


class Req:
    """A stand-in for a live request, for the policy alone."""

    def __init__(self, seq, priority="interactive", tenant=None, rows=1, steps=4, waited=0, started=False,
                 grid=(4, 4)):
        self.seq, self.priority, self.tenant, self.rows, self.grid = seq, priority, tenant, rows, grid
        self.remaining_steps, self.waited_steps, self.started = steps, waited, started
        self.sequence_tokens = grid[0] * grid[1]
        self.signature = (grid,)


def test_policy_orders_priority_then_starving_then_least_work_then_tenant_fair():
    sched = StepScheduler(EngineConfig(max_batch_rows=4, starvation_steps=100))
    reqs = [Req(1, "batch", started=True), Req(2, tenant="x"), Req(3, tenant="x"), Req(4, tenant="y"),
            Req(5, rows=2, steps=40, started=True), Req(6, tenant="y", grid=(8, 8)), Req(7, steps=50, waited=100),
            Req(8, steps=2)]
    order = [r.seq for r in sched.order(reqs)]
    # interactive first; the starving one first of those; then least work (8: 2 steps); equal work alternates
    # tenants x, y, x, y; the long started one (80 row-steps) after; batch last.
    assert order == [7, 8, 2, 4, 3, 6, 5, 1]
    plan = sched.schedule(reqs)
    assert sorted(r.seq for b in plan.batches for r in b) == [2, 4, 7, 8]  # the budget of 4 rows
    assert sorted(r.seq for r in plan.paused) == [1, 5]
    assert [r.seq for b in sched.schedule([Req(9, rows=10), Req(10, steps=50)]).batches for r in b] == [9]
    grids = sched.schedule([Req(1, grid=(4, 4)), Req(2, grid=(8, 8)), Req(3, grid=(4, 4))]).batches
    assert [[r.seq for r in b] for b in grids] == [[1, 3], [2]]  # one forward per latent grid


def test_a_tenant_over_its_fair_share_of_rows_waits_first():
    """Fair share is more than a tie-break: a tenant's short requests do not go before another tenant's longer one
    once it holds more rows, in this step or in recent ones; priorities still come first."""
    sched = StepScheduler(EngineConfig(max_batch_rows=4))
    flood = [Req(i, tenant="flood", steps=4) for i in range(8)]
    calm = Req(100, tenant="calm", steps=8)  # twice the remaining work of each flood request
    # A fresh scheduler: the flood's least-work request first, then the calm tenant's turn (it has no rows yet).
    assert [r.seq for r in sched.order([*flood, calm])][:3] == [0, 100, 1]
    for _ in range(3):  # the flood alone runs its rows for a few steps
        sched.schedule(flood)
    assert sched.recent_rows["flood"] > 4 and "calm" not in sched.recent_rows
    assert sched.order([*flood, calm])[0] is calm  # now over its share: the flood waits first
    plan = sched.schedule([*flood, calm, Req(200, "batch", tenant="calm", steps=1)])
    assert [r.seq for b in plan.batches for r in b] == [100, 0, 1, 2]  # the batch-priority one still waits
    # Rows are what is shared: a tenant's 4-row request counts four times a 1-row one.
    wide = StepScheduler(EngineConfig(max_batch_rows=8))
    order = wide.order([Req(1, tenant="a", rows=4), Req(2, tenant="a", rows=4), Req(3, tenant="b"),
                        Req(4, tenant="b"), Req(5, tenant="b")])
    assert [r.seq for r in order] == [3, 1, 4, 5, 2]  # b first (less work); then a (no rows yet); then b up to 4 rows
    forgetful = StepScheduler(EngineConfig(max_batch_rows=4, fair_share_decay=0.0))
    forgetful.schedule(flood)
    forgetful.schedule([calm])
    assert forgetful.recent_rows == {"calm": 1}  # decay 0: only the last step's rows count


def test_a_flooding_tenant_leaves_another_tenants_latency_within_twice_idle(preset, text):
    """One tenant keeps 16 Lightning-4 requests live (every one it loses is replaced at once); another tenant sends
    Lightning-8 requests one after the other. Its median latency, in engine steps from submit to done, stays within
    2x of the same request on an idle engine. Before fair share (a tie-break only), least-remaining-work-first put
    every 4-step flood request before the 8-step one, which then waited for `starvation_steps` (200)."""
    engine = DenoiseEngine(preset, EngineConfig(max_batch_rows=4))
    calm_params = params(LIGHTNING_8, seeds=(3,), tenant="calm")
    idle, idle_steps = steps_to_finish(engine, text, calm_params)
    assert idle_steps == 8
    flood_params = [params(LIGHTNING_4, seeds=(s,), tenant="flood") for s in range(16)]
    flood = [engine.submit(p, embeddings(text, p)) for p in flood_params]

    def refill():
        flood[:] = [h if not h.done() else engine.submit(p, embeddings(text, p)) for h, p in zip(flood, flood_params)]

    latencies = []
    for i in range(3):
        # At most 4x idle: enough to see the median's bound fail, without waiting out the 200 starvation steps.
        calm, steps = steps_to_finish(engine, text, calm_params, each_step=refill, max_steps=4 * idle_steps)
        latencies.append(steps)
        assert sum(not h.done() for h in flood) == 16
    assert sorted(latencies)[1] <= 2 * idle_steps, latencies
    assert np.array_equal(calm.result(), idle.result())  # and its result is the same as alone
    for h in flood:
        h.cancel()
    while engine.step():
        pass


def test_a_short_request_is_not_blocked_behind_long_ones(preset, text):
    """A 4-step Lightning request arriving while long CFG requests hold the budget runs at once, every step."""
    engine = DenoiseEngine(preset, EngineConfig(max_batch_rows=6))
    long = [engine.submit(p, embeddings(text, p)) for p in (params(BASE, seeds=(s, s + 1), steps=30) for s in (1, 3))]
    engine.step()
    short_params = params(LIGHTNING_4, seeds=(9,))
    short, steps = steps_to_finish(engine, text, short_params)
    assert steps == 4 and not any(h.done() for h in long)
    assert np.array_equal(short.result(), engine.denoise(short_params, embeddings(text, short_params)))
    while engine.step():
        pass


def test_max_batch_tokens_bounds_a_step():
    sched = StepScheduler(EngineConfig(max_batch_rows=64, max_batch_tokens=100))
    plan = sched.schedule([Req(i, rows=2) for i in range(4)])
    assert sum(len(b) for b in plan.batches) == 3  # 3 × 2 rows × 16 tokens = 96 ≤ 100 < 128


# --------------------------------------------------------------------------- progress and cancellation


def test_progress_reports_every_step_and_x0_previews(engine, text):
    p = params(LIGHTNING_8, seeds=(2, 3), preview_steps=(2, 8))
    events = []
    latents = engine.denoise(p, embeddings(text, p), on_progress=events.append)
    assert [(e.step, e.total_steps) for e in events] == [(i, 8) for i in range(1, 9)]
    assert [e.step for e in events if e.preview is not None] == [2, 8]
    # x0 = x - sigma * v; at the last step sigma_next is 0, so the final latents are that step's x0 exactly.
    assert np.array_equal(events[-1].preview, latents)
    assert events[1].preview.shape == latents.shape and np.abs(events[1].preview - latents).max() > 1e-3


def test_the_engine_logs_the_request_id_when_it_admits_and_finishes_a_request(engine, text, caplog):
    p = params(LIGHTNING_4, request_id="req-engine-7")
    with caplog.at_level("INFO", logger="lightray.engine"):
        engine.denoise(p, embeddings(text, p))
    lines = [r.getMessage() for r in caplog.records if "req-engine-7" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("admitted request req-engine-7"), lines
    assert "finished after 4 of 4 steps" in lines[1], lines


def test_cancel_frees_the_row_at_the_next_step_and_others_go_on(engine, text):
    long, short = params(BASE, seeds=(1,), steps=50), params(LIGHTNING_4, seeds=(2,))
    alone = engine.denoise(short, embeddings(text, short))
    cancel = threading.Event()
    seen = []

    def on_progress(e):
        seen.append(e.step)
        if e.step == 3:
            cancel.set()

    doomed = engine.submit(long, embeddings(text, long), on_progress=on_progress)
    other = engine.submit(short, embeddings(text, short))
    while not doomed.done():
        if cancel.is_set():
            doomed.cancel()
        engine.step()
    with pytest.raises(DenoiseCancelled, match="after step 3 of 50"):
        doomed.result()
    assert seen == [1, 2, 3]
    while engine.step():
        pass
    assert np.array_equal(other.result(), alone)


# ------------------------------------------------------------------------------- adapters and failures


def test_a_corrupt_adapter_fails_its_request_alone(engine, text, adapters, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    ok = params(LIGHTNING_4, seeds=(4,), adapters=(AdapterUse("acme/a@v1"),))
    alone = engine.denoise(ok, embeddings(text, ok), adapter_paths=adapters)
    bad = params(LIGHTNING_4, seeds=(4,), adapters=(AdapterUse("acme/broken@v1"),))
    failing = engine.submit(bad, embeddings(text, bad), adapter_paths={"acme/broken@v1": str(broken)})
    fine = engine.submit(ok, embeddings(text, ok), adapter_paths=adapters)
    while engine.step():
        pass
    with pytest.raises(AdapterLoadError, match="acme/broken@v1"):
        failing.result()
    assert np.array_equal(fine.result(), alone)
    assert "acme/broken@v1" not in engine.tenant_adapters


def test_an_adapter_in_use_is_evicted_only_after_its_rows_finish(preset, text, adapters):
    engine = DenoiseEngine(preset)
    p = params(LIGHTNING_8, seeds=(5,), adapters=(AdapterUse("acme/a@v1"),))
    with_adapter = engine.denoise(p, embeddings(text, p), adapter_paths=adapters)
    request = engine.submit(p, embeddings(text, p), adapter_paths=adapters)
    engine.step()
    engine.unload_adapter("acme/a@v1")  # the LRU evicts it mid-request
    engine.step()
    assert "acme/a@v1" in engine.tenant_adapters  # still loaded: a live row uses it
    while engine.step():
        pass
    assert np.array_equal(request.result(), with_adapter)
    engine.step()  # the deferred eviction runs at the next boundary
    assert "acme/a@v1" not in engine.tenant_adapters
    # A later request that names it again (with its files) loads it again.
    assert np.array_equal(engine.denoise(p, embeddings(text, p), adapter_paths=adapters), with_adapter)


def test_bad_submissions_are_refused_before_queueing(engine, text):
    p = params(BASE, seeds=(1,))
    with pytest.raises(ValueError, match="negative"):
        engine.submit(p, TextEmbeddings(text[0][0], None))
    with pytest.raises(ValueError, match="not loaded"):
        engine.submit(params(adapters=(AdapterUse("acme/nowhere@v1"),)), embeddings(text, params()))
    with pytest.raises(ValueError, match="is not served"):
        engine.submit(params().__class__(seeds=(1,), width=64, height=64, num_inference_steps=4, variant="nope"),
                      embeddings(text, params()))
    with pytest.raises(ValueError, match="size"):
        engine.submit(params(size=(72, 64)), embeddings(text, params()))
    assert engine.stats()["live"] == 0


def test_the_loop_thread_batches_concurrent_callers(preset, text):
    """With its loop thread running (as in a replica), concurrent callers share steps and get their own
    results."""
    import concurrent.futures

    engine = DenoiseEngine(preset).start()
    try:
        ps = [params(LIGHTNING_4, seeds=(s,)) for s in range(6)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda p: engine.denoise(p, embeddings(text, p)), ps))
        steps = engine.steps_run
        alone = [engine.denoise(p, embeddings(text, p)) for p in ps]
        assert steps < 6 * 4  # fewer steps than one request at a time would take
        assert all(np.array_equal(a, b) for a, b in zip(together, alone))
        engine.check_health()
    finally:
        engine.stop()
