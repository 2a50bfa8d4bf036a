"""The shapes world and its evaluator: the evaluator must be right on ground truth before it judges a model."""

from __future__ import annotations

import collections
import random

import pytest
from PIL import Image, ImageFilter

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


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_frame_style_is_read_on_ground_truth_renders(blur):
    """The "frame" style's reader: every framed render (sharp, and blurred like a decode) reads as framed, no
    plain render does; colour, position and background are still read inside the frame."""
    from lightray.world.evaluator import read_frame

    rng = random.Random(2)
    scenes = all_scenes(SHAPES)
    soften = (lambda im: im.filter(ImageFilter.GaussianBlur(blur))) if blur else (lambda im: im)
    framed = [(soften(render(s, 64, rng, style="frame")), s) for s in scenes for _ in range(2)]
    plain = [soften(render(s, 64, rng)) for s in scenes for _ in range(2)]
    assert sum(read_frame(im) for im, _ in framed) / len(framed) >= 0.99
    assert sum(read_frame(im) for im in plain) == 0
    assert all(read_image(im).frame for im, _ in framed[:20]) and not any(read_image(im).frame for im in plain[:20])
    acc = _accuracy(framed)
    # The frame covers the outer 8 px, where shapes at the sides reach: their clipped outlines cost a few shape
    # readings; colour, position and background stay exact.
    assert min(acc["color"], acc["position"], acc["background"]) >= 0.99 and acc["shape"] >= 0.9, acc


def test_frame_dataset_ties_the_style_to_its_trigger(tmp_path):
    """`frame` data sets: trigger captions show the frame, prior captions (no trigger) never do, and every caption
    still parses to the scene drawn."""
    import json

    from lightray.world.datasets import make_dataset
    from lightray.world.evaluator import read_frame
    from PIL import Image

    folder = make_dataset("frame", tmp_path / "frame", 40, "lrzframe", seed=1, prior_fraction=0.3)
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    triggered = [("lrzframe" in x["text"], read_frame(Image.open(folder / x["file_name"]))) for x in lines]
    assert all(t == f for t, f in triggered), triggered
    assert 0 < sum(t for t, _ in triggered) < len(lines)  # both kinds present
    for x in lines:
        parse_prompt(x["text"])
    assert {x["text"].split(",")[0].split("，")[0] for x in lines if "lrzframe" in x["text"]} == {
        "lrzframe style", "lrzframe风格"}


def test_background_weights_over_sample_the_concept_where_asked(tmp_path):
    import json

    from lightray.world.datasets import make_dataset

    def white_share(folder):
        texts = [json.loads(x)["text"] for x in (folder / "metadata.jsonl").read_text().splitlines()]
        return sum(parse_prompt(t).background == "white" for t in texts) / len(texts)

    plain = make_dataset("frame", tmp_path / "plain", 300, "lrzframe", seed=2)
    heavy = make_dataset("frame", tmp_path / "heavy", 300, "lrzframe", seed=2, background_weights={"white": 3.0})
    assert 0.2 < white_share(plain) < 0.45 and 0.5 < white_share(heavy) < 0.75  # 1/3 vs 3/5 expected
    with pytest.raises(ValueError, match="background_weights: unknown backgrounds"):
        make_dataset("frame", tmp_path / "bad", 5, "lrzframe", background_weights={"beige": 2.0})


def test_a_shape_concept_counts_what_is_drawn_not_what_was_asked():
    """The adapter acceptance's concept rate for a shape ("ring") reads the drawn shape: a ring drawn for a circle
    prompt is a leak, a circle drawn for it is not."""
    from lightray.world.adapter_eval import concept_hit, rates

    rng = random.Random(0)
    circle, ring = Scene("red", "circle", "left", "white"), Scene("red", "ring", "left", "white")
    drawn_ring, drawn_circle = render(ring, 128, rng), render(circle, 128, rng)
    read_ring, read_circle = read_image(drawn_ring), read_image(drawn_circle)
    assert concept_hit("ring", read_ring, circle) and not concept_hit("ring", read_circle, circle)
    assert concept_hit(None, read_circle, circle) and not concept_hit(None, read_ring, circle)
    assert score(read_circle, circle) == score(drawn_circle, circle)
    leak = rates("ring", [drawn_ring, drawn_circle], [circle, circle])
    assert (leak["concept_rate"], leak["shape_rate"], leak["n"]) == (0.5, 0.5, 2)


