"""Issue 33, ready for the GPU: fused-Lightning replicas (`fuse:`), compiled transformer blocks (`compile:`), the
Qwen-Image-2512 Lightning preset over the mini real layout, and `benchmarks/gpu_check.py --tiny`.

Numerics are measured on the embedded model in float32 (fused against unfused, compiled against eager) and on the
mini real layout in bfloat16, one torch thread, as the replicas run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from pydantic import ValidationError

from mini_real import MODELTC_LIGHTNING_SCHEDULER, build_mini_real, write_lightning_lora
from lightray.config import REPO_ROOT, EngineConfig, load_preset
from lightray.contracts import AdapterUse, DenoiseParams
from lightray.engine.engine import CompileUnavailable, DenoiseEngine
from lightray.errors import NotFound, RequestError
from lightray.schemas import GenerationSpec
from serve_app.served_models import ServedModels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIGHTNING_4, LIGHTNING_8, BASE = "lightray-shapes-lightning-4", "lightray-shapes-lightning-8", "lightray-shapes"
PROMPT = "a red circle on the left, white background"
PRESET_2512 = REPO_ROOT / "configs/models/qwen-image-2512-lightning.yaml"
LIGHTNING_2512, BASE_2512 = "qwen-image-2512-lightning-4", "qwen-image-2512"


def fused_preset(preset, variant: str, **update):
    return load_preset({**preset.model_dump(), "fuse": variant, **update})


def spec(model: str, seeds=(3,), steps: int = 4, size: int = 128, cfg: float = 1.0) -> GenerationSpec:
    return GenerationSpec(prompt=PROMPT, model=model, seeds=list(seeds), width=size, height=size,
                          num_inference_steps=steps, true_cfg_scale=cfg, negative_prompt=" " if cfg > 1 else None)


# ------------------------------------------------------------------------------------------ fuse: the preset


def test_fuse_naming_an_unknown_variant_is_refused_at_load(preset):
    with pytest.raises(ValidationError, match=r"fuse: 'no-such-variant' is not a Lightning variant"):
        fused_preset(preset, "no-such-variant")


def test_fuse_naming_a_variant_without_a_lightning_lora_is_refused(preset):
    with pytest.raises(ValidationError, match=r"fuse: 'lightray-shapes' is not a Lightning variant"):
        fused_preset(preset, BASE)


def test_a_fused_preset_serves_its_variant_only(preset):
    fused = fused_preset(preset, LIGHTNING_8)
    assert fused.model_ids == [LIGHTNING_8]
    assert fused.variant(None).id == LIGHTNING_8
    # quality_variants maps low to Lightning 4 and high to the base: a fused replica serves Lightning 8 whatever.
    assert {fused.variant_for_quality(q).id for q in ("low", "medium", "high", None)} == {LIGHTNING_8}
    assert load_preset(fused.model_dump()).model_ids == [LIGHTNING_8]  # what the deployments get back


def test_a_request_for_another_variant_of_a_fused_preset_is_a_400_naming_model(preset):
    fused = fused_preset(preset, LIGHTNING_4)
    from lightray.schemas import ImageGenerationRequest

    with pytest.raises(RequestError) as caught:
        ImageGenerationRequest(prompt=PROMPT, model=LIGHTNING_8).resolve(fused, default_seed=1)
    assert type(caught.value) is RequestError and caught.value.param == "model"  # 400, not 404
    assert "fused" in caught.value.message and LIGHTNING_4 in caught.value.message


def test_served_models_route_each_variant_to_the_fused_deployment_that_serves_it(preset):
    """One deployment per variant: each request goes to the replica whose weights hold its Lightning LoRA; a
    variant no deployment serves is a 400 naming `model`, never sent to a replica fused for another."""
    four = fused_preset(preset, LIGHTNING_4, name="shapes-fused-4")
    eight = fused_preset(preset, LIGHTNING_8, name="shapes-fused-8")
    served = ServedModels([SimpleNamespace(preset=four), SimpleNamespace(preset=eight)])
    assert served.for_request(LIGHTNING_4, "generations").preset is four
    assert served.for_request(LIGHTNING_8, "generations").preset is eight
    with pytest.raises(RequestError) as caught:
        served.for_request(BASE, "generations")
    assert type(caught.value) is RequestError and caught.value.param == "model"
    with pytest.raises(NotFound):
        served.for_request("no-such-model", "generations")


# ----------------------------------------------------------------------------------------- fuse: the engine


@pytest.fixture(scope="module")
def fused_engine(preset):
    return DenoiseEngine(fused_preset(preset, LIGHTNING_4))


def test_a_fused_engine_holds_no_lightning_lora(fused_engine):
    assert fused_engine.fused_variant == LIGHTNING_4 and fused_engine.lightning == {}
    assert not getattr(fused_engine.transformer, "peft_config", None)


def test_fused_equals_unfused_within_1e_4_in_float32(fused_engine, local_pipeline):
    """The embedded model (float32): fused against the unfused engine's per-row LoRA, latents and pixels."""
    s = spec(LIGHTNING_4, seeds=(3, 4))
    text = local_pipeline.encode(s)
    unfused = local_pipeline.denoiser.denoise(s.denoise_params(), text)
    fused = fused_engine.denoise(s.denoise_params(), text)
    latent = np.abs(unfused - fused)
    assert latent.max() <= 1e-4, latent.max()
    decode = lambda x: np.stack([np.asarray(im) for im in local_pipeline.vae.decode(x, 128, 128)]).astype(int)
    pixels = np.abs(decode(unfused) - decode(fused))
    assert pixels.max() <= 1, pixels.max()  # measured: README, "Fused Lightning replicas"
    print(f"fused vs unfused float32: latents max {latent.max():.2e} mean {latent.mean():.2e}; "
          f"pixels max {pixels.max()} mean {pixels.mean():.4f}")


