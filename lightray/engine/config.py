"""Typed configuration of the denoising engine (one per Denoiser replica)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """How much work one engine step may take, and how it waits for work.

    Set per deployment from the Serve YAML (`Denoiser` args `engine:`); the defaults suit the embedded model on
    a CPU replica (docs/engine.md has the step-time curve they come from).
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_batch_rows: int = Field(16, ge=1, le=512)
    """Most transformer rows in one step, over all latent grids. An image is one row, two with true CFG. A request
    larger than the budget still runs, alone (it is never split across steps)."""
    max_batch_tokens: int | None = Field(None, ge=1)
    """Optional second bound: rows × image tokens per step (image tokens = (height/16)·(width/16)). None: rows
    alone bound the step."""
    max_live_requests: int = Field(64, ge=1)
    """Requests the engine holds at once, running, paused or waiting; `submit` refuses more (the deployment's
    `max_ongoing_requests` should not exceed it)."""
    idle_wait_s: float = Field(0.5, gt=0)
    """How long the loop sleeps when it has nothing to run before checking again (it wakes at once on a new
    request)."""
