"""The masked FA4 launch's block-sparsity tables in one Triton launch (no host sync).

FA4's block sparsity lists, per query block, the key blocks it visits that are partial (the mask
function runs there) and full (no mask), and per key block the query blocks (the backward's).
The spans' packed bounds are non-decreasing, so for query block ``b`` (rows ``first..last``) the
visited key blocks are ``[lo[first] // bk, hi[last] // bk]`` and the full ones ``[ceil(lo[last] /
bk), (hi[first] + 1) // bk)``: each list is at most two runs of consecutive blocks, and each of the
four bounds is non-decreasing in ``b``, so a key block's query blocks are runs too, found by
binary search. The spec is :func:`bidiattn.kernels.fa4_masked.block_tables_spec` (PyTorch ops,
about 80 small launches); :func:`block_tables` computes the same tables, and the packed bounds
FA4's mask function reads, in one launch: what ``mask_tables`` runs on CUDA and under Triton's
interpreter. The classification is
:func:`bidiattn.kernels.flex.block_mask_from_spans`'s (the tests compare all three).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ..spans import SpanMask
from .segments import _seq_of

__all__ = ["block_tables"]

_LANES = 16  # table rows per program
_COLS = 64  # index columns per store


@triton.jit
def _packed(b_ptr, cu_ptr, rows, num_seq, seq_steps):
    """Packed key position of the bound ``b`` at ``rows`` (valid rows)."""
    seq = _seq_of(cu_ptr, rows, num_seq, seq_steps)
    return tl.load(b_ptr + rows).to(tl.int64) + tl.load(cu_ptr + seq)


@triton.jit
def _block_bounds(lo_ptr, hi_ptr, cu_ptr, b, t, num_seq, seq_steps, bq, bk, WHICH: tl.constexpr):
    """For query blocks ``b`` of ``bq`` rows: first visited key block (WHICH 0), last (1),
    first full (2), end of the full ones (3), in key blocks of ``bk``."""
    first = tl.minimum(b * bq, t - 1)
    last = tl.minimum(b * bq + bq - 1, t - 1)
    if WHICH == 0:
        out = _packed(lo_ptr, cu_ptr, first, num_seq, seq_steps) // bk
    elif WHICH == 1:  # never below the first minus one: a block of empty rows visits none
        out = tl.maximum(_packed(hi_ptr, cu_ptr, last, num_seq, seq_steps) // bk,
                         _packed(lo_ptr, cu_ptr, first, num_seq, seq_steps) // bk - 1)
    else:
        f0 = (_packed(lo_ptr, cu_ptr, last, num_seq, seq_steps) + bk - 1) // bk
        if WHICH == 2:
            out = f0
        else:
            out = tl.maximum((_packed(hi_ptr, cu_ptr, first, num_seq, seq_steps) + 1) // bk, f0)
    return out


@triton.jit
def _first_above(lo_ptr, hi_ptr, cu_ptr, x, n, steps, t, num_seq, seq_steps, bq, bk, WHICH: tl.constexpr):
    """Per lane, the first query block in ``[0, n]`` whose bound ``WHICH`` exceeds ``x``
    (``n`` if none): a binary search of ``steps`` rounds over the non-decreasing bound."""
    a = tl.zeros_like(x)
    z = tl.zeros_like(x) + n
    for _ in range(steps):
        go = a < z
        mid = (a + z) // 2
        above = _block_bounds(lo_ptr, hi_ptr, cu_ptr, tl.minimum(mid, n - 1), t, num_seq, seq_steps, bq, bk,
                              WHICH) > x
        z = tl.where(go & above, mid, z)
        a = tl.where(go & ~above, mid + 1, a)
    return a


@triton.jit
def _store_rows(num_ptr, idx_ptr, rows, ok, start1, count1, start2, count2, width, COLS: tl.constexpr):
    """Counts and index rows (two runs of blocks each) of table rows ``rows``."""
    tl.store(num_ptr + rows, (count1 + count2).to(tl.int32), mask=ok)
    for c in range(0, width, COLS):
        j = c + tl.arange(0, COLS)
        idx = tl.where(j[None, :] < count1[:, None], start1[:, None] + j[None, :],
                       start2[:, None] + (j[None, :] - count1[:, None]))
        idx = tl.minimum(tl.maximum(idx, 0), width - 1)
        tl.store(idx_ptr + rows[:, None].to(tl.int64) * width + j[None, :], idx.to(tl.int32),
                 mask=ok[:, None] & (j[None, :] < width))


@triton.jit
def _bit_length(x):
    """Bits of the non-negative scalar ``x`` (at least 1): binary-search rounds over ``x`` items."""
    bits = 1
    while (x >> bits) > 0:
        bits += 1
    return bits


@triton.jit
def _block_tables_kernel(lo_ptr, hi_ptr, cu_ptr, out_ptr, t, num_seq, BQ: tl.constexpr, BK: tl.constexpr,
                         BQ2: tl.constexpr, BK2: tl.constexpr, LANES: tl.constexpr, COLS: tl.constexpr):
    """Tables of ``t`` tokens in ``num_seq`` sequences, forward blocks ``BQ x BK``, backward
    blocks ``BQ2 x BK2`` (``BQ2 == 0``: no backward), packed into ``out_ptr`` (int32) at the offsets
    ``block_tables`` reads them from. Programs: ``LANES`` forward rows each, then ``LANES`` backward
    rows each, then ``LANES * COLS`` packed bounds each. Sizes and offsets are derived here, so
    the launch passes six runtime arguments (Triton's host cost grows with each one)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, LANES).to(tl.int64)
    seq_steps = _bit_length(num_seq + 1)
    nq = (t + BQ - 1) // BQ
    nk = (t + BK - 1) // BK
    if BQ2 > 0:
        nq2 = (t + BQ2 - 1) // BQ2
        nk2 = (t + BK2 - 1) // BK2
    else:
        nq2 = t * 0
        nk2 = t * 0
    o_kv_num = 2 * t
    o_kv_idx = o_kv_num + nq
    o_full_num = o_kv_idx + nq * nk
    o_full_idx = o_full_num + nq
    o_q_num = o_full_idx + nq * nk
    o_q_idx = o_q_num + nk2
    o_full_q_num = o_q_idx + nk2 * nq2
    o_full_q_idx = o_full_q_num + nk2
    forward_programs = (nq + LANES - 1) // LANES
    backward_programs = (nk2 + LANES - 1) // LANES
    if pid < forward_programs:
        b = pid * LANES + lanes
        ok_q = b < nq
        v0 = _block_bounds(lo_ptr, hi_ptr, cu_ptr, b, t, num_seq, seq_steps, BQ, BK, 0)
        v1 = _block_bounds(lo_ptr, hi_ptr, cu_ptr, b, t, num_seq, seq_steps, BQ, BK, 1)
        f0 = _block_bounds(lo_ptr, hi_ptr, cu_ptr, b, t, num_seq, seq_steps, BQ, BK, 2)
        f1 = _block_bounds(lo_ptr, hi_ptr, cu_ptr, b, t, num_seq, seq_steps, BQ, BK, 3)
        _store_rows(out_ptr + o_kv_num, out_ptr + o_kv_idx, b, ok_q, v0, f0 - v0, f1, v1 + 1 - f1, nk, COLS)
        _store_rows(out_ptr + o_full_num, out_ptr + o_full_idx, b, ok_q, f0, f1 - f0, f1, f1 * 0, nk, COLS)
    elif pid < forward_programs + backward_programs:
        q_steps = _bit_length(nq2 + 1)
        kb = (pid - forward_programs) * LANES + lanes
        ok_k = kb < nk2
        first = _first_above(lo_ptr, hi_ptr, cu_ptr, kb - 1, nq2, q_steps, t, num_seq, seq_steps, BQ2, BK2, 1)
        last = _first_above(lo_ptr, hi_ptr, cu_ptr, kb, nq2, q_steps, t, num_seq, seq_steps, BQ2, BK2, 0) - 1
        full_first = _first_above(lo_ptr, hi_ptr, cu_ptr, kb, nq2, q_steps, t, num_seq, seq_steps, BQ2, BK2, 3)
        full_last = _first_above(lo_ptr, hi_ptr, cu_ptr, kb, nq2, q_steps, t, num_seq, seq_steps, BQ2, BK2, 2) - 1
        full = full_last >= full_first
        full_first = tl.where(full, full_first, last + 1)
        full_last = tl.where(full, full_last, last)
        _store_rows(out_ptr + o_q_num, out_ptr + o_q_idx, kb, ok_k, first, full_first - first, full_last + 1,
                    last - full_last, nq2, COLS)
        _store_rows(out_ptr + o_full_q_num, out_ptr + o_full_q_idx, kb, ok_k, full_first,
                    full_last + 1 - full_first, full_first, kb * 0, nq2, COLS)
    else:
        rows = (pid - forward_programs - backward_programs) * (LANES * COLS) + tl.arange(0, LANES * COLS)
        ok_r = rows < t
        rows = tl.minimum(rows, t - 1)
        tl.store(out_ptr + rows, _packed(lo_ptr, cu_ptr, rows, num_seq, seq_steps).to(tl.int32), mask=ok_r)
        tl.store(out_ptr + t + rows, _packed(hi_ptr, cu_ptr, rows, num_seq, seq_steps).to(tl.int32), mask=ok_r)


def block_tables(spans: SpanMask, forward_block: tuple[int, int],
                 backward_block: tuple[int, int] | None) -> tuple:
    """The tables of :func:`~bidiattn.kernels.fa4_masked.block_tables_spec` for self-attention
    ``spans`` in one Triton launch (CUDA, or Triton's interpreter); one int32 buffer holds them."""
    if not spans.is_self_attention:
        raise ValueError("block tables take self-attention spans only (no cu_seqlens_k)")
    t = spans.total_tokens
    bq, bk = forward_block
    nq, nk = -(-t // bq), -(-t // bk)
    bq2, bk2 = backward_block if backward_block is not None else (0, 0)
    nq2, nk2 = (-(-t // bq2), -(-t // bk2)) if backward_block is not None else (0, 0)
    sizes = (t, t, nq, nq * nk, nq, nq * nk, nk2, nk2 * nq2, nk2, nk2 * nq2)
    buf = torch.empty(sum(sizes), dtype=torch.int32, device=spans.lo.device)
    programs = -(-nq // _LANES) + -(-nk2 // _LANES) + -(-t // (_LANES * _COLS))
    _block_tables_kernel[(programs,)](spans.lo, spans.hi, spans.cu_seqlens, buf, t, spans.num_sequences,
                                      BQ=bq, BK=bk, BQ2=bq2, BK2=bk2, LANES=_LANES, COLS=_COLS)
    # Views at the kernel's offsets (as_strided: less host time than split + view).
    starts = tuple(itertools.accumulate(sizes, initial=0))

    def counts(i: int, n: int) -> torch.Tensor:
        return buf.as_strided((1, 1, n), (n, n, 1), starts[i])

    def rows(i: int, n: int, m: int) -> torch.Tensor:
        return buf.as_strided((1, 1, n, m), (n * m, n * m, m, 1), starts[i])

    forward = (counts(2, nq), rows(3, nq, nk), counts(4, nq), rows(5, nq, nk))
    backward = (counts(6, nk2), rows(7, nk2, nq2), counts(8, nk2), rows(9, nk2, nq2)) if nk2 else (None,) * 4
    return (buf[:t], buf[t : 2 * t], *forward, *backward)
