"""Qwen-Image-Edit-Plus through the engine: a request alone gives exactly `QwenImageEditPlusPipeline.__call__`'s
latents on a mini real-layout Edit-2511 folder (`tests/mini_real.py`: the published index, transformer config with
`zero_cond_t`, processor config, a Qwen2.5-VL with its vision tower), for 1, 2 and 3 input images, with and
without true CFG, and with a Lightning LoRA; batched with other edits, each result is unchanged.

The pipeline's input-image areas are module constants (384² and 1024²); the preset carries them as data, and
these tests shrink both, in the preset and in the pipeline's module alike, to keep the exact VAE fast.
Every test pins torch to one thread, as the Serve replicas run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image

from mini_real import MODELTC_LIGHTNING_SCHEDULER, build_mini_real_edit, write_lightning_lora
from lightray.config import REPO_ROOT, load_preset
from lightray.contracts import DenoiseParams
from lightray.models.qwen_image_edit.conditioning import text_pipeline
from lightray.world.shapes import Scene, render

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRESET_FILE = REPO_ROOT / "configs/models/qwen-image-edit-2511-lightning.yaml"
LIGHTNING, BASE = "qwen-image-edit-2511-lightning-4", "qwen-image-edit-2511"
CONDITION_AREA, VAE_AREA = 96 * 96, 128 * 128


@pytest.fixture(scope="module")
def mini_edit(tmp_path_factory) -> dict:
    root = build_mini_real_edit(tmp_path_factory.mktemp("mini-edit") / "Qwen-Image-Edit-2511")
    lora = root.parent / "lightning" / "Qwen-Image-Edit-2511-Lightning-4steps.safetensors"
    write_lightning_lora(lora, seed=5)
    raw = yaml.safe_load(PRESET_FILE.read_text())
    raw.update(path=str(root), device="cpu", vae_exact=True,
               edit={"condition_image_area": CONDITION_AREA, "vae_image_area": VAE_AREA},
               prompt_template_encode_start_idx=None)
    raw["variants"][0]["lightning_lora"] = str(lora)
    return {"root": root, "lora": lora, "preset": load_preset(raw)}


@pytest.fixture(scope="module")
def stages(mini_edit):
    from lightray.engine import DenoiseEngine
    from lightray.stages import TextEncodeStage, VaeStage

    preset = mini_edit["preset"]
    return TextEncodeStage(preset), DenoiseEngine(preset), VaeStage(preset)


@pytest.fixture(scope="module")
def reference(mini_edit, stages):
    """diffusers' QwenImageEditPlusPipeline on the same folder, bfloat16, the Lightning file loaded by
    `load_lora_weights` and ModelTC's scheduler config."""
    root = mini_edit["root"]
    text = text_pipeline(root, torch.bfloat16)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae", torch_dtype=torch.bfloat16),
        text_encoder=text.text_encoder, tokenizer=text.tokenizer, processor=text.processor,
        transformer=type(stages[1].transformer).from_pretrained(root / "transformer", torch_dtype=torch.bfloat16))
    pipe.prompt_template_encode_start_idx = text.prompt_template_encode_start_idx
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(mini_edit["lora"]), adapter_name="lightning")
    pipe.folder = root
    return pipe


def sources(count: int) -> list[Image.Image]:
    """Input images of different sizes and aspect ratios (so each gets its own condition grid)."""
    scenes = [Scene("red", "circle", "left", "white"), Scene("blue", "square", "top", "gray"),
              Scene("green", "triangle", "center", "black")]
    sizes = [(128, 96), (96, 96), (112, 160)]
    return [render(s, size) for s, size in zip(scenes[:count], sizes[:count])]


def served_latents(stages, preset, images, prompt, variant, steps, cfg, seed, width=128, height=128):
    text_stage, engine, vae = stages
    negative = preset.variant(variant).negative_prompt
    text = text_stage.encode_instruction([prompt, negative] if cfg > 1 else [prompt], images, width, height)
    params = DenoiseParams(seeds=(seed,), width=width, height=height, num_inference_steps=steps,
                           true_cfg_scale=cfg, variant=variant)
    return params, text, vae.encode_conditions(images, width, height)


