"""The text encoder and VAE stages as plain classes over diffusers objects (no Ray import); the denoising stage is
the engine in `lightray.engine`.

Each stage loads only its own components from a diffusers-format folder, so it can run in its own process
(a Ray Serve replica) or all three in one (`lightray.pipeline.LocalPipeline`). Data between stages is
contiguous CPU numpy arrays plus the few scalars the next stage needs (`lightray.contracts`).
"""

from lightray.stages.text_encoder import TextEncodeStage
from lightray.stages.vae import VaeStage

__all__ = ["TextEncodeStage", "VaeStage"]
