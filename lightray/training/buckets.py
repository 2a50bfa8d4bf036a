"""Aspect-ratio buckets: the (width, height) sizes training images are brought to, and which bucket an image goes to.

Images keep their composition instead of all being centre-cropped to a square (as diffusers' `aspect_ratio_buckets`
and DiffSynth-Studio's `max_pixels` do for Qwen-Image): each goes to the bucket of the nearest aspect ratio, is
scaled to cover it and centre-cropped to it (only the sliver that differs in ratio is lost), and a batch is drawn
from one bucket, so its latents stack into one tensor of one grid.

The buckets come from the config (`resolve_buckets`): an explicit `buckets` list, or a `max_pixels` budget (for a
preset with an exact size list: the largest served size of each of its aspect ratios within the budget; for a
preset that serves a continuum: one size per `aspect_ratios` entry, as large as the budget allows). Every bucket is
a size the preset serves (`ModelPreset.size_refusal`), so what an adapter learns is what requests ask for. Without
either, training is square at `resolution` (or the preset's square default size) and any image is resized to it,
upscaled if need be: the behaviour the toy configs were tuned with.
"""

from __future__ import annotations

import dataclasses
import math

from lightray.config import ModelPreset
from lightray.training.config import TrainConfig, parse_ratio

Size = tuple[int, int]
"""(width, height) in pixels."""


def _log_ratio(size: Size) -> float:
    return round(math.log(size[0] / size[1]), 6)


@dataclasses.dataclass(frozen=True)
class Buckets:
    sizes: tuple[Size, ...]
    """Every bucket, (width, height)."""
    refuse_smaller: bool
    """An image smaller than every bucket of its aspect ratio is refused (True), or upscaled (the square mode)."""

    @classmethod
    def square(cls, side: int) -> "Buckets":
        """The square mode: one `side`² bucket, any image resized to it."""
        return cls(((side, side),), refuse_smaller=False)

    @property
    def largest(self) -> Size:
        return max(self.sizes, key=lambda s: (s[0] * s[1], s))

    @property
    def smallest(self) -> Size:
        return min(self.sizes, key=lambda s: (s[0] * s[1], s))

    def of_ratio(self, width: int, height: int) -> list[Size]:
        """The buckets of the aspect ratio nearest `width`/`height` (in log ratio), largest first."""
        target = math.log(width / height)
        nearest = min({_log_ratio(s) for s in self.sizes}, key=lambda r: (abs(r - target), r))
        return sorted((s for s in self.sizes if _log_ratio(s) == nearest), key=lambda s: -s[0] * s[1])

    def pick(self, width: int, height: int) -> Size | None:
        """The bucket for an image of `width` x `height`: the largest of its nearest aspect ratio that it covers
        without upscaling; None if it covers none (and `refuse_smaller`)."""
        candidates = self.of_ratio(width, height)
        if not self.refuse_smaller:
            return candidates[0]
        for w, h in candidates:
            if width >= w and height >= h:
                return (w, h)
        return None

    def describe(self) -> str:
        return ", ".join(f"{w}x{h}" for w, h in sorted(self.sizes, key=lambda s: (s[0] * s[1], s)))


def resolve_buckets(config: TrainConfig, preset: ModelPreset) -> Buckets:
    """The buckets `config` trains `preset` at (see the module docstring); ValueError naming what is not served."""
    k = preset.size_multiple
    if config.buckets is not None:
        for w, h in config.buckets:
            refusal = preset.size_refusal(w, h)
            if refusal is not None:
                raise ValueError(f"bucket {w}x{h} is not a size preset {preset.name} serves: {refusal}")
        return Buckets(tuple(dict.fromkeys(tuple(s) for s in config.buckets)), refuse_smaller=True)
    if config.max_pixels is not None:
        if preset.sizes is not None:
            best: dict[float, Size] = {}
            for w, h in preset.sizes:
                if w * h <= config.max_pixels and w * h > math.prod(best.get(_log_ratio((w, h)), (0, 0))):
                    best[_log_ratio((w, h))] = (w, h)
            sizes = list(best.values())
        else:
            sizes = []
            for text in config.aspect_ratios:
                ratio = parse_ratio(text)
                h = int(math.sqrt(config.max_pixels / ratio)) // k * k
                w = int(h * ratio) // k * k
                if preset.size_refusal(w, h) is None and (w, h) not in sizes:
                    sizes.append((w, h))
        if not sizes:
            raise ValueError(f"max_pixels {config.max_pixels} leaves no size preset {preset.name} serves")
        return Buckets(tuple(sizes), refuse_smaller=True)
    if config.resolution is not None:
        side = config.resolution
    else:
        w, h = preset.default_size
        if w != h:
            raise ValueError(f"preset default_size {w}x{h} is not square: set `resolution`, `buckets` or "
                             "`max_pixels` in the training config")
        side = w
    if side % k:
        raise ValueError(f"resolution {side} is not a multiple of the preset's size_multiple {k}")
    return Buckets.square(side)