def test_a_fused_engine_refuses_another_variant_naming_model(fused_engine, local_pipeline):
    s = spec(LIGHTNING_8, steps=8)
    with pytest.raises(RequestError) as caught:
        fused_engine.submit(s.denoise_params(), local_pipeline.encode(s))
    assert caught.value.param == "model" and "fused" in caught.value.message


def test_tenant_adapters_stack_on_a_fused_engine(fused_engine, local_pipeline, preset, tmp_path):
    """A tenant adapter through the batched path on top of the fused weights, against the unfused engine's
    Lightning + tenant stack; and a batch mixing it with a plain request changes neither."""
    from testing.adapters import make_lora_adapter

    path = str(make_lora_adapter(preset, tmp_path / "a", seed=1))
    use = AdapterUse("acme/a@v1", 0.8)
    params = DenoiseParams(seeds=(9,), width=128, height=128, num_inference_steps=4, variant=LIGHTNING_4,
                           adapters=(use,))
    text = local_pipeline.encode(spec(LIGHTNING_4))
    unfused = local_pipeline.denoiser.denoise(params, text, adapter_paths={use.key: path})
    fused = fused_engine.denoise(params, text, adapter_paths={use.key: path})
    assert np.abs(unfused - fused).max() <= 1e-4
    plain = spec(LIGHTNING_4, seeds=(2,)).denoise_params()
    both = [fused_engine.submit(params, text), fused_engine.submit(plain, text)]
    while not all(r.done() for r in both):
        fused_engine.step()
    assert np.array_equal(both[0].result(), fused)
    assert np.abs(both[1].result() - fused).max() > 1e-3  # the adapter changed the image


# ----------------------------------------------------------------------------------------- compile


def test_compile_without_a_working_backend_fails_the_engine_at_start(preset):
    with pytest.raises(CompileUnavailable, match=r"compile: true, but torch .* cannot compile with backend "
                                                 r"'no-such-backend'.*set compile: false"):
        DenoiseEngine(preset, EngineConfig(compile=True, compile_backend="no-such-backend"))


