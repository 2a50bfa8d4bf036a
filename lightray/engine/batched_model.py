"""One transformer forward over rows of many requests: per-row LoRA stacks, padded text, batch invariance.

The engine puts rows of different requests (different prompts, adapters, steps, CFG halves) into one
`QwenImageTransformer2DModel.forward`. Three things make a row's result independent of the rows beside it, and
equal to what `QwenImagePipeline.__call__` computes for its request alone:

* **Mixed LoRA stacks.** Every peft LoRA `Linear` of the transformer gets a forward that applies, to each row,
  exactly the adapters of that row's stack, in stack order, with the row's weights: `result[rows] +=
  B(A(x[rows])) * scaling` per (adapter, weight) present in the batch. peft's own mixed-batch path
  (`adapter_names=`) allows one adapter per row; a row here carries its variant's Lightning LoRA plus up to four
  tenant adapters. The arithmetic per row is peft's (`result + lora_B(lora_A(dropout(x))) * scaling`, scaling
  `weight * alpha / r` as `set_adapters` sets it), so a request alone gives `set_adapters`' result bit for bit.
  No `set_adapters` walk happens per request: the stack is data of the forward (`RowRouting`).
* **Padded text.** Prompts of different lengths are padded and masked. The stock attention processor would
  turn the mask into an additive attention mask, which changes the arithmetic of unpadded rows too; the
  processor installed here instead runs attention per group of rows of equal text length on the unpadded keys
  (SDPA is batch-invariant on this CPU), so a row's attention is what it would be alone.
* **Small-M GEMMs.** On this CPU a linear layer's output row is bit-identical across batch sizes only when the
  matmul has at least 4 rows (M = 1..3 take other kernels: measured with MKL on torch 2.13). Token-level linears
  always have M ≥ 4 (16+ image tokens, 6+ text tokens per row), but the timestep-conditioning linears
  (`time_text_embed`, `img_mod`, `txt_mod`, `norm_out`) see one row per image. They are applied per *segment*
  (one request's cond or uncond half, exactly the M `__call__` uses for that request), with all segments of
  ≥ 4 rows merged into one call (invariant there).

Outside an engine forward (`routing.current is None`) every patched module behaves exactly as before, so the
same transformer still works with diffusers' pipelines and training code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)
from peft.tuners.lora.layer import Linear as LoraLinear

MIN_INVARIANT_ROWS = 4
"""Smallest matmul row count whose per-row results do not depend on the row count (see the module docstring)."""

AdapterKey = tuple[str, float]
"""(peft adapter name, weight)."""


@dataclasses.dataclass(frozen=True)
class _Group:
    """Rows of a block that apply one (adapter, weight) at one stack position."""

    key: AdapterKey
    rows: torch.Tensor | None
    """Row indices within the block; None: every row of the block."""


@dataclasses.dataclass(frozen=True)
class _Block:
    """Rows computed by one matmul call, with their LoRA groups per stack position."""

    rows: slice | torch.Tensor
    """Rows of the forward's batch (a slice when contiguous)."""
    size: int
    positions: tuple[tuple[_Group, ...], ...]


def _groups(stacks: Sequence[tuple[AdapterKey, ...]], device) -> tuple[tuple[_Group, ...], ...]:
    depth = max((len(s) for s in stacks), default=0)
    positions = []
    for k in range(depth):
        by_key: dict[AdapterKey, list[int]] = {}
        for i, stack in enumerate(stacks):
            if k < len(stack):
                by_key.setdefault(stack[k], []).append(i)
        positions.append(tuple(
            _Group(key, None if len(rows) == len(stacks) else torch.tensor(rows, dtype=torch.long, device=device))
            for key, rows in by_key.items()
        ))
    return tuple(positions)


def _row_blocks(stacks: Sequence[tuple[AdapterKey, ...]], segments: Sequence[Sequence[int]], device
                ) -> tuple[_Block, ...]:
    """Blocks for a row-level (2D) input: every segment under MIN_INVARIANT_ROWS alone, the rest merged in one."""
    blocks, bulk = [], []
    for rows in segments:
        if len(rows) < MIN_INVARIANT_ROWS:
            picked = (slice(rows[0], rows[-1] + 1) if list(rows) == list(range(rows[0], rows[-1] + 1))
                      else torch.tensor(list(rows), dtype=torch.long, device=device))
            blocks.append(_Block(picked, len(rows), _groups([stacks[i] for i in rows], device)))
        else:
            bulk.extend(rows)
    if bulk:
        bulk = sorted(set(bulk))  # a shared tail row is in every segment
        rows = (slice(bulk[0], bulk[-1] + 1) if bulk == list(range(bulk[0], bulk[-1] + 1))
                else torch.tensor(bulk, dtype=torch.long, device=device))
        blocks.append(_Block(rows, len(bulk), _groups([stacks[i] for i in bulk], device)))
    return tuple(blocks)


