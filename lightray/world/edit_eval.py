"""Scores instruction edits of shapes-world pictures from their pixels: the asked attributes changed as asked and
every other attribute kept (the pixel evaluator reads all four back), and the PSNR of the background the edit did
not touch. Used by `benchmarks/eval_edit.py` and the tests."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from lightray.world.edit_pairs import EditPair
from lightray.world.evaluator import ATTRIBUTES, read_image
from lightray.world.shapes import BACKGROUNDS, Jitter, render

_BACKGROUND_DISTANCE = 30.0
"""A pixel of a clean render this close (RGB) to its background colour is background."""


@dataclasses.dataclass(frozen=True)
class EditScore:
    """One edited image against its pair."""

    correct: bool
    """Every attribute reads as the target's: the asked ones changed, the others kept."""
    attributes: dict[str, bool]
    background_psnr: float | None
    """PSNR (dB) of the result against the target over the pixels that are background in both the source's and
    the target's clean renders; None when the edit changes the background colour (nothing is left untouched)."""


def untouched_background(pair: EditPair, size: tuple[int, int], jitter: Jitter) -> np.ndarray:
    """[h, w] bool: background in both the source's and the target's clean renders (the shape never covers it)."""
    masks = []
    for scene in (pair.source, pair.target):
        pixels = np.asarray(render(scene, size, jitter=jitter), dtype=np.float32)
        distance = np.linalg.norm(pixels - np.asarray(BACKGROUNDS[scene.background], dtype=np.float32), axis=-1)
        masks.append(distance < _BACKGROUND_DISTANCE)
    return masks[0] & masks[1]


def score_edit(result: Image.Image, pair: EditPair, jitter: Jitter) -> EditScore:
    reading = read_image(result)
    attributes = {a: getattr(reading, a) == getattr(pair.target, a) for a in ATTRIBUTES}
    psnr = None
    if pair.source.background == pair.target.background:
        size = result.size
        keep = untouched_background(pair, size, jitter)
        target = np.asarray(render(pair.target, size, jitter=jitter), dtype=np.float64)[keep]
        got = np.asarray(result.convert("RGB"), dtype=np.float64)[keep]
        mse = float(np.mean((got - target) ** 2)) if len(got) else 0.0
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return EditScore(all(attributes.values()), attributes, psnr)
