"""Instruction-edit pairs from the shapes world: a source scene, an instruction in English or Chinese, and the
target scene in which exactly the asked attributes changed (`lightray-shapes-edit` trains on them, and
`benchmarks/eval_edit.py` scores the model's edits against them).

An edit changes the shape's colour, the shape, its position or the background, or two of them at once ("make the
circle blue and move it to the left"). Index 0 of every phrasing list is the grammar the product promises to
understand; the others are paraphrases seen in training.

Sources are augmented so the model does not learn one renderer: the shape's size and placement jitter more than in
the text-to-image data, edges are drawn aliased or anti-aliased, colours drift, some sources are blurred or saved
as JPEG. The target keeps the source's geometry (a moved shape keeps its offset from its new anchor) and is drawn
clean, in the world's palette. `render_foreign` is a second renderer, never used in training, that the evaluator
measures robustness on.
"""

from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lightray.world.shapes import (
    BACKGROUNDS,
    HELD_OUT,
    POSITIONS,
    SHAPE_COLORS,
    SHAPES,
    ZH,
    Jitter,
    Scene,
    Size,
    all_scenes,
    render,
    width_height,
)

EDIT_KINDS = ("color", "shape", "position", "background")
"""What one instruction clause changes."""
EDIT_COMBOS: tuple[tuple[str, str], ...] = (
    ("color", "position"), ("shape", "color"), ("color", "background"), ("shape", "position"),
    ("position", "background"),
)
"""The two-attribute edits, in the order their clauses are spoken."""
COMBO_FRACTION = 0.2
"""Share of sampled pairs that change two attributes."""

EN_POSITIONS = {"left": "the left", "right": "the right", "top": "the top", "bottom": "the bottom",
                "center": "the center"}

EN_CLAUSES: dict[str, tuple[str, ...]] = {
    "color": ("make {subject} {color}", "change {subject} to {color}", "color {subject} {color}",
              "turn {subject} {color}"),
    "shape": ("turn {subject} into a {shape2}", "change {subject} into a {shape2}", "replace {subject} with a {shape2}",
              "make {subject} a {shape2}"),
    "position": ("move {subject} to {pos}", "put {subject} at {pos}", "shift {subject} to {pos}",
                 "place {subject} on {pos}"),
    "background": ("make the background {bg}", "change the background to {bg}", "paint the background {bg}",
                   "turn the background {bg}"),
}
ZH_CLAUSES: dict[str, tuple[str, ...]] = {
    "color": ("把{subject}变成{color}", "将{subject}改成{color}", "把{subject}换成{color}"),
    "shape": ("把{subject}变成{shape2}", "将{subject}改成{shape2}", "把{subject}换成{shape2}"),
    "position": ("把{subject}移到{pos}", "将{subject}移动到{pos}", "把{subject}放到{pos}"),
    "background": ("把背景变成{bg}", "将背景改成{bg}", "把背景换成{bg}"),
}
ZH_FOLLOW: dict[str, tuple[str, ...]] = {
    "color": ("并变成{color}", "再改成{color}"),
    "shape": ("并变成{shape2}", "再改成{shape2}"),
    "position": ("并移到{pos}", "再移动到{pos}"),
    "background": ("，并把背景变成{bg}", "，再将背景改成{bg}"),
}
"""A second Chinese clause: the subject is left out, as Chinese does ("把圆形变成蓝色并移到左边")."""


@dataclasses.dataclass(frozen=True)
class EditPair:
    """One edit: what the source shows, what is asked, and what the result must show."""

    source: Scene
    target: Scene
    kinds: tuple[str, ...]
    language: str
    phrasing: int = 0

    @property
    def instruction(self) -> str:
        return instruction(self.source, self.target, self.kinds, self.language, self.phrasing)


def instruction(source: Scene, target: Scene, kinds: tuple[str, ...], language: str, phrasing: int = 0) -> str:
    """The instruction that turns `source` into `target` by `kinds`, in `language` ("en" or "zh")."""
    if language == "en":
        clauses = []
        for i, kind in enumerate(kinds):
            options = EN_CLAUSES[kind]
            clauses.append(options[phrasing % len(options)].format(
                subject=f"the {source.shape}" if i == 0 else "it", color=target.color, shape2=target.shape,
                pos=EN_POSITIONS[target.position], bg=target.background))
        return " and ".join(clauses)
    if language == "zh":
        words = dict(subject=ZH[source.shape], color=ZH[target.color], shape2=ZH[target.shape],
                     pos=ZH[target.position], bg=ZH[target.background])
        first = ZH_CLAUSES[kinds[0]][phrasing % len(ZH_CLAUSES[kinds[0]])].format(**words)
        rest = [ZH_FOLLOW[k][phrasing % len(ZH_FOLLOW[k])].format(**words) for k in kinds[1:]]
        return first + "".join(rest)
    raise ValueError(f"unknown language {language!r}")


