"""Spans of a step in one Triton launch, from a :class:`~bidiattn.blocks.BlockList`.

The same intervals as :func:`bidiattn.rules.build_rule` (the spec: ~40 PyTorch ops from
per-token block ids). Here each lane takes one query row, binary-searches
its sequence in ``cu_seqlens`` and its block in the sequence's slice of the block list, and
writes ``lo``/``hi`` with the rule's formula. No host sync, fixed-size buffers: CUDA-graph safe.
"""

from __future__ import annotations

from typing import Protocol

import torch
import triton
import triton.language as tl

from ..blocks import BlockList
from .indexing import last_at_most

__all__ = ["build_spans_triton"]

_CHUNK = 1024
_BLOCKS = {"none": 0, "all": 1, "short": 2}
_WINDOW = {"none": 0, "left": 1, "sym": 2}


class RuleFields(Protocol):
    """The fields of a :class:`bidiattn.rules.Rule` the kernel reads (typed structurally, so this
    module does not import ``rules``, which imports it)."""

    blocks: str
    window: str
    window_scope: str


@triton.jit
def _build_spans_kernel(
    starts, ends, cu_blocks, cu_q, cu_k, lo_out, hi_out, total, num_seq, window,
    BLOCKS: tl.constexpr, WINDOW: tl.constexpr, SCOPE_CAUSAL: tl.constexpr,
    SEQ_STEPS: tl.constexpr, BLOCK_STEPS: tl.constexpr, CHUNK: tl.constexpr,
):
    o_t = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    ok = o_t < total
    a = last_at_most(cu_q, o_t, num_seq, ok, SEQ_STEPS)
    bos = tl.load(cu_q + a, mask=ok, other=0)
    q_len = tl.load(cu_q + a + 1, mask=ok, other=0) - bos
    k_len = tl.load(cu_k + a + 1, mask=ok, other=0) - tl.load(cu_k + a, mask=ok, other=0)
    pos = o_t - bos + k_len - q_len
    # Block: the first entry of the sequence's slice whose start is past pos; its predecessor
    # is the only block that can hold pos. Indices stay >= 0 (integer // truncates).
    j_lo = tl.load(cu_blocks + a, mask=ok, other=0)
    j_hi = tl.load(cu_blocks + a + 1, mask=ok, other=0)
    first = j_lo
    for _ in range(BLOCK_STEPS):
        active = j_lo < j_hi
        mid = (j_lo + j_hi) // 2
        before = tl.load(starts + mid, mask=ok & active, other=0) <= pos
        j_lo = tl.where(active & before, mid + 1, j_lo)
        j_hi = tl.where(active & ~before, mid, j_hi)
    found = ok & (j_lo > first)
    j = tl.where(found, j_lo - 1, 0)
    s = tl.load(starts + j, mask=found, other=0).to(tl.int64)
    e = tl.load(ends + j, mask=found, other=0).to(tl.int64) - 1
    in_block = found & (pos <= e)
    # The interval formulas of bidiattn.rules (module doc), one branch per rule field.
    if BLOCKS == 0:
        honoured = tl.zeros([CHUNK], tl.int1)
    elif BLOCKS == 2:
        honoured = in_block & (e - s + 1 <= window)
    else:
        honoured = in_block
    if WINDOW == 0:
        left = tl.zeros([CHUNK], tl.int64)
    else:
        left = tl.maximum(pos - window + 1, 0)
    if WINDOW == 0:
        block_lo = tl.zeros([CHUNK], tl.int64)
        block_hi = e
    elif SCOPE_CAUSAL:
        block_lo = tl.minimum(left, s)
        block_hi = e
    elif WINDOW == 1:
        block_lo = left
        block_hi = e
    else:
        block_lo = left
        block_hi = tl.minimum(e, pos + window - 1)
    tl.store(lo_out + o_t, tl.where(honoured, block_lo, left).to(tl.int32), mask=ok)
    tl.store(hi_out + o_t, tl.where(honoured, block_hi, pos).to(tl.int32), mask=ok)


def build_spans_triton(rule: RuleFields, blocks: BlockList, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor,
                       total: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(lo, hi)`` ``[total]`` of the step's rows (inputs validated by the caller)."""
    lo = torch.empty(total, dtype=torch.int32, device=cu_seqlens.device)
    hi = torch.empty_like(lo)
    num_seq = cu_seqlens.numel() - 1
    _build_spans_kernel[(triton.cdiv(total, _CHUNK),)](
        blocks.starts, blocks.ends, blocks.cu_blocks, cu_seqlens, cu_seqlens_k, lo, hi, total, num_seq,
        window if window is not None else 1,
        BLOCKS=_BLOCKS[rule.blocks], WINDOW=_WINDOW[rule.window], SCOPE_CAUSAL=rule.window_scope == "causal",
        SEQ_STEPS=max(1, (num_seq - 1).bit_length()), BLOCK_STEPS=max(1, blocks.capacity.bit_length()),
        CHUNK=_CHUNK,
    )
    return lo, hi
