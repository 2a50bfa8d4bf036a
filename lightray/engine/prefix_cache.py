"""Qwen-Image-2.1's prefix KV cache as per-request engine state, and the forwards that build and read it.

Under `causal_condition` the 2.1 transformer modulates text and condition-image tokens at t = 0, so their keys and
values are the same at every step: `QwenImage21Transformer2DModel.forward` can store them per layer
(`kv_cache_mode="extract"`, the whole sequence) and later compute the noise tokens alone against them
(`"cached"`). The modular pipelines keep one `QwenImage21KVCache` per CFG branch for one call; the engine keeps
them on the request (`PrefixCache`), so a request's cache is

* built in its first forward, one per branch (conditional, and unconditional with CFG),
* read in every later forward, across pauses (a paused request keeps it: it is its state, like its latents),
* freed when the request finishes, fails or is cancelled (`DenoiseEngine._finish`).

What shares a forward. The transformer reads one sequence layout per forward (`img_mask[0]`, `img_shapes[0]`) and
one cache mode, so the engine's batch (one sequence signature: output and condition grids) is split further:

* an extracting forward holds one request's branch alone (its n rows): its first step costs what the pipeline's
  does, and the t = 0 row its prefix reads is computed exactly as alone;
* cached forwards hold every branch, of any request and at any step, whose prompt has the same layout: the same
  text length and image slots (`PrefixRows.layout`); their caches are concatenated along the rows.

So rows with and without a cache never share a forward, nor rows of prompts of different lengths (2.1's RoPE gives
the target image the frame position after the text: padding would move it). A request's conditional and
unconditional branches share a cached forward when their prompts have the same layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache
from diffusers.modular_pipelines.qwenimage21.denoise import joint_vision_mask

from lightray.engine import batched_model


class PrefixCache:
    """One request's prefix KV caches, by CFG branch ("cond", "uncond"), from its first forward to its end."""

    def __init__(self) -> None:
        self.branches: dict[str, QwenImage21KVCache] = {}

    def __contains__(self, branch: str) -> bool:
        return branch in self.branches

    @property
    def nbytes(self) -> int:
        """Bytes the cached keys and values hold (every layer, every branch, the request's n rows)."""
        return sum(t.numel() * t.element_size() for cache in self.branches.values() for layer in cache.layer_caches
                   for t in (layer.k, layer.v) if t is not None)

    def free(self) -> None:
        self.branches.clear()


@dataclasses.dataclass(frozen=True)
class PrefixRows:
    """One CFG branch of one request: its n rows in a 2.1 forward."""

    request: object
    """The `EngineRequest` (latents, condition, timesteps, step, stack, prefix cache)."""
    branch: str
    text: torch.Tensor
    """[tokens, hidden] the branch's prompt embeddings."""
    image_slots: torch.Tensor
    """[tokens] bool, the prompt's vision-encoder image slots."""

    @property
    def cached(self) -> bool:
        return self.branch in self.request.prefix_cache

    @property
    def layout(self) -> tuple:
        """What must be equal for rows to share a cached forward: the prompt's length and image slots."""
        return (self.text.shape[0], tuple(self.image_slots.tolist()))


def branches_of(request) -> list[PrefixRows]:
    """The request's conditional branch, then (true CFG) its unconditional one."""
    rows = [PrefixRows(request, "cond", request.prompt, request.prompt_slots)]
    if request.params.uses_cfg:
        rows.append(PrefixRows(request, "uncond", request.negative, request.negative_slots))
    return rows


def plan_forwards(batch: Sequence) -> list[list[PrefixRows]]:
    """The forwards one engine batch (one sequence signature) takes: each extracting branch alone, in batch order,
    then one cached forward per prompt layout."""
    extracting, cached = [], {}
    for request in batch:
        for rows in branches_of(request):
            if rows.cached:
                cached.setdefault(rows.layout, []).append(rows)
            else:
                extracting.append([rows])
    return [*extracting, *cached.values()]


def _merged_cache(entries: Sequence[PrefixRows], layers: int) -> QwenImage21KVCache:
    """One cache over the rows of `entries`, in row order (one entry's is used as it is)."""
    if len(entries) == 1:
        return entries[0].request.prefix_cache.branches[entries[0].branch]
    merged = QwenImage21KVCache(layers)
    caches = [e.request.prefix_cache.branches[e.branch] for e in entries]
    for index, layer in enumerate(merged.layer_caches):
        parts = [c.get_layer(index).get() for c in caches]
        layer.store(torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]))
    return merged


def prefix_forward(transformer, routing: batched_model.RoutingSlot, family, entries: Sequence[PrefixRows],
                   device) -> tuple[list[torch.Tensor], QwenImage21KVCache | None]:
    """One 2.1 transformer forward over `entries` (one extracting branch, or cached branches of one layout):
    each entry's [n, noise tokens, channels] prediction, and the cache an extracting forward filled (the caller
    keeps it once the whole step's forwards have succeeded: a step retried after a failure must extract again, or
    its first step would be computed the cached way, which is not the same arithmetic). As
    `QwenImage21LoopDenoiser` calls it: condition tokens then noise tokens, every text token valid
    (`prompt_embeds_mask` of ones), the timestep over 1000."""
    first = entries[0].request
    target_tokens = first.image_tokens
    mode = "cached" if entries[0].cached else "extract"
    hidden, texts, slots, stacks, segments, timesteps = [], [], [], [], [], []
    for entry in entries:
        request, n = entry.request, entry.request.params.n
        rows = request.latents
        if request.condition is not None:
            rows = torch.cat([request.condition.expand(n, -1, -1), rows], dim=1)
        start = len(stacks)
        hidden.append(rows)
        texts.append(entry.text.expand(n, -1, -1))
        slots.append(entry.image_slots.expand(n, -1))
        stacks.extend([request.stack] * n)
        segments.append((start, start + n))
        timesteps.append(request.timesteps[request.step].expand(n))
    latents = torch.cat(hidden)
    text = torch.cat(texts)
    text_mask = torch.ones(text.shape[:2], dtype=torch.long, device=device)
    img_mask = joint_vision_mask(torch.cat(slots), target_tokens)
    layers = len(transformer.transformer_blocks)
    cache = QwenImage21KVCache(layers) if mode == "extract" else _merged_cache(entries, layers)
    img_shapes = family.img_shapes(first.grid, first.condition_grids)
    routing.current = batched_model.RowRouting(stacks, segments, device, shared_tail=True)
    try:
        with torch.inference_mode():
            out = transformer(
                hidden_states=latents, encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                timestep=torch.cat(timesteps).to(latents.dtype) / 1000, img_shapes=[img_shapes] * len(stacks),
                img_mask=img_mask, attention_kwargs={}, kv_cache=cache, kv_cache_mode=mode, return_dict=False,
            )[0]
    finally:
        routing.current = None
    out = out[:, -target_tokens:]
    return [out[a:b] for a, b in segments], cache if mode == "extract" else None
