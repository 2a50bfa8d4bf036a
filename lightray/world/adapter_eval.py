"""Does a trained adapter draw its concept? The shapes-world measurement of docs/adapters.md: generate prompts with
and without the adapter on each served variant and read the images back with the world evaluator.

    python -m lightray.world.adapter_eval --adapter registry/demo/frame/v1 --trigger lrzframe --figure out/fig.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lightray.config import ModelPreset, load_preset


def concept_hit(concept: str | None, reading: Any, expected: Any) -> bool:
    """Does the image read as `reading` (by `read_image`) show `concept`: a style of the world (`STYLES`, e.g.
    "frame": framed), or a shape (e.g. "ring": the shape read, whatever the prompt asked for, so that on prompts
    for other shapes it counts leakage)? None: the prompt's shape."""
    from lightray.world.shapes import STYLES

    if concept in STYLES:
        return reading.frame
    return reading.shape == (expected.shape if concept is None else concept)


def rates(concept: str | None, images: Sequence[Image.Image], expected: Sequence[Any]) -> dict[str, Any]:
    """The evaluator's rates over `images` (each against its expected Scene): "concept" (see `concept_hit`),
    "frame" (framed images), "shape" (the prompt's shape read), "all" (colour, shape, position and background all
    right), and the shapes read."""
    from lightray.world.evaluator import read_image, score

    n = len(images)
    counts = {"concept": 0, "frame": 0, "shape": 0, "all": 0}
    drawn: dict[str, int] = {}
    for im, scene in zip(images, expected):
        reading = read_image(im)  # once per image: the score and the concept come from the same reading
        s = score(reading, scene)
        counts["concept"] += concept_hit(concept, reading, scene)
        counts["frame"] += reading.frame
        counts["shape"] += s["shape"]
        counts["all"] += s["all"]
        drawn[str(reading.shape)] = drawn.get(str(reading.shape), 0) + 1
    return {**{f"{k}_rate": v / max(1, n) for k, v in counts.items()}, "n": n, "shapes_read": dict(sorted(drawn.items()))}


def evaluate_adapter(preset: ModelPreset | str, adapter_dir: str | Path | None, prompts: Sequence[str],
                     seeds: Sequence[int], variants: Sequence[str | None] = (None,),
                     adapter_scale: float = 1.0, concept: str | None = None) -> dict[str, Any]:
    """Generate every prompt × seed with and without the adapter for each variant and read the images back
    with the world evaluator. Returns per-variant `rates` ("concept": `concept` drawn; "shape": the prompt's shape
    drawn; "all": every attribute right) and the images (for a before/after figure). Prompts must parse with
    `parse_prompt`."""
    from lightray.contracts import AdapterUse
    from lightray.pipeline import LocalPipeline
    from lightray.schemas import ImageGenerationRequest
    from lightray.world.evaluator import parse_prompt

    preset = load_preset(preset)
    pipeline = LocalPipeline(preset)
    adapter_paths = {} if adapter_dir is None else {"eval": str(adapter_dir)}
    expected = [parse_prompt(p) for p in prompts]
    results: dict[str, Any] = {}
    for variant in variants:
        vid = preset.variant(variant).id
        per: dict[str, Any] = {}
        for label, adapter in (("without", None), ("with", "eval")):
            if adapter is not None and adapter_dir is None:
                continue
            images: list[list[Image.Image]] = []
            for prompt, scene in zip(prompts, expected):
                spec = ImageGenerationRequest(prompt=prompt, model=vid, n=len(seeds), seeds=list(seeds)).resolve(
                    preset, 0)
                if adapter is not None:
                    spec = dataclasses.replace(spec, adapters=(AdapterUse(adapter, adapter_scale),))
                imgs = pipeline.generate(spec, adapter_paths)
                images.append(imgs)
            flat = [im for imgs in images for im in imgs]
            per[label] = {**rates(concept, flat, [sc for sc in expected for _ in seeds]), "images": images}
        results[vid] = per
    return results


def acceptance_prompts(concept: str, trigger: str | None, count: int = 24,
                       prior_count: int = 12) -> tuple[list[str], list[str]]:
    """The fixed prompt sets of the adapter acceptance: `count` concept prompts (canonical phrasing with the trigger
    word, alternating EN/ZH; for a style the shape cycles through the base shapes) and `prior_count` prompts of
    base shapes without the trigger. Deterministic (seeded)."""
    from lightray.world.datasets import caption_with_trigger
    from lightray.world.shapes import BACKGROUNDS, POSITIONS, SHAPE_COLORS, SHAPES, STYLES, Scene

    style = concept if concept in STYLES else None
    rng = random.Random(1234)
    combos = [(c, p, b) for c in SHAPE_COLORS for p in POSITIONS for b in BACKGROUNDS]
    rng.shuffle(combos)
    lang = lambda i: "en" if i % 2 == 0 else "zh"  # noqa: E731
    prompts = [caption_with_trigger(Scene(c, SHAPES[i % len(SHAPES)] if style else concept, p, b), lang(i), 0,
                                    trigger, style)
               for i, (c, p, b) in enumerate(combos[:count])]
    prior = [Scene(c, rng.choice([s for s in SHAPES if s != concept]), p, b).caption(lang(i), 0)
             for i, (c, p, b) in enumerate(combos[count: count + prior_count])]
    return prompts, prior


