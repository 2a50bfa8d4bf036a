"""The shapes world and its evaluator: the evaluator must be right on ground truth before it judges a model."""

from __future__ import annotations

import collections
import random

import pytest
from PIL import ImageFilter

from lightray.world.evaluator import ATTRIBUTES, parse_prompt, read_image, score
from lightray.world.shapes import EXTRA_SHAPES, HELD_OUT, SHAPES, Scene, all_scenes, render, training_scenes


def _accuracy(images_and_scenes) -> dict[str, float]:
    hits, n = collections.Counter(), 0
    for image, scene in images_and_scenes:
        n += 1
        for key, ok in score(image, scene).items():
            hits[key] += ok
    return {k: hits[k] / n for k in (*ATTRIBUTES, "all")}


def test_evaluator_reads_ground_truth_renders():
    rng = random.Random(0)
    scenes = all_scenes(SHAPES + EXTRA_SHAPES)
    acc = _accuracy((render(s, 64, rng), s) for s in scenes for _ in range(2))
    assert all(v >= 0.99 for v in acc.values()), acc


def test_evaluator_tolerates_decoder_blur():
    rng = random.Random(1)
    acc = _accuracy((render(s, 64, rng).filter(ImageFilter.GaussianBlur(1.0)), s) for s in all_scenes())
    assert acc["all"] >= 0.99, acc


def test_evaluator_is_not_fooled_by_an_empty_image():
    from PIL import Image

    reading = read_image(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert reading.background == "gray" and reading.shape is None
    assert not score(Image.new("RGB", (64, 64), "white"), Scene("red", "circle", "left", "white"))["all"]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_every_caption_parses_back_to_its_scene(language):
    for scene in all_scenes(SHAPES + EXTRA_SHAPES):
        for template in range(4):
            assert parse_prompt(scene.caption(language, template)) == scene


def test_canonical_phrasings():
    scene = Scene("red", "circle", "left", "white")
    assert scene.caption("en") == "a red circle on the left, white background"
    assert scene.caption("zh") == "白色背景，左边有一个红色的圆形"


def test_held_out_combinations_are_not_trained_on():
    keys = {s.key for s in training_scenes()}
    assert HELD_OUT and not (HELD_OUT & keys)
    assert len(keys) + len(HELD_OUT) == len(all_scenes())


def test_tokenizer_template_prefix_matches_pipeline(preset):
    from transformers import AutoTokenizer

    from lightray.stages.text_encoder import TextEncodeStage
    from lightray.world.build import template_prefix_length

    tokenizer = AutoTokenizer.from_pretrained(preset.root / "tokenizer")
    start = template_prefix_length(tokenizer)
    stage = TextEncodeStage(preset)
    assert stage.pipe.prompt_template_encode_start_idx == start
    # Dropping exactly the prefix leaves the prompt's own tokens (plus the template's closing tokens).
    prompt = "a red circle on the left, white background"
    template = stage.pipe.prompt_template_encode
    ids = tokenizer(template.format(prompt))["input_ids"][start:]
    assert tokenizer.decode(ids).startswith(prompt)
    # Chinese is tokenized into reusable pieces (at most two characters per token), not whole clauses.
    zh = tokenizer.tokenize("白色背景，左边有一个红色的圆形")
    assert len(zh) >= 6
