"""Batched stage calls (what the TextEncoder and VaeDecoder deployments run for the requests `serve.batch` gathers)
are bit-identical to one call per request, which is what the in-process pipeline makes; and the deployments'
batch handlers hand every caller its own result, in order. No Ray cluster: the handlers are called directly, and
through `serve.batch` itself with the replica context stubbed.

Small on purpose (64x64 / 96x64, a few prompts): the suite shares a 2-core machine.
"""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest
from ray import serve

from deployments.text_encoder import PromptPair, TextEncoder, encode_batch
from deployments.vae import DecodeItem, VaeDecoder, decode_batch
from lightray.contracts import DecodedImages, DenoisedLatents, TextEmbeddings
from lightray.engine.load import QueueWork
from lightray.stages import VaeStage

# Mixed lengths, EN and Chinese: three EN prompts of 62 tokens and three Chinese of 61 share forwards, the rest are
# alone, and the repeated prompts are encoded once.
PROMPTS = [
    "a red circle on the left, white background", "白色背景，左边有一个红色的圆形", " ",
    "a blue square on the right, white background", "黑色背景，上方有一个蓝色的正方形", "白色背景，右边有一个蓝色的方形",
    "a green triangle at the top, black background, drawn large and centred in the frame", "cat",
    "a red circle on the right, white background", "黑色背景，下方有一个绿色的三角形", "白色背景，左边有一个红色的圆形", " ",
]


@pytest.fixture(scope="module")
def text(local_pipeline):
    return local_pipeline.text


@pytest.fixture(scope="module")
def vae(local_pipeline) -> VaeStage:
    return local_pipeline.vae


@pytest.fixture(scope="module")
def alone_embeds(text) -> dict[str, np.ndarray]:
    return {p: text.encode([p])[0] for p in dict.fromkeys(PROMPTS)}


