"""A generation backend that runs nothing: it records the specs the routers hand it and answers with blank images
(in the format asked). For tests of what the ingress resolves (adapters pinned, priority, tenant) without running the stages."""

from __future__ import annotations

import base64
from collections.abc import Iterator

from fastapi.testclient import TestClient
from PIL import Image

from lightray.config import ModelPreset
from lightray.images import encode_image, encode_png
from lightray.schemas import EditSpec, GenerationSpec
from serve_app.api import create_app
from serve_app.backend import GenerationResult
from serve_app.settings import ServiceSettings


class RecordingBackend:
    def __init__(self, preset: ModelPreset):
        self.preset = preset
        self.specs: list[GenerationSpec] = []
        """Every spec given to `generate` or `edit`, in order."""

    def _answer(self, spec: GenerationSpec) -> GenerationResult:
        self.specs.append(spec)
        png = encode_image(Image.new("RGB", (spec.width, spec.height), "white"), spec.output)
        return GenerationResult(images=[png] * len(spec.seeds), timings={"graph_ms": 0.0})

    async def generate(self, spec: GenerationSpec) -> GenerationResult:
        return self._answer(spec)

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        return self._answer(spec)

    async def readiness(self) -> dict[str, bool]:
        return {"recording": True}


def recording_app(preset: ModelPreset, settings: ServiceSettings) -> Iterator[tuple[TestClient, RecordingBackend]]:
    """(client, backend) of the real app with `settings` over a `RecordingBackend`, for a fixture to yield from."""
    backend = RecordingBackend(preset)
    with TestClient(create_app(backend, settings), base_url="http://localhost") as client:
        yield client, backend


def white_png_b64(size: tuple[int, int] = (64, 64)) -> str:
    """A white PNG, base64: an edit's input image when only the request's resolution is under test."""
    return base64.b64encode(encode_png(Image.new("RGB", size, "white"))).decode("ascii")
