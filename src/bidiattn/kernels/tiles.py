"""Tile summaries in one Triton launch: the same arrays as :meth:`SpanMask.tile_summary` (the
spec, written in ~20 PyTorch ops), for the kernels' launchers.

Why: the PyTorch version costs about 320 µs of host time per call (measured on an H200 host,
`benchmarks/launch_overhead.py`), which dominated a decode step at 8K context. Here: three
small PyTorch ops for the per-sequence tile offsets, then one kernel where each lane binary-
searches its sequence and gathers its bounds. No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spans import SpanMask, TileSummary
from .indexing import last_at_most

__all__ = ["fast_tile_summary"]

_CHUNK = 128


@triton.jit
def _tile_summary_kernel(
    cu, tile_off, lo, hi, t_seq, t_start, t_rows, t_lo_min, t_lo_max, t_hi_min, t_hi_max,
    capacity, num_seq, BLOCK: tl.constexpr, STEPS: tl.constexpr, CHUNK: tl.constexpr,
):
    idx = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    in_grid = idx < capacity
    real = in_grid & (idx < tl.load(tile_off + num_seq))
    seq = last_at_most(tile_off, idx, num_seq, real, STEPS)
    bos = tl.load(cu + seq, mask=real, other=0)
    length = tl.load(cu + seq + 1, mask=real, other=0) - bos
    start = (idx - tl.load(tile_off + seq, mask=real, other=0)) * BLOCK
    rows = tl.minimum(tl.maximum(length - start, 0), BLOCK)
    first = bos + start
    last = first + rows - 1
    zero = tl.zeros([CHUNK], tl.int32)
    tl.store(t_seq + idx, tl.where(real, seq.to(tl.int32), zero), mask=in_grid)
    tl.store(t_start + idx, tl.where(real, start.to(tl.int32), zero), mask=in_grid)
    tl.store(t_rows + idx, tl.where(real, rows.to(tl.int32), zero), mask=in_grid)
    tl.store(t_lo_min + idx, tl.load(lo + first, mask=real, other=0).to(tl.int32), mask=in_grid)
    tl.store(t_lo_max + idx, tl.load(lo + last, mask=real, other=0).to(tl.int32), mask=in_grid)
    tl.store(t_hi_min + idx, tl.load(hi + first, mask=real, other=0).to(tl.int32), mask=in_grid)
    tl.store(t_hi_max + idx, tl.load(hi + last, mask=real, other=0).to(tl.int32), mask=in_grid)


def fast_tile_summary(spans: SpanMask, block_m: int) -> TileSummary:
    """:meth:`SpanMask.tile_summary` in one kernel launch (CUDA, or the Triton interpreter)."""
    if not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")
    cu = spans.cu_seqlens
    num_seq = spans.num_sequences
    tile_off = torch.nn.functional.pad(torch.cumsum((cu[1:] - cu[:-1] + block_m - 1) // block_m, 0), (1, 0))
    capacity = -(-spans.total_tokens // block_m) + num_seq
    arrays = torch.empty(7, capacity, dtype=torch.int32, device=cu.device)
    _tile_summary_kernel[(triton.cdiv(capacity, _CHUNK),)](
        cu, tile_off, spans.lo, spans.hi, *arrays, capacity, num_seq,
        BLOCK=block_m, STEPS=max(1, (num_seq - 1).bit_length()), CHUNK=_CHUNK,
    )
    seq, start, rows, lo_min, lo_max, hi_min, hi_max = arrays
    return TileSummary(block_m, seq, start, rows, lo_min, lo_max, hi_min, hi_max, tile_off[-1])
