"""What the HTTP layer needs from a generation graph (`GenerationBackend`), and what its calls give back: a
`GenerationResult`, or a stream of `StreamItem`s. Two implementations: the Ray Serve graph
(`serve_app.ray_backend.RayGraphBackend`, production) and the in-process pipeline
(`serve_app.local_backend.LocalBackend`, API tests without a cluster)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

from PIL import Image

from lightray.config import ModelPreset
from lightray.schemas import EditSpec, GenerationSpec


@dataclasses.dataclass
class GenerationResult:
    images: list[bytes]
    """Encoded image bytes (`spec.output`: PNG unless the request asked for JPEG or WebP), one per seed, in seed
    order."""
    timings: dict[str, float]
    """Milliseconds per stage (encode_ms, denoise_ms, decode_ms, png_ms, graph_ms; compose_ms for an edit whose
    outputs the ingress composes)."""


@dataclasses.dataclass(frozen=True)
class StepUpdate:
    """A streamed request finished a denoising step (all of its images move together)."""

    step: int
    """Steps done (1-based)."""
    total_steps: int
    """Steps the request runs."""


@dataclasses.dataclass(frozen=True)
class PartialImages:
    """A streamed request's preview: every image's x0-prediction after `step`, projected to RGB at a quarter of the
    side (`preview: "fast"`, `VaeStage.preview`) or decoded by the VAE (`"full"`)."""

    index: int
    """0-based number of this preview within the request (OpenAI's `partial_image_index`)."""
    step: int
    """The step it was taken after."""
    pngs: list[bytes]
    """Encoded image bytes (as `GenerationResult.images`), one per seed, in seed order."""


StreamItem = StepUpdate | PartialImages | GenerationResult
"""What a backend's stream yields: step updates and previews in order, then exactly one `GenerationResult`, whose
images are those the non-streaming call gives for the same spec."""


class GenerationBackend(Protocol):
    preset: ModelPreset

    async def generate(self, spec: GenerationSpec) -> GenerationResult: ...

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        """img2img (no mask) or inpainting; `image` RGB and `mask` "L" (255 = edit) as uploaded, of the same size.
        The backend prepares them and composes the outputs with `lightray.edits`."""
        ...

    def generate_stream(self, spec: GenerationSpec) -> AsyncIterator[StreamItem]:
        """`generate` as a stream (`spec.partial_images` previews). Closing it early cancels the work."""
        ...

    def edit_stream(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None
                    ) -> AsyncIterator[StreamItem]:
        """`edit` as a stream; previews are composed as the final image is."""
        ...

    async def instruct(self, spec: GenerationSpec, images: list[Image.Image]) -> GenerationResult:
        """An instruction edit (a model whose family takes condition images): `spec.prompt` about `images` (1-3,
        RGB, as uploaded)."""
        ...

    def instruct_stream(self, spec: GenerationSpec, images: list[Image.Image]) -> AsyncIterator[StreamItem]:
        """`instruct` as a stream."""
        ...

    async def readiness(self) -> dict[str, bool]: ...