def reference_latents(reference, monkeypatch, images, prompt, steps, cfg, seed, lightning, width=128, height=128):
    """`QwenImageEditPlusPipeline.__call__`'s latents, with the preset's input-image areas."""
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", CONDITION_AREA)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)
    if lightning:
        reference.enable_lora()
        reference.set_adapters(["lightning"], [1.0])
        reference.scheduler = FlowMatchEulerDiscreteScheduler.from_config(MODELTC_LIGHTNING_SCHEDULER)
    else:
        reference.disable_lora()
        reference.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(reference.folder / "scheduler")
    return reference(image=images, prompt=prompt, negative_prompt=" " if cfg > 1 else None, true_cfg_scale=cfg,
                     height=height, width=width, num_inference_steps=steps,
                     generator=[torch.Generator().manual_seed(seed)], output_type="latent").images


CASES = [
    # images, variant, steps, true CFG, seed, prompt
    (1, LIGHTNING, 4, 1.0, 3, "make the circle blue"),
    (1, BASE, 3, 4.0, 4, "把圆形变成蓝色"),
    (2, BASE, 3, 1.0, 5, "put the square from picture 2 beside the circle"),
    (2, LIGHTNING, 4, 1.0, 6, "make the background black"),
    (3, BASE, 2, 4.0, 7, "move the triangle to the left"),
    (3, LIGHTNING, 4, 1.0, 8, "combine the three pictures"),
]


@pytest.mark.parametrize("count, variant, steps, cfg, seed, prompt", CASES)
def test_an_edit_alone_equals_the_pipeline_bit_for_bit(stages, mini_edit, reference, monkeypatch, count, variant,
                                                         steps, cfg, seed, prompt):
    images = sources(count)
    params, text, condition = served_latents(stages, mini_edit["preset"], images, prompt, variant, steps, cfg, seed)
    assert len(condition.grids) == count
    ours = stages[1].denoise(params, text, condition=condition)
    theirs = reference_latents(reference, monkeypatch, images, prompt, steps, cfg, seed, variant == LIGHTNING)
    assert ours.shape == tuple(theirs.shape) == (1, 64, 64)
    assert np.array_equal(ours, theirs.float().numpy()), f"differ by up to {np.abs(ours - theirs.float().numpy()).max()}"


def test_edits_batched_together_equal_each_alone(stages, mini_edit):
    """Edits of one signature (output grid and condition grids) share forwards across variants, CFG and n; each
    result equals the request alone."""
    preset = mini_edit["preset"]
    engine = stages[1]
    images = sources(2)
    requests = []
    for prompt, variant, steps, cfg, seeds in [("make the circle blue", LIGHTNING, 4, 1.0, (1,)),
                                                ("把背景变成黑色", BASE, 3, 4.0, (2,)),
                                                ("move the square to the top", LIGHTNING, 4, 1.0, (3, 4))]:
        params, text, condition = served_latents(stages, preset, images, prompt, variant, steps, cfg, seeds[0])
        requests.append((DenoiseParams(**{**params.__dict__, "seeds": seeds}), text, condition))
    alone = [engine.denoise(p, t, condition=c) for p, t, c in requests]
    submitted = [engine.submit(p, t, condition=c) for p, t, c in requests]
    first_rows = sum(r.rows for r in engine._inbox)
    forwards = []
    engine.on_step = forwards.append
    try:
        while not all(r.done() for r in submitted):
            engine.step()
    finally:
        engine.on_step = None
    assert first_rows == 1 + 2 + 2 and forwards[0].rows == 5 and forwards[0].condition_tokens > 0
    for request, expected in zip(submitted, alone):
        assert np.array_equal(request.result(), expected), np.abs(request.result() - expected).max()