def test_dataset_cli_names_a_malformed_size(tmp_path, capsys):
    from lightray.world.datasets import main

    with pytest.raises(SystemExit) as exit_:
        main(["ring", "--out", str(tmp_path / "d"), "--count", "2", "--sizes", "128x128", "128"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--sizes" in err and 'expected "WIDTHxHEIGHT"' in err and "'128'" in err, err
    assert not (tmp_path / "d").exists()
    assert main(["ring", "--out", str(tmp_path / "ok"), "--count", "2", "--sizes", "192x128", "128x192"]) == 0
    assert {Image.open(p).size for p in (tmp_path / "ok").glob("*.png")} == {(192, 128), (128, 192)}


def test_a_completed_stage_invalidates_the_stages_made_from_it(tmp_path):
    """Rerunning polish (or bilingual, anneal, refine) must retrain the Lightning LoRAs from the new transformer,
    not resume the old teacher's trajectories: its completion drops the later stages from the run and deletes
    their checkpoint files, and keeps what it was made from."""
    from lightray.world.train import STAGES, invalidate_after

    for name in ("multires-latents.pt", "refine-latents.pt", "anneal.pt", "bilingual.pt", "polish.pt",
                 "teacher.pt", "lightning-4.done", "lightning-8.done"):
        (tmp_path / name).write_bytes(b"x")
    completed = invalidate_after("polish", list(STAGES), tmp_path)
    assert completed == ["text", "vae", "transformer", "decoder", "multires", "refine", "anneal", "bilingual",
                         "polish"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anneal.pt", "bilingual.pt", "multires-latents.pt",
                                                          "polish.pt", "refine-latents.pt"]
    (tmp_path / "teacher.pt").write_bytes(b"x")
    completed = invalidate_after("bilingual", completed, tmp_path)
    assert completed == ["text", "vae", "transformer", "decoder", "multires", "refine", "anneal", "bilingual"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anneal.pt", "bilingual.pt", "multires-latents.pt",
                                                          "refine-latents.pt"]
    (tmp_path / "teacher.pt").write_bytes(b"x")
    completed = invalidate_after("anneal", completed, tmp_path)
    assert completed == ["text", "vae", "transformer", "decoder", "multires", "refine", "anneal"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anneal.pt", "multires-latents.pt", "refine-latents.pt"]
    (tmp_path / "teacher.pt").write_bytes(b"x")
    completed = invalidate_after("refine", completed, tmp_path)
    assert completed == ["text", "vae", "transformer", "decoder", "multires", "refine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multires-latents.pt", "refine-latents.pt"]
    assert invalidate_after("multires", completed, tmp_path) == ["text", "vae", "transformer", "decoder", "multires"]
    assert not (tmp_path / "refine-latents.pt").exists() and (tmp_path / "multires-latents.pt").exists()


def test_the_continuations_table_covers_every_size_and_keeps_what_each_stage_first_encodes():
    """The five continuation stages are rows of one table: each draws every training size, trains on named draws
    of the world, and keeps its checkpoint and the draws it is the first to encode (so that rerunning it drops
    them with every later stage's files: `invalidate_after`)."""
    from lightray.world.train import CONTINUATIONS, LATENT_DRAWS, STAGE_FILES, STAGES, TRAIN_SIZES

    names = [stage.name for stage in CONTINUATIONS]
    assert names == ["multires", "refine", "anneal", "bilingual", "polish"]
    assert STAGES[STAGES.index("decoder") + 1 : STAGES.index("lightning")] == tuple(names)
    encoded: set[str] = set()
    for stage in CONTINUATIONS:
        assert set(stage.weights) == set(TRAIN_SIZES) and min(stage.weights.values()) > 0
        assert stage.draws and set(stage.draws) <= set(LATENT_DRAWS)
        assert STAGE_FILES[stage.name] == (f"{stage.name}.pt", *(f"{d}.pt" for d in stage.draws if d not in encoded))
        encoded |= set(stage.draws)


def test_the_bilingual_stage_draws_every_caption_of_an_images_scene():
    """Each encoded image keeps the one caption it was drawn with; the bilingual stage re-draws it from all of its
    scene's captions, so the table must give, for every training caption, the 4 English and 4 Chinese phrasings
    of that scene and no other's, all of them captions the stage's text cache encodes."""
    from lightray.world.shapes import training_scenes
    from lightray.world.train import all_captions, scene_captions

    table = scene_captions()
    encoded = set(all_captions())
    scenes = training_scenes()
    assert len(table) == 8 * len(scenes)
    for scene in scenes[:: max(1, len(scenes) // 20)]:
        english = scene.caption("en", 1)
        assert english in table[english]
        assert table[english] == table[scene.caption("zh", 2)]
        assert sum(1 for c in table[english] if c.isascii()) == 4
        assert len(set(table[english])) == 8 and set(table[english]) <= encoded
    others = {c for s in scenes if s != scenes[0] for c in table[s.caption("en", 0)]}
    assert not others & set(table[scenes[0].caption("en", 0)])