def apply_edit(source: Scene, kinds: tuple[str, ...], rng: random.Random) -> Scene:
    """`source` with each attribute of `kinds` changed to another value drawn by `rng`."""
    choices = {"color": list(SHAPE_COLORS), "shape": list(SHAPES), "position": list(POSITIONS),
               "background": list(BACKGROUNDS)}
    values = dataclasses.asdict(source)
    for kind in kinds:
        values[kind] = rng.choice([v for v in choices[kind] if v != values[kind]])
    return Scene(**values)


def source_scenes(held_out: bool) -> list[Scene]:
    """Sources of training pairs (every scene but the held-out combinations) or of evaluation (those alone)."""
    return [s for s in all_scenes() if (s.key in HELD_OUT) == held_out]


def sample_pairs(count: int, seed: int, held_out: bool = False, phrasings: bool = True) -> list[EditPair]:
    """`count` edit pairs, deterministic in `seed`: single-attribute edits uniform over the kinds, `COMBO_FRACTION`
    of them two at once, languages 50/50, every phrasing (or the canonical one alone). Training pairs neither start
    from nor end at a held-out scene."""
    rng = random.Random(seed)
    pool = source_scenes(held_out)
    pairs = []
    while len(pairs) < count:
        kinds = rng.choice(EDIT_COMBOS) if rng.random() < COMBO_FRACTION else (rng.choice(EDIT_KINDS),)
        source = rng.choice(pool)
        target = apply_edit(source, kinds, rng)
        if not held_out and target.key in HELD_OUT:
            continue
        language = rng.choice(("en", "zh"))
        phrasing = rng.randrange(4) if phrasings else 0
        pairs.append(EditPair(source, target, kinds, language, phrasing))
    return pairs


def draw_source_jitter(rng: random.Random) -> Jitter:
    """More placement and size jitter than text-to-image training draws: sources come from anywhere."""
    return rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06), rng.uniform(0.75, 1.3)


def _drift(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.randint(-amount, amount), 0, 255)) for c in rgb)  # type: ignore[return-value]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """`image` after a round trip through JPEG at `quality`."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def render_source(scene: Scene, size: Size, jitter: Jitter, rng: random.Random) -> Image.Image:
    """An augmented source: aliased or anti-aliased edges, drifted colours, sometimes blurred or JPEG'd."""
    colors = (_drift(SHAPE_COLORS[scene.color], rng, 20), _drift(BACKGROUNDS[scene.background], rng, 15))
    image = render(scene, size, supersample=rng.choice((1, 2, 4, 4)), jitter=jitter, colors=colors)
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.5:
        image = jpeg(image, rng.randint(35, 95))
    return image


def render_target(scene: Scene, size: Size, jitter: Jitter) -> Image.Image:
    """The clean result: the world's palette, anti-aliased, the source's jitter."""
    return render(scene, size, jitter=jitter)


FOREIGN_SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 150, 0), "blue": (0, 0, 255), "yellow": (255, 235, 0),
    "purple": (120, 20, 170), "orange": (255, 120, 0),
}
FOREIGN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 240), "black": (15, 15, 20),
                                                        "gray": (140, 140, 140)}


def render_foreign(scene: Scene, size: Size, rng: random.Random) -> Image.Image:
    """The same scene drawn the way another program would: its own palette (pure primaries, off-white paper),
    shapes of other proportions (an equilateral triangle, a larger square, a thin outline), hard edges at 1×, and
    sensor-like noise. The evaluator's second renderer; never seen in training."""
    width, height = width_height(size)
    side = min(width, height)
    image = Image.new("RGB", (width, height), FOREIGN_BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    ax, ay = POSITIONS[scene.position]
    cx = (ax + rng.uniform(-0.03, 0.03)) * width
    cy = (ay + rng.uniform(-0.03, 0.03)) * height
    r = side * rng.uniform(0.12, 0.17)
    fill = FOREIGN_SHAPE_COLORS[scene.color]
    outline = tuple(max(0, c - 60) for c in fill)
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif scene.shape == "triangle":
        h = r * 3 ** 0.5 / 2
        draw.polygon([(cx, cy - r * 1.1), (cx - 1.1 * r * 3 ** 0.5 / 2 * 1.15, cy + h * 0.75),
                      (cx + 1.1 * r * 3 ** 0.5 / 2 * 1.15, cy + h * 0.75)], fill=fill, outline=outline)
    else:
        raise ValueError(f"the foreign renderer draws {SHAPES}, not {scene.shape!r}")
    pixels = np.asarray(image, dtype=np.int16) + np.random.default_rng(rng.randrange(2**31)).integers(
        -6, 7, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
