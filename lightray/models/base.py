"""The interface every model family gives the engine, the stages and the API (`lightray.models`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

Task = Literal["text-to-image", "edit"]
Endpoint = Literal["generations", "edits"]

Grid = tuple[int, int]
"""(rows, columns) of packed latent tokens: 2×2 patches of the VAE's latent grid."""


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the house needs to know of a family. The transformer class is Qwen-Image's in every family so far;
    what differs is how a request is conditioned and what one row of the transformer's batch holds."""

    name: str
    """The preset's `family` value."""
    pipeline: str
    """The diffusers pipeline whose `__call__` a request alone reproduces exactly (the numerics contract)."""
    task: Task
    endpoints: tuple[Endpoint, ...]
    """The API endpoints that serve a model of this family."""
    input_images: tuple[int, int]
    """Fewest and most input images an edit request takes (0, 0 for a family that takes none)."""
    condition_tokens: bool
    """Input images join the transformer's sequence as condition tokens after the noise tokens (and the
    prediction is sliced back to the noise tokens), rather than starting the denoising (img2img)."""
    lora_targets: tuple[str, ...]
    """Linear layers of a transformer block (peft `target_modules` suffixes) that Lightning and tenant LoRAs
    adapt."""

    def img_shapes(self, noise: Grid, conditions: tuple[Grid, ...] = ()) -> list[tuple[int, int, int]]:
        """One row's `img_shapes` entry: the noise grid, then each condition image's, as (frames, rows, columns)
        (`QwenImageEditPlusPipeline.__call__`; RoPE gives each image its own frame index)."""
        return [(1, *noise), *((1, *g) for g in conditions)]
