"""An edit's outputs composed onto its input image (`lightray.edits`), at the ingress: the same for both backends,
for the answer in one piece and for every preview and the final image of a stream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

from PIL import Image

from lightray.contracts import OutputEncoding
from lightray.edits import PreparedEdit, compose_preview_pngs, compose_pngs, prepare_edit, preview_frame
from lightray.schemas import EditSpec
from serve_app.backend import GenerationResult, PartialImages, StreamItem


async def composed_result(result: GenerationResult, prepared: PreparedEdit,
                          encoding: OutputEncoding) -> GenerationResult:
    """`result` with its images composed and encoded as `encoding` (`lightray.edits.compose_pngs`, in a worker
    thread); `compose_ms` timed."""
    if not prepared.composes:
        return result
    start = time.perf_counter()
    pngs = await asyncio.to_thread(compose_pngs, result.images, prepared, encoding)
    return GenerationResult(pngs, {**result.timings, "compose_ms": (time.perf_counter() - start) * 1000})


async def composed_stream(spec: EditSpec, image: Image.Image, mask: Image.Image | None,
                          start: Callable[[PreparedEdit], AsyncIterator[StreamItem]]) -> AsyncIterator[StreamItem]:
    """An edit's stream, the same for both backends: prepare the edit (in a worker thread), `start(prepared)` the
    model's stream, and yield its items with every preview and the final image composed as the non-streaming
    `edit` composes its images, and encoded as `spec.output` (`start` has the model's outputs encoded as
    `lightray.edits.decoded_encoding` says). Closing this closes the model's stream at once (which cancels its
    work). Previews are composed onto `lightray.edits.preview_frame` (with `padding_mask_crop`, the input scaled
    down to the model's pixels), made when the first one comes."""
    prepared = await asyncio.to_thread(prepare_edit, image, mask, spec)
    preview = None
    items = start(prepared)
    try:
        async for item in items:
            if isinstance(item, PartialImages):
                if preview is None:
                    preview = await asyncio.to_thread(preview_frame, prepared)
                pngs = await asyncio.to_thread(compose_preview_pngs, item.pngs, preview, spec.output)
                item = dataclasses.replace(item, pngs=pngs)
            elif isinstance(item, GenerationResult):
                item = await composed_result(item, prepared, spec.output)
            yield item
    finally:
        await items.aclose()
