"""Helpers shared by the stages."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def generators(seeds: list[int], device: str) -> list[torch.Generator]:
    """One generator per image: image i's noise depends only on its own seed, so a batch of n reproduces n
    single-image runs (up to float noise from batched matmuls)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