class RowRouting:
    """What one forward's rows are: their LoRA stacks and their segments (rows of one request's CFG half).

    `doubled`: the transformer has Edit-2511's `zero_cond_t`, which runs its timestep conditioning over twice the
    rows (each row's timestep, then the same rows at t = 0, for the condition tokens). A request alone computes
    those as one matmul of 2n rows, its n rows at t then at 0, so each segment's doubled block is exactly that."""

    def __init__(self, stacks: Sequence[tuple[AdapterKey, ...]], segments: Sequence[tuple[int, int]], device,
                 doubled: bool = False, shared_tail: bool = False, split_rows: bool = True):
        """`split_rows` False (a compiled transformer, `EngineConfig.compile`): row-level inputs are never split by
        segment, and a batch whose rows share one stack is routed without reading its row count. The compiled
        block then holds no Python branch on the batch's shape or make-up, so a new row count or a new mix of
        requests does not recompile it; what is given up is the CPU's bit-exact batch invariance for timestep
        conditioning of fewer than MIN_INVARIANT_ROWS rows (compiled kernels have numerics of their own anyway)."""
        self.rows = rows = len(stacks)
        self.uniform = not split_rows and len(set(stacks)) <= 1
        """Every row has the same stack and nothing is split: one block, whatever the input's row count."""
        self.token_block = _Block(slice(0, rows), rows, _groups(stacks, device))
        self.row_blocks = (_row_blocks(stacks, [range(a, b) for a, b in segments], device) if split_rows
                           else (self.token_block,))
        self.whole_rows = len(self.row_blocks) == 1 and isinstance(self.row_blocks[0].rows, slice)
        """Row-level inputs need no splitting (one block covering every row)."""
        self.tail_blocks: tuple[_Block, ...] | None = None
        if shared_tail:
            # Qwen-Image-2.1's `causal_condition`: the timestep conditioning runs over the rows plus one t = 0 row
            # that every row's prefix tokens share. A request alone computes its n rows and that row as one matmul
            # of n + 1, so each segment's block is its rows and the tail (the tail's result is the same in every
            # block only where M ≥ 4; a forward that reads it, the prefix-extracting one, holds one segment).
            with_tail = [*stacks, ()]
            self.tail_blocks = _row_blocks(with_tail, [[*range(a, b), rows] for a, b in segments], device)
            self.whole_tail = len(self.tail_blocks) == 1 and isinstance(self.tail_blocks[0].rows, slice)
        self.doubled_blocks: tuple[_Block, ...] | None = None
        if doubled:
            twice = [*stacks, *stacks]
            self.doubled_token_block = _Block(slice(0, 2 * rows), 2 * rows, _groups(twice, device))
            self.doubled_blocks = (
                _row_blocks(twice, [[*range(a, b), *range(rows + a, rows + b)] for a, b in segments], device)
                if split_rows else (self.doubled_token_block,))
            self.whole_doubled = len(self.doubled_blocks) == 1 and isinstance(self.doubled_blocks[0].rows, slice)

    def blocks_for(self, x: torch.Tensor) -> tuple[_Block, ...] | None:
        """The blocks to compute `x` in, or None for one plain call (not a row-level input of this forward)."""
        # Each test reads the flags before the shape, so an unsplit (compiled) forward never branches on a size.
        if x.dim() != 2:
            return None
        if not self.whole_rows and x.shape[0] == self.rows:
            return self.row_blocks
        if self.doubled_blocks is not None and not self.whole_doubled and x.shape[0] == 2 * self.rows:
            return self.doubled_blocks
        if self.tail_blocks is not None and not self.whole_tail and x.shape[0] == self.rows + 1:
            return self.tail_blocks
        return None

    def token_block_for(self, x: torch.Tensor) -> _Block:
        """The one block covering every row of `x` (the doubled rows of a `zero_cond_t` conditioning input too)."""
        if self.uniform:
            return self.token_block  # its groups take every row, whatever their number
        if self.doubled_blocks is not None and x.dim() == 2 and x.shape[0] == 2 * self.rows:
            return self.doubled_token_block
        return self.token_block


class RoutingSlot:
    """The routing of the forward in progress (set by the engine around each forward; None otherwise)."""

    def __init__(self) -> None:
        self.current: RowRouting | None = None


def lora_scaling(layer: LoraLinear, adapter: str, weight: float) -> float:
    """peft's `set_scale(adapter, weight)`, the arithmetic `set_adapters` leaves in `layer.scaling`."""
    if layer.use_rslora.get(adapter, False):
        return weight * layer.lora_alpha[adapter] / math.sqrt(layer.r[adapter])
    return weight * layer.lora_alpha[adapter] / layer.r[adapter]


