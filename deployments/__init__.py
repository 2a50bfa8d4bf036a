"""Ray Serve deployments: thin shells that own a stage's resources, health checks and (for the denoiser)
adapter multiplexing. All logic lives in `lightray.stages`."""

from deployments.denoiser import Denoiser
from deployments.text_encoder import TextEncoder
from deployments.vae import VaeDecoder

__all__ = ["Denoiser", "TextEncoder", "VaeDecoder"]
