"""Reads a shapes-world image back from its pixels and scores it against a prompt. No learned model is involved,
so the evaluator can be trusted independently of the generator (and is itself tested on ground-truth renders).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

from lightray.world.shapes import (
    BACKGROUNDS,
    EN_POSITION_PHRASES,
    FRAME_COLOR,
    FRAME_WIDTH,
    POSITIONS,
    SHAPE_COLORS,
    ZH,
    Scene,
)

ATTRIBUTES = ("background", "color", "position", "shape")

# A pixel belongs to the shape when it is this far (RGB euclidean) from the background colour.
_FOREGROUND_DISTANCE = 60.0
_MIN_SHAPE_PIXELS_FRACTION = 0.01
# The "frame" style: each side's outer band (its median colour) this close to FRAME_COLOR, and the band just
# inside the frame far from it (a frame is a border, not a yellow picture).
_FRAME_DISTANCE = 90.0


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the evaluator saw. Attributes are None when they could not be read (e.g. no shape found)."""

    background: str | None
    color: str | None
    position: str | None
    shape: str | None
    fill_ratio: float = 0.0
    area_fraction: float = 0.0
    frame: bool = False
    """The image has the "frame" style (see `read_frame`); the other attributes are then read inside it."""

    def as_dict(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = [float(np.linalg.norm(rgb - np.asarray(palette[n], dtype=np.float32))) for n in names]
    return names[int(np.argmin(dists))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (iterative flood fill; images are small)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else mask & False


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)


def read_frame(image: Image.Image | np.ndarray) -> bool:
    """Does the image have the "frame" style: a thick FRAME_COLOR border on all four sides?

    Each side's outer band (¾ of the frame width deep, corners left out: decoded frames are weakest there) must
    have its median colour within `_FRAME_DISTANCE` of FRAME_COLOR, and the band just inside the frame (at 1½
    frame widths, where the background shows) must not. The base shapes world has no borders, so a plain render
    never passes; a yellow shape touching one side moves that side's median by little, never all four."""
    pixels = _pixels(image)
    h, w, _ = pixels.shape
    d = max(1, round(0.75 * FRAME_WIDTH * min(h, w)))
    frame = np.asarray(FRAME_COLOR, dtype=np.float32)
    sides = (pixels[:d, d:w - d], pixels[h - d:, d:w - d], pixels[d:h - d, :d], pixels[d:h - d, w - d:])
    if not all(np.linalg.norm(np.median(side.reshape(-1, 3), axis=0) - frame) < _FRAME_DISTANCE for side in sides):
        return False
    k = round(1.5 * FRAME_WIDTH * min(h, w))
    inner = np.concatenate([pixels[k, k:w - k], pixels[h - 1 - k, k:w - k], pixels[k:h - k, k], pixels[k:h - k, w - 1 - k]])
    return bool(np.linalg.norm(np.median(inner, axis=0) - frame) >= _FRAME_DISTANCE)


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Read the scene back. A framed image ("frame" style) is read inside its frame, positions still relative to
    the whole image."""
    pixels = _pixels(image)
    H, W, _ = pixels.shape
    framed = read_frame(pixels)
    c = round(FRAME_WIDTH * min(H, W)) + 2 if framed else 0  # the frame plus its blurred inner edge
    pixels = pixels[c:H - c, c:W - c]
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)

    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    mask = _largest_component(distance > _FOREGROUND_DISTANCE)
    area = int(mask.sum())
    if area < _MIN_SHAPE_PIXELS_FRACTION * H * W:
        return Reading(background, None, None, None, frame=framed)

    # Colour from the shape's core: edge pixels are blended with the background by anti-aliasing.
    core = mask & (distance >= np.percentile(distance[mask], 50))
    shape_rgb = np.median(pixels[core], axis=0)
    color = _nearest(shape_rgb, SHAPE_COLORS)
    # Geometry from the half-way contour between background and shape colour: it stays where the true edge is
    # when an image is blurred (as VAE decodes are), where a fixed distance threshold would grow or shrink it.
    half = 0.5 * float(np.linalg.norm(shape_rgb - bg_rgb))
    mask = _largest_component(distance > max(half, _FOREGROUND_DISTANCE / 2))
    area = int(mask.sum())

    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + c) / W, (ys.mean() + c) / H
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)

    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = area / float((y1 - y0) * (x1 - x0))
    # A ring has a hole: the middle of its bounding box is background.
    my, mx = (y0 + y1) // 2, (x0 + x1) // 2
    r = max(1, (y1 - y0) // 8)
    hole = not mask[my - r : my + r + 1, mx - r : mx + r + 1].any()
    # A triangle (apex up) has about a quarter of its area in the top half of its box; circles and squares
    # have half. Unlike the fill ratio, this survives the blur of a decoded image.
    top_share = float(mask[y0:my].sum()) / max(1, area)
    if hole:
        shape = "ring"
    elif top_share < 0.4:
        shape = "triangle"
    elif fill > 0.87:  # square 1.0 (≈0.9 when blurred) vs circle π/4 ≈ 0.785 (≤ 0.86 when pixelated)
        shape = "square"
    else:
        shape = "circle"
    return Reading(background, color, position, shape, fill_ratio=fill, area_fraction=area / float(H * W),
                   frame=framed)


_EN_WORDS = {
    "color": {c: c for c in SHAPE_COLORS},
    "shape": {"circle": "circle", "square": "square", "triangle": "triangle", "ring": "ring"},
    "background": {b: b for b in BACKGROUNDS},
}


def parse_prompt(prompt: str) -> Scene:
    """The attributes a prompt asks for (English or Chinese), as a Scene. Raises ValueError if one is missing."""
    text = prompt.lower()
    found: dict[str, str] = {}
    # Background first: its word is adjacent to "background"/"背景", so it is not mistaken for the shape colour.
    for bg in BACKGROUNDS:
        if re.search(rf"\b{bg} background|background is {bg}|{ZH[bg]}背景|背景是{ZH[bg]}|背景为{ZH[bg]}", text):
            found["background"] = bg
    for color in SHAPE_COLORS:
        if re.search(rf"\b{color}\b", text) or ZH[color] in text:
            found["color"] = color
    for shape in ("circle", "square", "triangle", "ring"):
        if re.search(rf"\b{shape}\b", text) or ZH[shape] in text:
            found.setdefault("shape", shape)
    if "圆环" in text:
        found["shape"] = "ring"
    for pos, phrase in EN_POSITION_PHRASES.items():
        if phrase in text or ZH[pos] in text:
            found["position"] = pos
    missing = [a for a in ATTRIBUTES if a not in found]
    if missing:
        raise ValueError(f"prompt does not name: {', '.join(missing)}")
    return Scene(found["color"], found["shape"], found["position"], found["background"])


def score(image: Image.Image | np.ndarray | Reading, expected: Scene) -> dict[str, bool]:
    """Per-attribute correctness of `image` (or of its `read_image` reading) against `expected`, plus "all" (every
    attribute right)."""
    reading = image if isinstance(image, Reading) else read_image(image)
    result = {a: getattr(reading, a) == getattr(expected, a) for a in ATTRIBUTES}
    result["all"] = all(result.values())
    return result