def _take(x: torch.Tensor, rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _lora_block(layer: LoraLinear, x: torch.Tensor, block: _Block) -> torch.Tensor:
    """Base output plus each row's LoRA stack for the rows of `x` (already the block's rows)."""
    result = layer.base_layer(x)
    result_dtype = result.dtype
    for groups in block.positions:
        for group in groups:
            name, weight = group.key
            if name not in layer.lora_A:
                continue
            lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
            rows_x = x if group.rows is None else x.index_select(0, group.rows)
            rows_x = layer._cast_input_dtype(rows_x, lora_A.weight.dtype)
            delta = lora_B(lora_A(layer.lora_dropout[name](rows_x))) * lora_scaling(layer, name, weight)
            if group.rows is None:
                result = result + delta
            else:
                result = result.index_add(0, group.rows, delta.to(result.dtype))
    return result.to(result_dtype)


def _split_rows(x: torch.Tensor, blocks: tuple[_Block, ...], compute) -> torch.Tensor:
    out = None
    for block in blocks:
        part = compute(_take(x, block.rows), block)
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[block.rows] = part
    return out


def _routed_lora_forward(layer: LoraLinear, slot: RoutingSlot, stock):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = slot.current
        if routing is None or args or kwargs or layer.disable_adapters or layer.merged:
            return stock(x, *args, **kwargs)
        blocks = routing.blocks_for(x)
        if blocks is None:
            return _lora_block(layer, x, routing.token_block_for(x))
        return _split_rows(x, blocks, lambda part, block: _lora_block(layer, part, block))
    return forward


def _routed_linear_forward(layer: torch.nn.Linear, slot: RoutingSlot, stock):
    def forward(x: torch.Tensor) -> torch.Tensor:
        routing = slot.current
        blocks = None if routing is None else routing.blocks_for(x)
        if blocks is None:
            return stock(x)
        return _split_rows(x, blocks, lambda part, block: stock(part))
    return forward


class RowwiseJointAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's joint attention, with padded text handled per group of rows of equal text length: each group
    attends over its own unpadded [text, image] sequence without a mask, as a row alone would. Without a text
    mask it is the stock processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states_mask is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, None, attention_mask,
                                    image_rotary_emb)
        return self._padded_text(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 image_rotary_emb)

    # Kept out of a compiled block (`EngineConfig.compile`): the per-length split reads the mask's values
    # (`.tolist()`), and traced it would give a graph per set of prompt lengths in a batch, past dynamo's limit.
    # Left to eager, it costs one graph break per block, and only when a batch mixes prompt lengths.
    @torch.compiler.disable
    def _padded_text(self, attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                     image_rotary_emb):
        head_dim = attn.inner_dim // attn.heads
        img_q = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_k = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_v = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)

        lengths = encoder_hidden_states_mask.sum(dim=1).tolist()
        img_out = img_q.new_empty(img_q.shape)
        txt_out = txt_q.new_zeros(txt_q.shape)
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            idx = torch.tensor(rows, dtype=torch.long, device=hidden_states.device)
            group = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else idx
            joint = dispatch_attention_fn(
                torch.cat([_take(txt_q, group)[:, :length], _take(img_q, group)], dim=1),
                torch.cat([_take(txt_k, group)[:, :length], _take(img_k, group)], dim=1),
                torch.cat([_take(txt_v, group)[:, :length], _take(img_v, group)], dim=1),
                attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
            txt_out[idx, :length] = joint[:, :length]
            img_out[idx] = joint[:, length:]
        img_hidden = img_out.flatten(2, 3).to(img_q.dtype)
        txt_hidden = txt_out.flatten(2, 3).to(txt_q.dtype)
        img_attn_output = attn.to_out[0](img_hidden.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        return img_attn_output, attn.to_add_out(txt_hidden.contiguous())


def install(transformer: torch.nn.Module, slot: RoutingSlot, rowwise_text: bool = True) -> None:
    """Give every LoRA and plain linear layer of `transformer` its routed forward and (`rowwise_text`: Qwen-Image's
    dual-stream transformer, whose rows may carry padded text) every attention block the row-wise processor.
    Qwen-Image-2.1's forwards hold rows of one sequence layout (no padding), so its own processor stays.
    Idempotent; call again after adapters are loaded or deleted (peft adds and removes LoRA wrappers around linear
    layers)."""
    uninstall(transformer)
    # A LoRA layer's own linears (its base layer, lora_A, lora_B) run inside its routed forward, on rows it has
    # already split; only linears outside LoRA layers need the row-level split of their own.
    inside_lora = {id(m) for layer in transformer.modules() if isinstance(layer, LoraLinear)
                   for m in layer.modules() if m is not layer}
    for module in transformer.modules():
        if isinstance(module, LoraLinear):
            module.forward = _routed_lora_forward(module, slot, module.forward)
        elif isinstance(module, torch.nn.Linear) and id(module) not in inside_lora:
            module.forward = _routed_linear_forward(module, slot, module.forward)
    if rowwise_text and not isinstance(next(iter(transformer.attn_processors.values())), RowwiseJointAttnProcessor):
        transformer.set_attn_processor(RowwiseJointAttnProcessor())


def uninstall(transformer: torch.nn.Module) -> None:
    """Back to the modules' class forwards (the attention processor stays: without a mask it is the stock one)."""
    for module in transformer.modules():
        if "forward" in module.__dict__:
            del module.forward