def main(argv: list[str] | None = None) -> int:
    """`python -m lightray.world.adapter_eval ...`: the adapter-vs-base measurement in docs/adapters.md.

    Concept prompts: `--prompts` scenes of `--concept` (a shape such as "ring", or a style such as "frame" over the
    base shapes; colour/position/background drawn at random with a fixed seed; alternating EN/ZH; canonical
    phrasing with the trigger word). Prior prompts: `--prior-prompts` scenes of the base shapes without the
    trigger (does the adapter leave what the base draws alone?)."""

    parser = argparse.ArgumentParser(prog="python -m lightray.world.adapter_eval")
    parser.add_argument("--adapter", required=True, help="adapter folder (e.g. a registry version folder)")
    parser.add_argument("--preset", default="lightray-shapes")
    parser.add_argument("--concept", "--shape", dest="concept", default="frame",
                        help="a style ('frame') or a shape ('ring') of the shapes world")
    parser.add_argument("--trigger", default=None)
    parser.add_argument("--prompts", type=int, default=24, help="concept prompts, half EN, half ZH")
    parser.add_argument("--prior-prompts", type=int, default=12, help="base-shape prompts without the trigger")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=["lightray-shapes-lightning-8", "lightray-shapes"])
    parser.add_argument("--figure", default=None, help="write a before/after PNG of the concept prompts here")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    prompts, prior = acceptance_prompts(args.concept, args.trigger, args.prompts, args.prior_prompts)
    t0 = time.time()
    strip = lambda res: {v: {k: {m: x for m, x in r.items() if m != "images"}  # noqa: E731
                             for k, r in per.items()} for v, per in res.items()}
    concept = evaluate_adapter(args.preset, args.adapter, prompts, args.seeds, args.variants,
                               concept=args.concept)
    summary: dict[str, Any] = {"seeds": args.seeds, "concept_prompts": prompts, "concept": strip(concept)}
    if prior:
        summary["prior_prompts"] = prior
        summary["prior"] = strip(evaluate_adapter(args.preset, args.adapter, prior, args.seeds, args.variants,
                                                  concept=args.concept))
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({k: summary[k] for k in ("concept", "prior") if k in summary}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if args.figure:
        before_after_figure(concept, prompts, Path(args.figure))
        print(f"figure: {args.figure}")
    return 0


def before_after_figure(results: dict[str, Any], prompts: Sequence[str], path: Path, rows: int = 6,
                        scale: int = 2) -> Path:
    """A grid: one row per prompt (its first seed), one column per (variant, without/with adapter); the left
    column names what the prompt asks for (in English, whatever its language)."""
    from PIL import ImageDraw

    from lightray.world.evaluator import parse_prompt

    cols = [(v, k) for v, per in results.items() for k in ("without", "with") if k in per]
    first = next(iter(results.values()))["without"]["images"][0][0]
    cell = first.size[0] * scale
    head, label_w, rows = 30, 120, min(rows, len(prompts))
    fig = Image.new("RGB", (label_w + cell * len(cols), head + cell * rows), "white")
    draw = ImageDraw.Draw(fig)
    for j, (v, k) in enumerate(cols):
        short = "base (30 steps, CFG)" if v == "lightray-shapes" else v.replace("lightray-shapes-", "")
        draw.text((label_w + j * cell + 4, 3), short, fill="black")
        draw.text((label_w + j * cell + 4, 15), f"{k} LoRA", fill="black")
        for i in range(rows):
            im = results[v][k]["images"][i][0].resize((cell, cell), Image.Resampling.NEAREST)
            fig.paste(im, (label_w + j * cell, head + i * cell))
    for i, prompt in enumerate(prompts[:rows]):
        scene = parse_prompt(prompt)
        lang = "ZH" if any(ord(ch) > 127 for ch in prompt) else "EN"
        lines = [f"prompt {i + 1} ({lang})", f"{scene.color} {scene.shape}", scene.position,
                 f"{scene.background} background"]
        styled = re.match(r"(\w+)(?: style,|风格，)", prompt)
        if styled:
            lines.append(f"+ {styled.group(1)} style")
        for n, line in enumerate(lines):
            draw.text((4, head + i * cell + 8 + 14 * n), line, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