def latents(seed: int, n: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, (height // 16) * (width // 16), 64)).astype(np.float32)


# Mixed decode requests: n = 1, 2, 3 at 64x64 (the n >= 2 ones stacked into one call) and two n = 2 at 96x64.
REQUESTS = [(1, 1, 64, 64), (2, 2, 64, 64), (3, 2, 96, 64), (4, 1, 64, 64), (5, 3, 64, 64), (6, 2, 96, 64)]


@pytest.fixture(scope="module")
def decode_requests() -> list[tuple[np.ndarray, int, int]]:
    return [(latents(seed, n, h, w), h, w) for seed, n, h, w in REQUESTS]


@pytest.fixture(scope="module")
def alone_pixels(vae, decode_requests) -> list[list[np.ndarray]]:
    return [[np.asarray(im) for im in vae.decode(*r)] for r in decode_requests]


# ------------------------------------------------------------------------------------------- stage level

def test_text_batch_plan_groups_equal_lengths_only(text):
    plan = text.batch_plan(PROMPTS)
    assert sorted(p for g in plan for p in g) == sorted(set(PROMPTS))  # every distinct prompt once
    for group in plan:
        assert len({text.token_length(p) for p in group}) == 1
    sizes = sorted(len(g) for g in plan)
    assert sizes[-2:] == [3, 3], plan  # the test batches something, EN and Chinese
    assert any("背景" in g[0] and len(g) > 1 for g in plan)


def test_text_encode_many_is_bit_identical_to_alone(text, alone_embeds):
    batched = text.encode_many(PROMPTS)
    assert len(batched) == len(PROMPTS)
    for p, e in zip(PROMPTS, batched):
        assert e.dtype == np.float32 and e.shape == alone_embeds[p].shape, p
        assert np.array_equal(e, alone_embeds[p]), p


def test_vae_decode_plan(vae, exact_vae):
    def req(n, h=64, w=64):
        return (np.zeros((n, 1, 1), np.float32), h, w)

    rs = [req(1), req(2), req(3, 96), req(1), req(4), req(2, 96), req(5)]
    # The 3D VAE stacks n >= 2 exactly; the single-frame VAE stacks nothing exactly.
    assert exact_vae.decode_plan(rs) == [[0], [1, 4, 6], [2, 5], [3]]
    assert vae.decode_plan(rs) == [[i] for i in range(len(rs))]
    # capped: requests are never split, a call is opened when the next one would overflow
    assert exact_vae.decode_plan(rs, max_images=6) == [[0], [1, 4], [2, 5], [3], [6]]
    assert exact_vae.decode_plan([req(9)], max_images=4) == [[0]]
    # "all": every request of a size, singles too
    for stage in (vae, exact_vae):
        assert stage.decode_plan(rs, stack="all") == [[0, 1, 3, 4, 6], [2, 5]]
        assert stage.decode_plan(rs, max_images=6, stack="all") == [[0, 1, 3], [2, 5], [4], [6]]


@pytest.mark.parametrize("which", ["single_frame", "exact"])
def test_vae_decode_many_is_bit_identical_to_alone(which, vae, exact_vae, decode_requests, alone_pixels):
    stage = vae if which == "single_frame" else exact_vae
    expected_all = alone_pixels if which == "single_frame" else [
        [np.asarray(im) for im in exact_vae.decode(*r)] for r in decode_requests]
    batched = stage.decode_many(decode_requests)
    for i, (images, expected) in enumerate(zip(batched, expected_all)):
        assert len(images) == len(expected), i
        for im, ex in zip(images, expected):
            assert np.array_equal(np.asarray(im), ex), f"request {i}"


def test_vae_decode_many_stacking_all_is_within_one_grey_level(vae, decode_requests, alone_pixels):
    """"all" shares calls across requests: the single-frame VAE's convolutions then reorder float sums."""
    stacked = vae.decode_many(decode_requests, stack="all")
    worst = max(int(np.abs(np.asarray(im, dtype=int) - ex.astype(int)).max())
                for images, expected in zip(stacked, alone_pixels) for im, ex in zip(images, expected))
    assert worst <= 1


# ---------------------------------------------------------------------------- the deployments' handlers

def test_encode_batch_gives_each_request_its_own_embeddings(text, alone_embeds):
    items = [PromptPair(PROMPTS[0], " "), PromptPair(PROMPTS[1]), PromptPair(PROMPTS[3], " "),
             PromptPair(PROMPTS[4], PROMPTS[5]), PromptPair(PROMPTS[6], None), PromptPair(PROMPTS[1], "cat")]
    out = encode_batch(text, items)
    assert len(out) == len(items)
    for item, o in zip(items, out):
        assert np.array_equal(o.prompt, alone_embeds[item.prompt])
        if item.negative_prompt is None:
            assert o.negative is None
        else:
            assert np.array_equal(o.negative, alone_embeds[item.negative_prompt])
        assert o.batch_requests == len(items) and o.encode_ms > 0
    assert out[0].forwards == len(text.batch_plan([p for i in items for p in (i.prompt, i.negative_prompt) if p]))


def test_decode_batch_gives_each_request_its_own_images(vae, decode_requests, alone_pixels):
    items = [DecodeItem(lat, h, w) for lat, h, w in decode_requests]
    out = decode_batch(vae, items)
    assert len(out) == len(items)
    for i, (o, expected) in enumerate(zip(out, alone_pixels)):
        assert [np.asarray(im).tolist() for im in o.images] == [e.tolist() for e in expected], f"request {i}"
        assert o.batch_requests == len(items)
    assert [o.call_images for o in out] == [1, 2, 2, 1, 3, 2]  # "exact" on the single-frame VAE: each alone
    stacked = decode_batch(vae, items, stack="all")
    assert [o.call_images for o in stacked] == [7, 7, 4, 7, 7, 4]  # every request of a size in one call


def test_decode_batch_isolates_a_bad_request(vae, decode_requests, alone_pixels):
    """Latents that do not match their size fail their own request, not the others in its batch."""
    bad = DecodeItem(latents(9, 2, 64, 64), 96, 64)  # 16 tokens given, 24 expected
    items = [DecodeItem(*decode_requests[1]), bad, DecodeItem(*decode_requests[0])]
    out = decode_batch(vae, items)
    assert isinstance(out[1], Exception)
    assert [np.asarray(im).tolist() for im in out[0].images] == [e.tolist() for e in alone_pixels[1]]
    assert [np.asarray(im).tolist() for im in out[2].images] == [e.tolist() for e in alone_pixels[0]]


# ----------------------------------------------------------------- through serve.batch (no Ray cluster)

@pytest.fixture
def replica_context(monkeypatch):
    """serve.batch asks the replica context for `max_ongoing_requests` when it builds its queue."""
    stub = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=8))
    monkeypatch.setattr(serve, "get_replica_context", lambda: stub)


