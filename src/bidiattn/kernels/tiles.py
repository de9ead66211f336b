"""Tile tables and longest-first launch orders, two Triton launches per table.

The kernels' launchers need, per tile, where it lies and which keys (query rows) it meets, plus
an order that starts the longest tiles first. The specs are PyTorch code:
:meth:`SpanMask.tile_summary` for query tiles, :func:`key_tile_ranges_spec` for the key tiles of
the backward's dK/dV pass, and a stable descending ``argsort`` of the work for the order.

Why kernels: in PyTorch ops, planning is a handful of small launches and an argsort per table,
enough host time to make unplanned calls host-bound. Here a table kernel (each program: a chunk
of tiles, locating them by a scan over the sequences) and an order kernel (a counting sort); no
host sync. Two launches, not one single-program launch, which is slow on the GPU at long
sequences.

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
from .indexing import count_below

__all__ = ["KeyTiles", "query_tiles", "key_tiles", "key_tile_ranges_spec"]

_CHUNK = 128
_SEQ_CHUNK = 16
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
def _locate(cu, cu_other, idx, num_seq, BLOCK: tl.constexpr, SEQ_CHUNK: tl.constexpr):
    """For tile lanes ``idx`` (tiles of ``BLOCK`` entries of ``cu``'s axis, sequence by sequence):
    the tile's sequence, that sequence's first tile, the real tile count, and the longest
    sequence on ``cu_other``'s axis (the scale of a tile's work). A scan over all sequences per
    program, so the programs need no prefix sum from another launch."""
    # Tile indices in int32 (a table's capacity is far below 2**31): the [tiles, sequences]
    # comparison is the kernel's largest value, and int64 would double its registers.
    count = tl.zeros(idx.shape, tl.int32)
    first = tl.zeros(idx.shape, tl.int32)
    carry = tl.full([], 0, tl.int32)
    longest = tl.full([], 0, tl.int64)
    for c in range(0, tl.cdiv(num_seq, SEQ_CHUNK)):
        s = c * SEQ_CHUNK + tl.arange(0, SEQ_CHUNK)
        ok = s < num_seq
        n = ((tl.load(cu + s + 1, mask=ok, other=0) - tl.load(cu + s, mask=ok, other=0) + BLOCK - 1) // BLOCK).to(tl.int32)
        start = carry + tl.cumsum(n, 0) - n
        # The owner of a tile is the last sequence starting at or before it (empty sequences
        # start where the next one does, and lose to it).
        hit = ok[None, :] & (start[None, :] <= idx[:, None])
        count += tl.sum(hit.to(tl.int32), 1)
        first = tl.maximum(first, tl.max(tl.where(hit, start[None, :], 0), 1))
        carry += tl.sum(n, 0)
        other = tl.load(cu_other + s + 1, mask=ok, other=0) - tl.load(cu_other + s, mask=ok, other=0)
        longest = tl.maximum(longest, tl.max(other, 0))
    return tl.maximum(count - 1, 0), first, carry, longest


@triton.jit
def _work_class(work, longest, ok, CLASSES: tl.constexpr):
    """Class of a tile's work in ``[0, longest]``, 0 for the longest slice; ``CLASSES`` (no
    class) on lanes outside the table."""
    c = (CLASSES - 1) - (tl.maximum(work, 0).to(tl.int64) * CLASSES) // (longest + 1)
    return tl.where(ok, c, CLASSES)


@triton.jit
def _store_classes(cls, classes, counts, idx, in_grid, CLASSES: tl.constexpr):
    """Each tile's class, and this program's count per class (row ``program_id`` of ``counts``).
    A histogram, not a sum over a [tiles, classes] one-hot matrix, which would hold the whole
    matrix in registers."""
    tl.store(classes + idx, cls.to(tl.int32), mask=in_grid)
    tl.store(counts + tl.program_id(0) * CLASSES + tl.arange(0, CLASSES),
             tl.histogram(cls.to(tl.int32), CLASSES, mask=in_grid))


@triton.jit
def _order_kernel(classes, counts, order, capacity, num_programs, CLASSES: tl.constexpr, CHUNK: tl.constexpr,
                  ROWS: tl.constexpr):
    """Counting sort of the tiles by class, stable: ``order[p]`` is the tile launched ``p``-th.
    Program ``i`` places the tiles the table kernel's program ``i`` classified: a tile's place
    is its class's start, plus the tiles of its class in earlier programs, plus those before it
    in its own chunk."""
    i_p = tl.program_id(0)
    o_c = tl.arange(0, CLASSES)
    total = tl.zeros([CLASSES], tl.int32)
    before = tl.zeros([CLASSES], tl.int32)
    for r in range(0, tl.cdiv(num_programs, ROWS)):
        o_r = r * ROWS + tl.arange(0, ROWS)
        b_n = tl.load(counts + o_r[:, None] * CLASSES + o_c[None, :], mask=(o_r < num_programs)[:, None], other=0)
        total += tl.sum(b_n, 0)
        before += tl.sum(tl.where((o_r < i_p)[:, None], b_n, 0), 0)
    base = tl.cumsum(total, 0) - total + before
    idx = i_p * CHUNK + tl.arange(0, CHUNK)
    ok = idx < capacity
    hot = (tl.load(classes + idx, mask=ok, other=CLASSES)[:, None] == o_c[None, :]).to(tl.int32)
    rank = tl.sum(hot * tl.cumsum(hot, 0), 1) - 1
    tl.store(order + tl.sum(hot * base[None, :], 1) + rank, idx, mask=ok)


@triton.jit
def _tile_entries(cu, cu_other, t_seq, t_start, t_count, capacity, num_seq, BLOCK: tl.constexpr,
                  CHUNK: tl.constexpr, SEQ_CHUNK: tl.constexpr):
    """This program's chunk of tiles of ``BLOCK`` entries on ``cu``'s axis: stores each tile's
    sequence, first entry (local) and entry count, and returns ``(idx, in_grid, real, seq,
    bos, start, count, total, longest)`` (``bos``: the sequence's offset on ``cu``'s axis;
    ``total``/``longest`` as in :func:`_locate`)."""
    idx = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    in_grid = idx < capacity
    seq, first_tile, total, longest = _locate(cu, cu_other, idx, num_seq, BLOCK, SEQ_CHUNK)
    real = in_grid & (idx < total)
    bos = tl.load(cu + seq, mask=real, other=0)
    start = (idx - first_tile) * BLOCK
    count = tl.minimum(tl.maximum(tl.load(cu + seq + 1, mask=real, other=0) - bos - start, 0), BLOCK)
    tl.store(t_seq + idx, tl.where(real, seq, 0).to(tl.int32), mask=in_grid)
    tl.store(t_start + idx, tl.where(real, start, 0).to(tl.int32), mask=in_grid)
    tl.store(t_count + idx, tl.where(real, count, 0).to(tl.int32), mask=in_grid)
    return idx, in_grid, real, seq, bos, start, count, total, longest


@triton.jit
def _query_tiles_kernel(
    cu, cu_k, lo, hi, t_seq, t_start, t_rows, t_lo_min, t_lo_max, t_hi_min, t_hi_max, classes, counts, num_tiles,
    capacity, num_seq, BLOCK: tl.constexpr, CLASSES: tl.constexpr, CHUNK: tl.constexpr, SEQ_CHUNK: tl.constexpr,
):
    idx, in_grid, real, seq, bos, start, rows, total, longest = _tile_entries(
        cu, cu_k, t_seq, t_start, t_rows, capacity, num_seq, BLOCK, CHUNK, SEQ_CHUNK)
    if tl.program_id(0) == 0:
        tl.store(num_tiles, total.to(tl.int64))
    first = bos + start
    last = first + rows - 1
    lo_min = tl.load(lo + first, mask=real, other=0)
    hi_max = tl.load(hi + last, mask=real, other=0)
    tl.store(t_lo_min + idx, lo_min.to(tl.int32), mask=in_grid)
    tl.store(t_lo_max + idx, tl.load(lo + last, mask=real, other=0).to(tl.int32), mask=in_grid)
    tl.store(t_hi_min + idx, tl.load(hi + first, mask=real, other=0).to(tl.int32), mask=in_grid)
    tl.store(t_hi_max + idx, hi_max.to(tl.int32), mask=in_grid)
    cls = _work_class(tl.where(real, hi_max - lo_min + 1, 0), longest, in_grid, CLASSES)
    _store_classes(cls, classes, counts, idx, in_grid, CLASSES)


@triton.jit
def _key_tiles_kernel(
    cu, cu_k, lo, hi, t_seq, t_start, t_keys, t_q_first, t_q_last, classes, counts, capacity, num_seq,
    BLOCK: tl.constexpr, ROW_STEPS: tl.constexpr, CLASSES: tl.constexpr, CHUNK: tl.constexpr,
    SEQ_CHUNK: tl.constexpr,
):
    idx, in_grid, real, seq, _, start, keys, _, longest = _tile_entries(
        cu_k, cu, t_seq, t_start, t_keys, capacity, num_seq, BLOCK, CHUNK, SEQ_CHUNK)
    bos = tl.load(cu + seq, mask=real, other=0)
    rows = tl.load(cu + seq + 1, mask=real, other=0) - bos
    # Bounds are non-decreasing inside a sequence: the rows with hi >= the tile's first key
    # are a suffix, those with lo <= its last key a prefix.
    q_first = tl.where(real, count_below(hi + bos, rows, start, real, ROW_STEPS), 0)
    q_last = tl.where(real, count_below(lo + bos, rows, start + keys, real, ROW_STEPS) - 1, -1)
    tl.store(t_q_first + idx, q_first.to(tl.int32), mask=in_grid)
    tl.store(t_q_last + idx, q_last.to(tl.int32), mask=in_grid)
    cls = _work_class(tl.where(real & (keys > 0), q_last - q_first + 1, 0), longest, in_grid, CLASSES)
    _store_classes(cls, classes, counts, idx, in_grid, CLASSES)


def _tables(fields: int, capacity: int, device: torch.device):
    """One allocation for a table kernel and the order kernel: ``fields`` int32 ``[capacity]``
    table rows, the tiles' classes, the order, and the per-program class counts."""
    programs = triton.cdiv(capacity, _CHUNK)
    arrays = torch.empty((fields + 2) * capacity + programs * _CLASSES, dtype=torch.int32, device=device)
    *rows, classes, order = arrays[: (fields + 2) * capacity].view(fields + 2, capacity)
    return rows, classes, order, arrays[(fields + 2) * capacity :].view(programs, _CLASSES)


