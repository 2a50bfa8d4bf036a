"""The synthetic bilingual "shapes" world the embedded model is trained on.

One coloured shape on a plain background, placed at one of five anchors, with captions in English and
Simplified Chinese in several phrasings. Everything is procedural and seeded, so the data set, the held-out
combinations and the evaluation suite are reproducible without downloading anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

# Palettes are far apart in RGB so the evaluator can read colours back from pixels unambiguously.
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Shapes that exist in the world's renderer and evaluator but never in the base model's training data:
# adapters (LoRAs) teach them. "ring" is the concept the tenant-adapter demo trains.
EXTRA_SHAPES = ("ring",)
# Styles that exist in the renderer and evaluator but never in the base model's training data: an adapter tied to
# a trigger word teaches them. "frame": a thick border in FRAME_COLOR (a palette colour, which the embedded VAE
# reproduces; colours it never saw, such as cyan, come back as blue) FRAME_WIDTH of the side wide (8 px at 64 px:
# exactly the outer ring of the 8×8 latent grid), drawn over the scene.
STYLES = ("frame",)
FRAME_COLOR: tuple[int, int, int] = (240, 210, 40)  # = SHAPE_COLORS["yellow"]
FRAME_WIDTH = 0.125
POSITIONS: dict[str, tuple[float, float]] = {  # anchor (x, y) as a fraction of width / height
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}

ZH = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
    "white": "白色", "black": "黑色", "gray": "灰色",
    "circle": "圆形", "square": "正方形", "triangle": "三角形", "ring": "圆环",
    "left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "center": "中间",
}
EN_POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center",
}

# Index 0 of each list is the canonical phrasing the product promises to understand.
EN_TEMPLATES = (
    "a {color} {shape} {pos}, {bg} background",
    "a {color} {shape} {pos} on a {bg} background",
    "{bg} background with a {color} {shape} {pos}",
    "{pos}, a {color} {shape}; the background is {bg}",
)
ZH_TEMPLATES = (
    "{bg}背景，{pos}有一个{color}的{shape}",
    "一个{color}的{shape}在{pos}，{bg}背景",
    "{pos}是{color}{shape}，背景是{bg}",
    "背景为{bg}，{color}的{shape}位于{pos}",
)

# Combinations never shown in training: the evaluation suite measures compositional generalisation on them.
HELD_OUT: frozenset[tuple[str, str, str, str]] = frozenset({
    ("red", "triangle", "right", "black"),
    ("green", "circle", "top", "gray"),
    ("blue", "square", "bottom", "white"),
    ("yellow", "triangle", "left", "gray"),
    ("purple", "circle", "center", "white"),
    ("orange", "square", "top", "black"),
    ("red", "square", "center", "gray"),
    ("blue", "circle", "left", "black"),
})


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows: every attribute the evaluator can read back from pixels."""

    color: str
    shape: str
    position: str
    background: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.color, self.shape, self.position, self.background)

    def caption(self, language: str = "en", template: int = 0) -> str:
        """The caption for this scene in `language` ("en" or "zh") using phrasing number `template`."""
        if language == "en":
            text = EN_TEMPLATES[template % len(EN_TEMPLATES)].format(
                color=self.color, shape=self.shape, pos=EN_POSITION_PHRASES[self.position], bg=self.background
            )
            return text[0].upper() + text[1:] if template % 2 else text
        if language == "zh":
            return ZH_TEMPLATES[template % len(ZH_TEMPLATES)].format(
                color=ZH[self.color], shape=ZH[self.shape], pos=ZH[self.position], bg=ZH[self.background]
            )
        raise ValueError(f"unknown language {language!r}")


def all_scenes(shapes: Iterable[str] = SHAPES) -> list[Scene]:
    return [Scene(c, s, p, b) for c, s, p, b in itertools.product(SHAPE_COLORS, shapes, POSITIONS, BACKGROUNDS)]


def training_scenes() -> list[Scene]:
    return [s for s in all_scenes() if s.key not in HELD_OUT]


Size = int | tuple[int, int]
"""A side (square) or (width, height) in pixels."""


def width_height(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


Jitter = tuple[float, float, float]
"""(dx, dy, radius factor): how far a shape sits from its anchor (fractions of width and height) and how much
larger than the canonical radius it is."""


def draw_jitter(rng: random.Random) -> Jitter:
    """The jitter `render` draws from `rng` (training diversity)."""
    dx, dy = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    return dx, dy, rng.uniform(0.85, 1.15)


def render(scene: Scene, size: Size = 64, rng: random.Random | None = None, supersample: int = 4,
           style: str | None = None, jitter: Jitter | None = None,
           colors: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None) -> Image.Image:
    """Draw `scene` as an RGB image of `size` (a side, or (width, height)); with `style` "frame", plus a thick
    frame over it.

    Positions are fractions of the width and height; the shape's size and the frame's width are fractions of
    the shorter side, so a shape stays round on any aspect ratio and the same scene reads the same at any size.
    With `rng`, the shape's size and placement jitter a little (training diversity, `draw_jitter`); `jitter`
    gives that jitter explicitly (an edit's source and target share it); with neither the render is the canonical
    one. `colors` replaces the palette's (shape, background) RGB. Drawing happens at `supersample`× and is
    box-filtered down, so edges are anti-aliased like a natural image rather than aliased staircases the VAE would
    have to memorise.
    """
    width, height = width_height(size)
    sw, sh = width * supersample, height * supersample
    s = min(sw, sh)
    fill, background = colors or (SHAPE_COLORS[scene.color], BACKGROUNDS[scene.background])
    img = Image.new("RGB", (sw, sh), background)
    draw = ImageDraw.Draw(img)
    ax, ay = POSITIONS[scene.position]
    radius = 0.15
    if jitter is None and rng is not None:
        jitter = draw_jitter(rng)
    if jitter is not None:
        ax, ay, radius = ax + jitter[0], ay + jitter[1], radius * jitter[2]
    cx, cy, r = ax * sw, ay * sh, radius * s
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        h = r * 0.9
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=fill)
    elif scene.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        inner = r * 0.5
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=background)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    if style == "frame":
        draw.rectangle([0, 0, sw - 1, sh - 1], outline=FRAME_COLOR, width=round(FRAME_WIDTH * s))
    elif style is not None:
        raise ValueError(f"unknown style {style!r}; the world has {', '.join(STYLES)}")
    return img.resize((width, height), Image.Resampling.BOX)


def sample_training_examples(
    count: int, seed: int, size: Size = 64, scenes: list[Scene] | None = None
) -> Iterator[tuple[Scene, Image.Image, str]]:
    """`count` (scene, image, caption) triples: scenes uniform over the training set, language 50/50, all
    phrasings. Deterministic in `seed`."""
    rng = random.Random(seed)
    pool = scenes if scenes is not None else training_scenes()
    for _ in range(count):
        scene = rng.choice(pool)
        language = rng.choice(("en", "zh"))
        caption = scene.caption(language, rng.randrange(4))
        yield scene, render(scene, size, rng), caption


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