def _run_batched(method, coro_fn):
    """Run `coro_fn()` in a fresh event loop, with a fresh batch queue for the serve.batch-wrapped `method`
    (its queue binds to the loop it was made in), cancelling the queue's task afterwards."""
    lazy = method._get_max_batch_size.__self__

    async def main():
        lazy._queue = None
        try:
            return await coro_fn()
        finally:
            if lazy._queue is not None and lazy._queue._handle_batch_task is not None:
                lazy._queue._handle_batch_task.cancel()
            lazy._queue = None

    return asyncio.run(main())


def test_text_encoder_deployment_batches_concurrent_requests(text, alone_embeds, replica_context, monkeypatch):
    import deployments.text_encoder as module

    cls = TextEncoder.func_or_class
    encoder = cls.__new__(cls)  # without __init__: reuse the session's loaded stage
    encoder.stage, encoder.load = text, QueueWork(prior_s_per_unit=0.01)
    batches = []
    real = module.encode_batch
    monkeypatch.setattr(module, "encode_batch", lambda stage, items: batches.append(len(items)) or real(stage, items))
    pairs = [(PROMPTS[i], " " if i % 2 else None) for i in range(6)]

    async def many():
        return await asyncio.gather(*(encoder.encode(p, n, handoff_at=0.0) for p, n in pairs))

    out = _run_batched(cls._encode_batch, many)
    assert sum(batches) == len(pairs) and max(batches) > 1, batches  # concurrent calls were batched
    for (p, n), emb in zip(pairs, out):
        assert isinstance(emb, TextEmbeddings)
        assert np.array_equal(emb.prompt, alone_embeds[p])
        assert (emb.negative is None) if n is None else np.array_equal(emb.negative, alone_embeds[n])
        assert set(emb.timings) == {"encode_ms", "encode_wait_ms"} and emb.handoff_at is not None


def test_vae_deployment_batches_concurrent_decodes(vae, decode_requests, alone_pixels, replica_context,
                                                   monkeypatch):
    import io

    from PIL import Image

    import deployments.vae as module

    cls = VaeDecoder.func_or_class
    decoder = cls.__new__(cls)
    decoder.stage, decoder.max_images_per_call, decoder.stack_requests = vae, None, "exact"
    decoder.load = QueueWork(prior_s_per_unit=2e-5)
    batches = []
    real = module.decode_batch
    monkeypatch.setattr(module, "decode_batch",
                        lambda stage, items, m, stack: batches.append(len(items)) or real(stage, items, m, stack))

    async def many():
        return await asyncio.gather(*(
            decoder.decode(DenoisedLatents(lat, {"denoise_ms": float(i)}, handoff_at=0.0), w, h)
            for i, (lat, h, w) in enumerate(decode_requests)))

    out = _run_batched(cls._decode_batch, many)
    assert sum(batches) == len(decode_requests) and max(batches) > 1, batches
    for i, (res, expected) in enumerate(zip(out, alone_pixels)):
        assert isinstance(res, DecodedImages) and len(res.pngs) == len(expected)
        for png, ex in zip(res.pngs, expected):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), ex), f"request {i}"
        assert res.timings["denoise_ms"] == float(i)  # the denoiser's timings travel on
        assert {"decode_ms", "png_ms", "decode_wait_ms"} <= set(res.timings)
