"""Tile tables and longest-first launch orders, each in one Triton launch.

The kernels' launchers need, per tile, where it lies and which keys (query rows) it meets, plus
an order that starts the longest tiles first. The specs are PyTorch code:
:meth:`SpanMask.tile_summary` for query tiles, :func:`key_tile_ranges_spec` for the key tiles of
the backward's dK/dV pass, and a stable descending ``argsort`` of the work for the order.

Why one launch: the PyTorch versions cost about 320 µs of host time per plan (tile summary),
then a multi-launch version 116 µs for the summary plus 75 µs for the ``argsort`` and 404 µs
for the key tiles (H200 host, ``results/host-breakdown-*``), which made an unplanned sliding
call host-bound. Here one program (tiles number ``T / block`` plus the sequence count, a few
thousand at 128K tokens) walks the sequences, then the tiles in chunks, then sorts them by
counting, with no host sync.

The order is longest-first in ``_CLASSES`` work classes: a tile's work (keys it walks, or rows
for a key tile) falls in class ``c`` of ``_CLASSES`` equal slices of ``[0, longest possible]``
(the longest sequence), longest class first, tile index order inside a class. Only the schedule
depends on it, never a value the kernels compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..spans import SpanMask, TileSummary
from .indexing import last_at_most

__all__ = ["KeyTiles", "query_tiles", "key_tiles", "key_tile_ranges_spec"]

_CHUNK = 128
_CLASSES = 64


@dataclass(frozen=True)
class KeyTiles:
    """Key tiles of ``block_n`` keys of one sequence, with the local query rows that see them.

    Same fixed capacity as :class:`~bidiattn.spans.TileSummary` (over the keys); int32
    ``[capacity]`` each: ``seq``, ``key_start`` (local), ``keys`` (0 for padding),
    ``q_first``/``q_last`` (local, inclusive; every row outside the range has no allowed key in
    the tile; ``q_last = q_first - 1`` where no row does, and ``0, -1`` on padding tiles).
    """

    seq: torch.Tensor
    key_start: torch.Tensor
    keys: torch.Tensor
    q_first: torch.Tensor
    q_last: torch.Tensor


@triton.jit
def _tile_offsets(cu, cu_other, tile_off, num_seq, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """``tile_off[s]``: the first tile of sequence ``s`` (tiles of ``BLOCK`` entries of ``cu``'s
    axis); returns the longest sequence on ``cu_other``'s axis (the scale of a tile's work)."""
    carry = tl.full([], 0, tl.int64)
    longest = tl.full([], 0, tl.int64)
    tl.store(tile_off, carry)
    for c in range(0, tl.cdiv(num_seq, CHUNK)):
        s = c * CHUNK + tl.arange(0, CHUNK)
        ok = s < num_seq
        length = tl.load(cu + s + 1, mask=ok, other=0) - tl.load(cu + s, mask=ok, other=0)
        other = tl.load(cu_other + s + 1, mask=ok, other=0) - tl.load(cu_other + s, mask=ok, other=0)
        tl.store(tile_off + s + 1, carry + tl.cumsum((length + BLOCK - 1) // BLOCK, 0), mask=ok)
        carry += tl.sum((length + BLOCK - 1) // BLOCK, 0)
        longest = tl.maximum(longest, tl.max(other, 0))
    # Every thread of the program reads these offsets back (binary searches).
    tl.debug_barrier()
    return longest


@triton.jit
def _work_class(work, longest, ok, CLASSES: tl.constexpr):
    """Class of a tile's work in ``[0, longest]``, 0 for the longest slice; ``CLASSES`` (no
    class) on lanes outside the table."""
    c = (CLASSES - 1) - (tl.maximum(work, 0).to(tl.int64) * CLASSES) // (longest + 1)
    return tl.where(ok, c, CLASSES)


@triton.jit
def _class_counts(cls, CLASSES: tl.constexpr):
    hot = (cls[:, None] == tl.arange(0, CLASSES)[None, :]).to(tl.int32)
    return hot, tl.sum(hot, 0)


@triton.jit
def _order_by_class(classes, order, capacity, counts, CLASSES: tl.constexpr, CHUNK: tl.constexpr):
    """Counting sort of the tiles by class (stable): ``order[p]`` is the tile launched ``p``-th."""
    # The classes were stored by other threads of the program.
    tl.debug_barrier()
    taken = tl.cumsum(counts, 0) - counts
    for c in range(0, tl.cdiv(capacity, CHUNK)):
        idx = c * CHUNK + tl.arange(0, CHUNK)
        ok = idx < capacity
        hot, chunk_counts = _class_counts(tl.load(classes + idx, mask=ok, other=CLASSES), CLASSES)
        rank = tl.sum(hot * tl.cumsum(hot, 0), 1) - 1
        pos = tl.sum(hot * taken[None, :], 1) + rank
        tl.store(order + pos, idx, mask=ok)
        taken += chunk_counts


@triton.jit
def _query_tiles_kernel(
    cu, cu_k, tile_off, lo, hi, t_seq, t_start, t_rows, t_lo_min, t_lo_max, t_hi_min, t_hi_max, classes, order,
    num_tiles, capacity, num_seq, BLOCK: tl.constexpr, STEPS: tl.constexpr, CLASSES: tl.constexpr,
    CHUNK: tl.constexpr,
):
    longest = _tile_offsets(cu, cu_k, tile_off, num_seq, BLOCK, CHUNK)
    total = tl.load(tile_off + num_seq)
    tl.store(num_tiles, total)
    counts = tl.zeros([CLASSES], tl.int32)
    for c in range(0, tl.cdiv(capacity, CHUNK)):
        idx = c * CHUNK + tl.arange(0, CHUNK)
        in_grid = idx < capacity
        real = in_grid & (idx < total)
        seq = last_at_most(tile_off, idx, num_seq, real, STEPS)
        bos = tl.load(cu + seq, mask=real, other=0)
        length = tl.load(cu + seq + 1, mask=real, other=0) - bos
        start = (idx - tl.load(tile_off + seq, mask=real, other=0)) * BLOCK
        rows = tl.minimum(tl.maximum(length - start, 0), BLOCK)
        first = bos + start
        last = first + rows - 1
        lo_min = tl.load(lo + first, mask=real, other=0)
        hi_max = tl.load(hi + last, mask=real, other=0)
        tl.store(t_seq + idx, tl.where(real, seq, 0).to(tl.int32), mask=in_grid)
        tl.store(t_start + idx, tl.where(real, start, 0).to(tl.int32), mask=in_grid)
        tl.store(t_rows + idx, tl.where(real, rows, 0).to(tl.int32), mask=in_grid)
        tl.store(t_lo_min + idx, lo_min.to(tl.int32), mask=in_grid)
        tl.store(t_lo_max + idx, tl.load(lo + last, mask=real, other=0).to(tl.int32), mask=in_grid)
        tl.store(t_hi_min + idx, tl.load(hi + first, mask=real, other=0).to(tl.int32), mask=in_grid)
        tl.store(t_hi_max + idx, hi_max.to(tl.int32), mask=in_grid)
        cls = _work_class(tl.where(real, hi_max - lo_min + 1, 0), longest, in_grid, CLASSES)
        tl.store(classes + idx, cls.to(tl.int32), mask=in_grid)
        _, chunk_counts = _class_counts(cls, CLASSES)
        counts += chunk_counts
    _order_by_class(classes, order, capacity, counts, CLASSES, CHUNK)


@triton.jit
def _count_below(values, n, x, mask, STEPS: tl.constexpr):
    """Per lane, how many of ``values[0:n]`` (non-decreasing; each lane its own base and ``n``)
    are below ``x``: a lower-bound binary search of ``STEPS >= ceil(log2(n + 1))`` steps."""
    a = (x * 0).to(tl.int64)
    b = a + n
    for _ in range(STEPS):
        mid = (a + b) // 2
        below = (tl.load(values + mid, mask=mask & (mid < b), other=0) < x) & (mid < b)
        a = tl.where(below, mid + 1, a)
        b = tl.where(below, b, mid)
    return a


@triton.jit
def _key_tiles_kernel(
    cu, cu_k, tile_off, lo, hi, t_seq, t_start, t_keys, t_q_first, t_q_last, classes, order, capacity, num_seq,
    BLOCK: tl.constexpr, STEPS: tl.constexpr, ROW_STEPS: tl.constexpr, CLASSES: tl.constexpr, CHUNK: tl.constexpr,
):
    longest = _tile_offsets(cu_k, cu, tile_off, num_seq, BLOCK, CHUNK)
    total = tl.load(tile_off + num_seq)
    counts = tl.zeros([CLASSES], tl.int32)
    for c in range(0, tl.cdiv(capacity, CHUNK)):
        idx = c * CHUNK + tl.arange(0, CHUNK)
        in_grid = idx < capacity
        real = in_grid & (idx < total)
        seq = last_at_most(tile_off, idx, num_seq, real, STEPS)
        length_k = tl.load(cu_k + seq + 1, mask=real, other=0) - tl.load(cu_k + seq, mask=real, other=0)
        start = (idx - tl.load(tile_off + seq, mask=real, other=0)) * BLOCK
        keys = tl.minimum(tl.maximum(length_k - start, 0), BLOCK)
        bos = tl.load(cu + seq, mask=real, other=0)
        rows = tl.load(cu + seq + 1, mask=real, other=0) - bos
        # Bounds are non-decreasing inside a sequence: the rows with hi >= the tile's first key
        # are a suffix, those with lo <= its last key a prefix.
        q_first = _count_below(hi + bos, rows, start, real, ROW_STEPS)
        q_last = _count_below(lo + bos, rows, start + keys, real, ROW_STEPS) - 1
        q_first = tl.where(real, q_first, 0)
        q_last = tl.where(real, q_last, -1)
        tl.store(t_seq + idx, tl.where(real, seq, 0).to(tl.int32), mask=in_grid)
        tl.store(t_start + idx, tl.where(real, start, 0).to(tl.int32), mask=in_grid)
        tl.store(t_keys + idx, tl.where(real, keys, 0).to(tl.int32), mask=in_grid)
        tl.store(t_q_first + idx, q_first.to(tl.int32), mask=in_grid)
        tl.store(t_q_last + idx, q_last.to(tl.int32), mask=in_grid)
        cls = _work_class(tl.where(real & (keys > 0), q_last - q_first + 1, 0), longest, in_grid, CLASSES)
        tl.store(classes + idx, cls.to(tl.int32), mask=in_grid)
        _, chunk_counts = _class_counts(cls, CLASSES)
        counts += chunk_counts
    _order_by_class(classes, order, capacity, counts, CLASSES, CHUNK)


def _steps(n: int) -> int:
    """Binary-search steps that cover ``n + 1`` outcomes."""
    return max(1, n.bit_length())


def query_tiles(spans: SpanMask, block_m: int) -> tuple[TileSummary, torch.Tensor]:
    """:meth:`SpanMask.tile_summary` of ``block_m`` rows and the longest-first launch order
    (int32 ``[capacity]``, a permutation of the tiles, padding last), in one launch (CUDA, or
    the Triton interpreter); no host sync."""
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")
    num_seq = spans.num_sequences
    capacity = -(-spans.total_tokens // block_m) + num_seq
    device = spans.lo.device
    arrays = torch.empty(9, capacity, dtype=torch.int32, device=device)
    scratch = torch.empty(num_seq + 2, dtype=torch.int64, device=device)
    tile_off, num_tiles = scratch[: num_seq + 1], scratch[num_seq + 1]
    _query_tiles_kernel[(1,)](
        spans.cu_seqlens, spans.cu_seqlens_k, tile_off, spans.lo, spans.hi, *arrays, num_tiles, capacity, num_seq,
        BLOCK=block_m, STEPS=_steps(num_seq - 1), CLASSES=_CLASSES, CHUNK=_CHUNK,
    )
    seq, start, rows, lo_min, lo_max, hi_min, hi_max, _, order = arrays
    return TileSummary(block_m, seq, start, rows, lo_min, lo_max, hi_min, hi_max, num_tiles), order


def key_tiles(spans: SpanMask, block_n: int) -> tuple[KeyTiles, torch.Tensor]:
    """Tiles of ``block_n`` keys with the query rows that see them (:class:`KeyTiles`, as
    :func:`key_tile_ranges_spec`) and their longest-first launch order, in one launch; no host
    sync."""
    if isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 1:
        raise ValueError(f"block_n must be a positive int, got {block_n!r}")
    num_seq = spans.num_sequences
    capacity = -(-spans.total_keys // block_n) + num_seq
    device = spans.lo.device
    arrays = torch.empty(7, capacity, dtype=torch.int32, device=device)
    tile_off = torch.empty(num_seq + 1, dtype=torch.int64, device=device)
    _key_tiles_kernel[(1,)](
        spans.cu_seqlens, spans.cu_seqlens_k, tile_off, spans.lo, spans.hi, *arrays, capacity, num_seq,
        BLOCK=block_n, STEPS=_steps(num_seq - 1), ROW_STEPS=_steps(spans.total_tokens), CLASSES=_CLASSES,
        CHUNK=_CHUNK,
    )
    seq, start, keys, q_first, q_last, _, order = arrays
    return KeyTiles(seq, start, keys, q_first, q_last), order


def key_tile_ranges_spec(spans: SpanMask, block_n: int) -> KeyTiles:
    """The spec of :func:`key_tiles`' table in PyTorch: two binary searches over the packed
    bounds (which are non-decreasing over the whole pack); no host sync."""
    seq, key_start, keys = spans.key_tiles(block_n)
    glo, ghi = spans.packed_bounds()
    k_first = spans.cu_seqlens_k[seq.long()] + key_start.long()
    k_last = k_first + keys.long() - 1
    bos = spans.cu_seqlens[seq.long()]
    q_first = torch.searchsorted(ghi.contiguous(), k_first, right=False) - bos
    q_last = torch.searchsorted(glo.contiguous(), k_last, right=True) - 1 - bos
    return KeyTiles(seq, key_start, keys, q_first.to(torch.int32), q_last.to(torch.int32))
