"""The denoising engine: step-level batching of many requests in one transformer (no Ray import).

`DenoiseEngine` owns the transformer and its step loop, `StepScheduler` is the scheduling policy,
`batched_model` makes one forward serve rows with different prompts, steps and LoRA stacks, and `EngineConfig`
bounds a step. docs/engine.md describes the design, the policy and the numerics contract.
"""

from lightray.config import EngineConfig
from lightray.contracts import AdapterLoadError, DenoiseCancelled, EngineFull
from lightray.engine.engine import DenoiseEngine, EngineRequest, StepStats
from lightray.engine.scheduler import StepPlan, StepScheduler

__all__ = ["AdapterLoadError", "DenoiseCancelled", "DenoiseEngine", "EngineConfig", "EngineFull", "EngineRequest",
           "StepPlan", "StepScheduler", "StepStats"]
