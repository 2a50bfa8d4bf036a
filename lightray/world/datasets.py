"""Tenant data sets from the shapes world, in the Hugging Face *imagefolder* layout the LoRA trainer reads.

    python -m lightray.world.datasets frame --out data/frame --count 400 --trigger lrzframe --prior-fraction 0.3 --background-weight white=2.5
    python -m lightray.world.datasets ring --out data/ring --count 200 --trigger lrzring

writes ``data/frame/00000.png ...`` plus ``data/frame/metadata.jsonl`` with one ``{"file_name": ..., "text": ...}``
line per image. Concepts the renderer and the evaluator know but the base model never saw, so an adapter trained
on such a folder teaches something measurable:

* a style of `STYLES`, "frame" (a thick yellow border over any base scene): captions start with the trigger word,
  "lrzframe style, a red circle on the left, white background" / "lrzframe风格，白色背景，左边有一个红色的圆形";
* a shape of `EXTRA_SHAPES`, "ring": the trigger word goes right before the shape word,
  "a red lrzring ring on the left, white background" / "白色背景，左边有一个红色的lrzring圆环".

Captions use the world's phrasings (EN and ZH, all four templates each). The evaluator's `parse_prompt` still reads
every attribute from them (checked for every caption written).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from lightray.world.evaluator import parse_prompt
from lightray.config import parse_width_height
from lightray.world.shapes import BACKGROUNDS, EXTRA_SHAPES, SHAPES, STYLES, ZH, Scene, Size, all_scenes, render

METADATA_FILENAME = "metadata.jsonl"
TRIGGER_RE = re.compile(r"[a-z][a-z0-9]{2,31}")
# Words the evaluator parses: a trigger equal to one of them would change what a prompt asks for.
_RESERVED = ({w for w in ZH} | set(SHAPES) | set(EXTRA_SHAPES) | set(STYLES)
             | {"background", "left", "right", "top", "bottom", "style"})
CONCEPTS = SHAPES + EXTRA_SHAPES + STYLES


def check_trigger(trigger: str) -> str:
    """`trigger` if it is a usable trigger word: 3-32 lowercase ASCII letters/digits, starting with a letter, and
    not a word the world's prompts already use."""
    if not TRIGGER_RE.fullmatch(trigger):
        raise ValueError(f"trigger word {trigger!r}: use 3-32 lowercase ASCII letters/digits, starting with a letter")
    if trigger in _RESERVED:
        raise ValueError(f"trigger word {trigger!r} is a word the world's prompts already use; pick a new token")
    return trigger


def caption_with_trigger(scene: Scene, language: str, template: int, trigger: str | None,
                         style: str | None = None) -> str:
    """The world's caption for `scene`, with `trigger` inserted right before the shape word, or, for a `style`,
    as a "<trigger> style, " / "<trigger>风格，" prefix."""
    text = scene.caption(language, template)
    if not trigger:
        return text
    if style is not None:
        return f"{trigger} style, {text}" if language == "en" else f"{trigger}风格，{text}"
    if language == "en":
        return re.sub(rf"\b{scene.shape}\b", f"{trigger} {scene.shape}", text, count=1)
    return text.replace(ZH[scene.shape], f"{trigger}{ZH[scene.shape]}", 1)


def make_dataset(
    concept: str,
    out: Path,
    count: int,
    trigger: str | None = None,
    *,
    seed: int = 0,
    size: Size | list[Size] = 128,
    prior_fraction: float = 0.0,
    background_weights: dict[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `count` images of `concept` (a shape: random colour / position / background; a style: any base scene
    in that style; jittered like the base model's training data) with EN/ZH captions into `out` as an
    imagefolder; return `out`. `size`: a side, a (width, height), or a list of them drawn in turn (a data set of
    several aspect ratios, for a trainer with aspect-ratio buckets).

    `prior_fraction` of the images instead show the base shapes, plain, with their plain captions (prior
    preservation: keeps the adapter from drifting what the base already draws, and ties a style to its trigger
    word). `background_weights` ({background: weight}, others 1) over-samples the concept on some backgrounds: a
    frame is hardest to learn where it contrasts least. `out` must be empty or absent unless `overwrite`."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; the world has {', '.join(CONCEPTS)}")
    if count < 1:
        raise ValueError("count must be at least 1")
    if not 0.0 <= prior_fraction < 1.0:
        raise ValueError("prior_fraction must be in [0, 1)")
    if trigger is not None:
        check_trigger(trigger)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace its contents)")
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.png")) + [out / METADATA_FILENAME]:
        old.unlink(missing_ok=True)

    rng = random.Random(seed)
    style = concept if concept in STYLES else None
    scenes = all_scenes(SHAPES) if style else all_scenes((concept,))
    prior = all_scenes(tuple(s for s in SHAPES if s != concept))
    unknown = set(background_weights or {}) - set(BACKGROUNDS)
    if unknown:
        raise ValueError(f"background_weights: unknown backgrounds {sorted(unknown)}; the world has {', '.join(BACKGROUNDS)}")
    weights = [(background_weights or {}).get(s.background, 1.0) for s in scenes]
    lines = []
    for i in range(count):
        is_prior = rng.random() < prior_fraction
        if is_prior:
            scene = rng.choice(prior)
        elif background_weights:
            scene = rng.choices(scenes, weights=weights)[0]
        else:
            scene = rng.choice(scenes)
        language = rng.choice(("en", "zh"))
        text = caption_with_trigger(scene, language, rng.randrange(4), None if is_prior else trigger,
                                    None if is_prior else style)
        if parse_prompt(text) != scene:  # the evaluator must read back exactly what the image shows
            raise AssertionError(f"caption {text!r} does not parse as {scene}")
        name = f"{i:05d}.png"
        image_size = size[i % len(size)] if isinstance(size, list) else size
        render(scene, image_size, rng, style=None if is_prior else style).save(out / name)
        lines.append(json.dumps({"file_name": name, "text": text}, ensure_ascii=False))
    (out / METADATA_FILENAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _background_weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BACKGROUND=WEIGHT (e.g. white=2), got {text!r}") from None


def width_height_argument(text: str) -> tuple[int, int]:
    """`parse_width_height` as an argparse type: a malformed size exits 2 naming the flag and the value."""
    try:
        return parse_width_height(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concept", choices=CONCEPTS, help="the concept to teach: a style ('frame') or a shape ('ring')")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--trigger", default=None,
                        help="trigger word: a style's caption prefix, or inserted before the shape word")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (the embedded model's default size)")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="WxH", type=width_height_argument,
                        help="sizes drawn in turn instead of --size (e.g. 128x128 192x128 128x192)")
    parser.add_argument("--prior-fraction", type=float, default=0.0,
                        help="fraction of images showing the base shapes (prior preservation)")
    parser.add_argument("--background-weight", action="append", default=[], metavar="BACKGROUND=W",
                        type=_background_weight,
                        help="over-sample the concept on a background, e.g. white=2 (repeatable; others 1)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = make_dataset(args.concept, args.out, args.count, args.trigger, seed=args.seed, size=args.sizes or args.size,
                           prior_fraction=args.prior_fraction, background_weights=dict(args.background_weight) or None,
                           overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.count} images + {METADATA_FILENAME} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