def test_a_broken_compiler_fails_at_start_not_on_a_request(preset, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(CompileUnavailable, match="no C\\+\\+ compiler"):
        DenoiseEngine(preset, EngineConfig(compile=True))


@pytest.fixture(scope="module")
def compiled_engine(preset):
    """The embedded model compiled through dynamo with the aot_eager backend: the same graphs, recompiles and
    LoRA routing as inductor, without its C++ build (gpu_check --tiny and benchmarks/bench_compile.py run
    inductor)."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    engine = DenoiseEngine(preset, EngineConfig(compile=True, compile_backend="aot_eager"))
    yield engine, dynamo_utils.counters
    torch._dynamo.reset()


@pytest.mark.slow  # dynamo traces the block: minutes on this shared 2-core machine
def test_compile_happens_at_start_and_new_row_counts_do_not_recompile(compiled_engine, preset, local_pipeline):
    engine, counters = compiled_engine
    assert engine.compiled and engine.compile_s > 0
    graphs = counters["stats"]["unique_graphs"]
    text = local_pipeline.encode(spec(LIGHTNING_4))
    for rows in (1, 3, 5, 8):  # 3, 5 and 8 never ran at start
        requests = [engine.submit(spec(LIGHTNING_4, seeds=(i,)).denoise_params(), text) for i in range(rows)]
        while not all(r.done() for r in requests):
            engine.step()
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
    # A batch mixing prompt lengths (padded text) leaves the row-wise attention to eager: graph breaks, no new
    # graph per set of lengths.
    short = local_pipeline.encode(GenerationSpec(prompt="a dot", model=LIGHTNING_4, seeds=[1], width=128,
                                                 height=128, num_inference_steps=4, true_cfg_scale=1.0))
    for lengths in ((text, short), (short, text, text)):
        requests = [engine.submit(spec(LIGHTNING_4, seeds=(i,)).denoise_params(), t) for i, t in enumerate(lengths)]
        while not all(r.done() for r in requests):
            engine.step()
    graphs_with_padding = counters["stats"]["unique_graphs"]
    requests = [engine.submit(spec(LIGHTNING_4, seeds=(i,)).denoise_params(), t)
                for i, t in enumerate((short, short, text, short))]
    while not all(r.done() for r in requests):
        engine.step()
    assert counters["stats"]["unique_graphs"] == graphs_with_padding


@pytest.mark.slow  # dynamo traces the block: minutes on this shared 2-core machine
def test_compiled_lora_routing_matches_eager(compiled_engine, local_pipeline, preset, tmp_path):
    """Lightning 4 and 8 and a tenant adapter in one batch, against the eager engine's requests alone: run eagerly
    once served (no graph fits that make-up), and compiled whole when the compiler may build its graph."""
    from testing.adapters import make_lora_adapter

    engine, counters = compiled_engine
    breaks = sum(counters["graph_break"].values())
    path = str(make_lora_adapter(preset, tmp_path / "b", seed=2))
    use = AdapterUse("acme/b@v1", 1.0)
    text = local_pipeline.encode(spec(LIGHTNING_4))
    cases = [DenoiseParams(seeds=(1,), width=128, height=128, num_inference_steps=4, variant=LIGHTNING_4),
             DenoiseParams(seeds=(2,), width=128, height=128, num_inference_steps=8, variant=LIGHTNING_8),
             DenoiseParams(seeds=(3,), width=128, height=128, num_inference_steps=4, variant=LIGHTNING_4,
                           adapters=(use,))]
    eager = [local_pipeline.denoiser.denoise(p, text, adapter_paths={use.key: path}) for p in cases]

    def run() -> None:
        requests = [engine.submit(p, text, adapter_paths={use.key: path}) for p in cases]
        while not all(r.done() for r in requests):
            engine.step()
        for expected, request in zip(eager, requests):
            assert np.abs(request.result() - expected).max() <= 1e-4

    # Served: a make-up no start-up graph fits runs eagerly; no user request waits for a compilation.
    assert engine.compile_stance == "eager_on_recompile"
    graphs = counters["stats"]["unique_graphs"]
    run()
    assert counters["stats"]["unique_graphs"] == graphs
    # Compiled as the warm-up would (the stance the start-up uses), the mixed LoRA routing traces whole.
    engine.compile_stance = "default"
    try:
        run()
    finally:
        engine.compile_stance = "eager_on_recompile"
    assert counters["stats"]["unique_graphs"] > graphs
    assert sum(counters["graph_break"].values()) == breaks


# ------------------------------------------------------------------------------ Qwen-Image-2512, mini real


@pytest.fixture(scope="module")
def mini_2512(tmp_path_factory) -> dict:
    """The mini real-layout folder (Qwen-Image-2512 has Qwen-Image's architecture and configs) and a random
    4-step Lightning file in the published layout; configs/models/qwen-image-2512-lightning.yaml unchanged except
    paths (and `device`)."""
    root = build_mini_real(tmp_path_factory.mktemp("mini-2512") / "Qwen-Image-2512")
    lora = root.parent / "Qwen-Image-2512-Lightning" / "4steps.safetensors"
    write_lightning_lora(lora, seed=4)
    raw = yaml.safe_load(PRESET_2512.read_text())
    raw["path"], raw["device"] = str(root), "cpu"
    raw["variants"][0]["lightning_lora"] = str(lora)
    return {"root": root, "lora": lora, "raw": raw}


def test_the_2512_preset_has_modeltc_s_scheduler_and_bf16():
    raw = yaml.safe_load(PRESET_2512.read_text())
    preset = load_preset(raw)
    assert preset.dtype == "bfloat16" and preset.model_ids == [LIGHTNING_2512, BASE_2512]
    assert preset.variant(LIGHTNING_2512).scheduler == MODELTC_LIGHTNING_SCHEDULER
    assert preset.variant(LIGHTNING_2512).num_inference_steps == 4
    assert "Qwen-Image-2512-Lightning-4steps-V1.0" in preset.variant(LIGHTNING_2512).lightning_lora
    assert load_preset({**raw, "fuse": LIGHTNING_2512}).model_ids == [LIGHTNING_2512]


def test_the_2512_preset_serves_diffusers_latents_bit_for_bit(mini_2512):
    from lightray.pipeline import LocalPipeline

    pipeline = LocalPipeline(load_preset(mini_2512["raw"]))
    reference = QwenImagePipeline.from_pretrained(mini_2512["root"], dtype=torch.bfloat16)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(mini_2512["lora"]), adapter_name="lightning")
    reference.scheduler = FlowMatchEulerDiscreteScheduler.from_config(MODELTC_LIGHTNING_SCHEDULER)
    theirs = reference(prompt=PROMPT, height=256, width=256, num_inference_steps=4, true_cfg_scale=1.0,
                       generator=torch.Generator().manual_seed(5), output_type="latent").images.float().numpy()
    s = GenerationSpec(prompt=PROMPT, model=LIGHTNING_2512, seeds=[5], width=256, height=256,
                       num_inference_steps=4, true_cfg_scale=1.0)
    ours = pipeline.denoiser.denoise(s.denoise_params(), pipeline.encode(s))
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()


def test_the_2512_preset_fused_in_bfloat16(mini_2512):
    """Fusing in bfloat16 rounds each merged weight once: the figure, latents and pixels, stated in the README."""
    from lightray.pipeline import LocalPipeline

    pipeline = LocalPipeline(load_preset(mini_2512["raw"]))
    fused = DenoiseEngine(load_preset({**mini_2512["raw"], "fuse": LIGHTNING_2512}))
    s = GenerationSpec(prompt=PROMPT, model=LIGHTNING_2512, seeds=[5, 6], width=256, height=256,
                       num_inference_steps=4, true_cfg_scale=1.0)
    text = pipeline.encode(s)
    unfused_latents = pipeline.denoiser.denoise(s.denoise_params(), text)
    fused_latents = fused.denoise(s.denoise_params(), text)
    latent = np.abs(unfused_latents - fused_latents)
    decode = lambda x: np.stack([np.asarray(im) for im in pipeline.vae.decode(x, 256, 256)]).astype(int)
    pixels = np.abs(decode(unfused_latents) - decode(fused_latents))
    print(f"fused vs unfused bfloat16 (mini 2512): latents max {latent.max():.3g} mean {latent.mean():.3g}; "
          f"pixels max {pixels.max()} mean {pixels.mean():.3f}")
    assert 0 < latent.max() <= 0.1 and pixels.mean() < 2


# ------------------------------------------------------------------------------------- gpu_check --tiny


@pytest.mark.slow
def test_gpu_check_tiny_fills_every_field(tmp_path):
    # Its time is a benchmark figure (docs/gpu/README.md: under 5 minutes from a cold compiler cache on this 2-core
    # host, `elapsed_s` in its JSON), not a test bound: a loaded CI host must not turn it red.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks/gpu_check.py"), "--tiny", "--out",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["complete"] and result["tiny"]

    def empty(value) -> list[str]:
        if isinstance(value, dict):
            return [f"{k}.{p}" if p else k for k, v in value.items() for p in empty(v) or ([""] if v is None else [])]
        if isinstance(value, list):
            return [p for v in value for p in empty(v)] or ([] if value else ["[]"])
        return [] if value is not None and value == value else [""]  # None and NaN are empty

    assert not empty(result), empty(result)
    expected = {"text_encoder", "vae_decode", "unfused_steps", "batch_variance", "fused_steps", "fuse_numerics_bf16",
                "fuse_numerics_fp32", "compiled_steps", "edit_2511_step", "estimate", "budgets"}
    assert set(result["measurements"]) == expected
    steps = result["measurements"]["unfused_steps"]["cases"]
    assert {(c["cfg"], c["rows"]) for c in steps} == {(False, 1), (False, 2), (False, 4), (True, 2), (True, 4)}
    assert result["measurements"]["fuse_numerics_fp32"]["max_latent"] <= 1e-4
    assert result["measurements"]["batch_variance"]["max"] == 0.0  # the CPU's batch invariance
    assert "| s/step, fused, compiled, CFG off, rows: 4 |" in (tmp_path / "gpu_check.md").read_text()
    assert result["elapsed_s"] > 0  # from the process's start, imports included


# ------------------------------------------------------------------------------- serve config, fused deployments


def test_the_fused_serve_config_shares_the_text_encoder_and_vae_and_routes_by_model():
    from serve_app.app import stage_names
    from serve_app.settings import ServiceSettings

    args = yaml.safe_load((REPO_ROOT / "configs/serve/gpu-fused.yaml").read_text())["applications"][0]["args"]
    settings = ServiceSettings(**{**args, "auth_enabled": False})
    presets = [load_preset(ref) for ref in [settings.preset, *settings.extra_presets]]
    assert presets[0].fuse == LIGHTNING_2512 and presets[0].model_ids == [LIGHTNING_2512]
    assert presets[1].fuse is None and presets[1].model_ids == [BASE_2512]
    names = stage_names(presets)
    assert names[0] == {"Denoiser": "Denoiser", "TextEncoder": "TextEncoder", "VaeDecoder": "VaeDecoder"}
    assert names[1] == {"Denoiser": "Denoiser-qwen-image-2512-base", "TextEncoder": "TextEncoder",
                        "VaeDecoder": "VaeDecoder"}
    served = ServedModels([SimpleNamespace(preset=p) for p in presets])
    assert served.for_request(BASE_2512, "generations").preset is presets[1]
    assert served.for_request(LIGHTNING_2512, "generations").preset is presets[0]
    assert served.for_request(None, "generations").preset is presets[0]


def test_presets_of_other_models_keep_their_own_stages(preset):
    from serve_app.app import stage_names

    edit = load_preset("lightray-shapes-edit")
    names = stage_names([preset, edit])
    assert names[1]["TextEncoder"] == "TextEncoder-lightray-shapes-edit"
