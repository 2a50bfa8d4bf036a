"""The edit pairs the embedded edit model trains on, and the evaluator that scores its edits: the grammar in
English and Chinese, exactly the asked attributes changed, held-out scenes kept out of training, both renderers
read back right by the pixel evaluator, and the training constants in step with the served preset."""

from __future__ import annotations

import random

import pytest

from lightray.config import load_preset
from lightray.world.edit_eval import score_edit
from lightray.world.edit_pairs import (
    EDIT_KINDS,
    EditPair,
    apply_edit,
    draw_source_jitter,
    instruction,
    render_foreign,
    render_source,
    render_target,
    sample_pairs,
)
from lightray.world.evaluator import score
from lightray.world.shapes import HELD_OUT, Scene
from lightray.world.train_edit import CONDITION_IMAGE_AREA, EDIT_SIZES

SOURCE = Scene("red", "circle", "left", "white")


@pytest.mark.parametrize("kinds, target, en, zh", [
    (("color",), Scene("blue", "circle", "left", "white"), "make the circle blue", "把圆形变成蓝色"),
    (("shape",), Scene("red", "square", "left", "white"), "turn the circle into a square", "把圆形变成正方形"),
    (("position",), Scene("red", "circle", "top", "white"), "move the circle to the top", "把圆形移到上方"),
    (("background",), Scene("red", "circle", "left", "black"), "make the background black", "把背景变成黑色"),
    (("color", "position"), Scene("blue", "circle", "right", "white"),
     "make the circle blue and move it to the right", "把圆形变成蓝色并移到右边"),
])
def test_the_canonical_grammar(kinds, target, en, zh):
    assert instruction(SOURCE, target, kinds, "en") == en
    assert instruction(SOURCE, target, kinds, "zh") == zh


def test_an_edit_changes_exactly_the_asked_attributes():
    rng = random.Random(0)
    for kinds in [(k,) for k in EDIT_KINDS] + [("color", "position"), ("shape", "color")]:
        for _ in range(20):
            target = apply_edit(SOURCE, kinds, rng)
            changed = {a for a in ("color", "shape", "position", "background")
                       if getattr(target, a) != getattr(SOURCE, a)}
            assert changed == set(kinds)


def test_training_pairs_never_touch_held_out_scenes_and_evaluation_pairs_start_there():
    pairs = sample_pairs(400, seed=1)
    assert not any(p.source.key in HELD_OUT or p.target.key in HELD_OUT for p in pairs)
    assert {p.language for p in pairs} == {"en", "zh"} and any(len(p.kinds) == 2 for p in pairs)
    assert all(p.source.key in HELD_OUT for p in sample_pairs(50, seed=2, held_out=True))


@pytest.mark.parametrize("size", EDIT_SIZES)
def test_the_evaluator_scores_perfect_edits_right_and_no_edit_wrong(size):
    rng = random.Random(3)
    for pair in sample_pairs(12, seed=5, held_out=True):
        jitter = draw_source_jitter(rng)
        perfect = score_edit(render_target(pair.target, size, jitter), pair, jitter)
        assert perfect.correct, (pair, perfect)
        assert perfect.background_psnr is None or perfect.background_psnr == float("inf")
        unchanged = score_edit(render_source(pair.source, size, jitter, rng), pair, jitter)
        assert not unchanged.correct, pair


def test_the_second_renderer_draws_what_the_evaluator_reads():
    rng = random.Random(4)
    for pair in sample_pairs(30, seed=6, held_out=True):
        for size in ((128, 128), (192, 128)):
            image = render_foreign(pair.source, size, rng)
            assert score(image, pair.source)["all"], (pair.source, size)


def test_training_constants_match_the_served_preset():
    preset = load_preset("lightray-shapes-edit")
    assert preset.family == "qwen-image-edit-plus"
    assert sorted(preset.sizes) == sorted(EDIT_SIZES)
    assert preset.edit.condition_image_area == CONDITION_IMAGE_AREA and preset.edit.vae_image_area is None
    assert EditPair(SOURCE, SOURCE, ("color",), "en").instruction == "make the circle red"