def _capacity(spans: SpanMask, block: int, name: str, total: int) -> tuple[int, int]:
    """Checked arguments of a table: the sequence count and the table's fixed capacity (every
    sequence's tiles of ``block`` entries over ``total`` entries, at most one partial each)."""
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{name} must be a positive int, got {block!r}")
    return spans.num_sequences, -(-total // block) + spans.num_sequences


def _order(classes: torch.Tensor, counts: torch.Tensor, order: torch.Tensor, capacity: int) -> None:
    programs = counts.shape[0]
    _order_kernel[(programs,)](classes, counts, order, capacity, programs, CLASSES=_CLASSES, CHUNK=_CHUNK, ROWS=32)


def query_tiles(spans: SpanMask, block_m: int) -> tuple[TileSummary, torch.Tensor]:
    """:meth:`SpanMask.tile_summary` of ``block_m`` rows and the longest-first launch order
    (int32 ``[capacity]``, a permutation of the tiles, padding last), in two launches (CUDA, or
    the Triton interpreter); no host sync."""
    num_seq, capacity = _capacity(spans, block_m, "block_m", spans.total_tokens)
    table, classes, order, counts = _tables(7, capacity, spans.lo.device)
    num_tiles = torch.empty((), dtype=torch.int64, device=spans.lo.device)
    _query_tiles_kernel[(counts.shape[0],)](
        spans.cu_seqlens, spans.cu_seqlens_k, spans.lo, spans.hi, *table, classes, counts, num_tiles, capacity,
        num_seq, BLOCK=block_m, CLASSES=_CLASSES, CHUNK=_CHUNK, SEQ_CHUNK=_SEQ_CHUNK,
    )
    _order(classes, counts, order, capacity)
    return TileSummary(block_m, *table, num_tiles), order


def key_tiles(spans: SpanMask, block_n: int) -> tuple[KeyTiles, torch.Tensor]:
    """Tiles of ``block_n`` keys with the query rows that see them (:class:`KeyTiles`, as
    :func:`key_tile_ranges_spec`) and their longest-first launch order, in two launches; no
    host sync."""
    num_seq, capacity = _capacity(spans, block_n, "block_n", spans.total_keys)
    table, classes, order, counts = _tables(5, capacity, spans.lo.device)
    _key_tiles_kernel[(counts.shape[0],)](
        spans.cu_seqlens, spans.cu_seqlens_k, spans.lo, spans.hi, *table, classes, counts, capacity, num_seq,
        BLOCK=block_n, ROW_STEPS=max(1, spans.total_tokens.bit_length()), CLASSES=_CLASSES, CHUNK=_CHUNK,
        SEQ_CHUNK=_SEQ_CHUNK,
    )
    _order(classes, counts, order, capacity)
    return KeyTiles(*table), order


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