def test_edit_requests_of_other_signatures_do_not_share_a_forward(stages, mini_edit):
    preset = mini_edit["preset"]
    engine = stages[1]
    one = served_latents(stages, preset, sources(1), "make it red", LIGHTNING, 4, 1.0, 1)
    two = served_latents(stages, preset, sources(2), "make it red", LIGHTNING, 4, 1.0, 1)
    submitted = [engine.submit(p, t, condition=c) for p, t, c in (one, two)]
    forwards = []
    engine.on_step = forwards.append
    try:
        engine.step()
    finally:
        engine.on_step = None
    assert [f.rows for f in forwards] == [1, 1] and forwards[0].condition_tokens != forwards[1].condition_tokens
    while not all(r.done() for r in submitted):
        engine.step()


def test_the_engine_refuses_what_the_family_does_not_take(stages, mini_edit):
    preset = mini_edit["preset"]
    engine = stages[1]
    params, text, condition = served_latents(stages, preset, sources(1), "make it red", LIGHTNING, 4, 1.0, 1)
    with pytest.raises(ValueError, match="^image: .* none were given"):
        engine.submit(params, text)
    with pytest.raises(ValueError, match="^image: 1 to 3 input images, got 4"):
        from lightray.contracts import ConditionLatents

        four = ConditionLatents(np.concatenate([condition.latents] * 4), condition.grids * 4)
        engine.submit(params, text, condition=four)


def test_stacked_tenant_adapters_on_edit_rows_batch_like_text_to_image(stages, mini_edit, tmp_path):
    """Tenant LoRAs (two, stacked, at their own scales) on edit rows beside rows with one or none: each result
    equals the request alone, and the adapters change the result."""
    from lightray.contracts import AdapterUse

    preset = mini_edit["preset"]
    engine = stages[1]
    paths = {}
    for ref, seed in (("acme/a@v1", 11), ("acme/b@v1", 12)):
        paths[ref] = str(tmp_path / f"{seed}.safetensors")
        write_lightning_lora(Path(paths[ref]), seed=seed)
    images = sources(1)
    stacks = [(AdapterUse("acme/a@v1", 0.8), AdapterUse("acme/b@v1", 1.0)), (AdapterUse("acme/b@v1", 0.5),), ()]
    requests = []
    for i, stack in enumerate(stacks):
        params, text, condition = served_latents(stages, preset, images, "make it blue", LIGHTNING, 4, 1.0, 21)
        requests.append((DenoiseParams(**{**params.__dict__, "adapters": stack}), text, condition))
    alone = [engine.denoise(p, t, condition=c, adapter_paths=paths) for p, t, c in requests]
    submitted = [engine.submit(p, t, condition=c, adapter_paths=paths) for p, t, c in requests]
    while not all(r.done() for r in submitted):
        engine.step()
    for request, expected in zip(submitted, alone):
        assert np.array_equal(request.result(), expected)
    assert not np.array_equal(alone[0], alone[2]) and not np.array_equal(alone[1], alone[2])


def test_a_paused_edit_resumes_to_the_same_result(stages, mini_edit, monkeypatch):
    """With room for one row a step, an interactive edit pauses a started batch edit; the paused one resumes, and
    both equal their requests alone."""
    preset = mini_edit["preset"]
    engine = stages[1]
    monkeypatch.setattr(engine.scheduler.config, "max_batch_rows", 1)
    requests = []
    for prompt, priority, seed in [("make it blue", "batch", 31), ("make it green", "interactive", 32)]:
        params, text, condition = served_latents(stages, preset, sources(1), prompt, LIGHTNING, 4, 1.0, seed)
        requests.append((DenoiseParams(**{**params.__dict__, "priority": priority}), text, condition))
    alone = [engine.denoise(p, t, condition=c) for p, t, c in requests]
    slow = engine.submit(*requests[0][:2], condition=requests[0][2])
    engine.step()  # the batch edit starts
    fast = engine.submit(*requests[1][:2], condition=requests[1][2])
    while not (slow.done() and fast.done()):
        engine.step()
    assert slow.paused_steps >= 4 and fast.paused_steps == 0
    assert np.array_equal(slow.result(), alone[0]) and np.array_equal(fast.result(), alone[1])
