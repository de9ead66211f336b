"""The fa4 plan's segment starts in one Triton launch (one host sync to read them back).

The spec is PyTorch code: :func:`bidiattn.launch.segment_starts_spec`, the greedy cut in closed
form (see :func:`bidiattn.launch._read_segments`). In PyTorch ops it is about 55 small launches
before the read-back, which made the first fa4 call host-bound (PERF.md A14). Here one program
walks the rows in chunks of ``BLOCK``, carrying the last fixing link and the start count from
chunk to chunk, and writes each segment start's row, code, sequence, ``lo``, ``hi`` and key base
in row order; the host derives lengths and windows from consecutive starts. One program, so its
GPU time grows with the rows (about one chunk step per 1024 rows).

Not yet the plan's path: the tests check it against the spec through Triton's interpreter, and
``benchmarks/plan_cost.py`` checks and times it on a GPU; the fa4 plan switches to it on CUDA
after that run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spans import SpanMask

__all__ = ["segment_starts"]

_BLOCK = 1024  # rows per chunk step (fewer for shorter masks)
_FIELDS = 6  # code, start row, sequence, lo, hi, the sequence's first key (packed keys)


@triton.jit
def _seq_of(cu_ptr, rows, num_seq, steps):
    """Sequence of each row: how many of ``cu[1..num_seq]`` are <= row (``searchsorted(cu[1:],
    row, right=True)``), by a binary search of ``steps`` rounds."""
    lo = tl.full(rows.shape, 1, tl.int64)
    hi = tl.full(rows.shape, 1, tl.int64) + num_seq
    for _ in range(steps):
        mid = (lo + hi) // 2
        go = lo < hi
        at = tl.load(cu_ptr + mid, mask=go & (mid <= num_seq), other=0)
        right = go & (at <= rows)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(go & ~right, mid, hi)
    return lo - 1


@triton.jit
def _link_code(lo_ptr, hi_ptr, r, t, seq_r, seq_next):
    """Code of link ``r`` (row ``r`` to ``r + 1``, of sequences ``seq_r`` and ``seq_next``):
    ``dhi + 2 dlo`` where both steps are 0 or 1 inside one sequence, else 4 (a break); links
    outside ``[0, t - 1)`` are breaks."""
    ok = (r >= 0) & (r < t - 1)
    lo0 = tl.load(lo_ptr + r, mask=ok, other=0).to(tl.int64)
    lo1 = tl.load(lo_ptr + r + 1, mask=ok, other=0).to(tl.int64)
    hi0 = tl.load(hi_ptr + r, mask=ok, other=0).to(tl.int64)
    hi1 = tl.load(hi_ptr + r + 1, mask=ok, other=0).to(tl.int64)
    dlo, dhi = lo1 - lo0, hi1 - hi0
    small = (dlo >= 0) & (dlo <= 1) & (dhi >= 0) & (dhi <= 1)
    return tl.where(ok & (seq_r == seq_next) & small, dhi + 2 * dlo, 4)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _segment_starts_kernel(lo_ptr, hi_ptr, cu_ptr, cu_k_ptr, demote_ptr, out_ptr, t, num_seq, steps, cap,
                           PAGED: tl.constexpr, DEMOTED: tl.constexpr, BLOCK: tl.constexpr):
    # out: [1 + 6 * cap] int64: the start count, then per field ``cap`` entries in row order.
    carry = tl.full((), -1, tl.int64)  # max over fixing links so far of 2 j + brk[j]
    count = tl.full((), 0, tl.int64)
    for base in range(0, t, BLOCK):
        x = base + tl.arange(0, BLOCK).to(tl.int64)  # candidate start rows
        inside = x < t
        r = x - 1  # the link into row x
        # Sequences of rows x - 2 .. x + 1: the links x - 2, x - 1 (r) and x.
        seq_a, seq_b = _seq_of(cu_ptr, x - 2, num_seq, steps), _seq_of(cu_ptr, r, num_seq, steps)
        seq = _seq_of(cu_ptr, x, num_seq, steps)
        seq_d = _seq_of(cu_ptr, x + 1, num_seq, steps)
        code_r = _link_code(lo_ptr, hi_ptr, r, t, seq_b, seq)
        code_prev = _link_code(lo_ptr, hi_ptr, r - 1, t, seq_a, seq_b)
        code_x = _link_code(lo_ptr, hi_ptr, x, t, seq, seq_d)
        brk_r = code_r == 4
        fixing = (r == 0) | (code_r == code_prev) | brk_r
        val = tl.where(fixing & (r >= 0) & inside, 2 * r + brk_r.to(tl.int64), -1)
        last = tl.maximum(tl.associative_scan(val, 0, _max), carry)
        carry = tl.maximum(carry, tl.max(val, 0))
        d = last ^ (2 * r)
        start = tl.where(x == 0, 1, (d ^ (d >> 1)) & 1)
        seg_code = tl.where(code_x == 4, 0, code_x)
        if DEMOTED:
            dm = tl.load(demote_ptr + x, mask=inside, other=0) != 0
            start = tl.where(dm, 1, start)
            seg_code = tl.where(dm, 0, seg_code)
        lo_x = tl.load(lo_ptr + x, mask=inside, other=0).to(tl.int64)
        if PAGED:
            own = tl.where(start == 1, seg_code, tl.where(x > 0, code_r, 0))
            bad = (own <= 1) & (lo_x > 0)
            start = tl.where(bad, 1, start)
            seg_code = tl.where(bad, 3, seg_code)
        start = tl.where(inside, start, 0)
        pos = count + tl.cumsum(start, 0) - 1
        keep = (start == 1) & (pos < cap)
        hi_x = tl.load(hi_ptr + x, mask=inside, other=0).to(tl.int64)
        k_base = tl.load(cu_k_ptr + seq, mask=keep, other=0)
        at = out_ptr + 1 + pos
        tl.store(at, seg_code, mask=keep)
        tl.store(at + cap, x, mask=keep)
        tl.store(at + 2 * cap, seq, mask=keep)
        tl.store(at + 3 * cap, lo_x, mask=keep)
        tl.store(at + 4 * cap, hi_x, mask=keep)
        tl.store(at + 5 * cap, k_base, mask=keep)
        count += tl.sum(start, 0)
    tl.store(out_ptr, count)


def segment_starts(spans: SpanMask, paged: bool, demoted: torch.Tensor | None, cap: int) -> list[list[int]]:
    """Segment starts of ``spans`` in row order, read back in one copy: six host lists ``(code,
    row, seq, lo, hi, key base)``, where ``code`` is the start's first link's code (0 on a
    break), ``key base`` the sequence's first key among the packed keys. ``demoted``: an int8
    ``[T]`` mask of rows that become one-row full segments, or None. Reads ``cap`` starts in the
    sync and launches once more with room for all where there are more. CUDA or Triton's
    interpreter."""
    t, num_seq = spans.total_tokens, spans.num_sequences
    dev = spans.lo.device
    steps = max(1, int(num_seq + 1).bit_length())
    while True:
        out = torch.empty(1 + _FIELDS * cap, dtype=torch.int64, device=dev)
        _segment_starts_kernel[(1,)](
            spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k,
            demoted if demoted is not None else spans.lo, out, t, num_seq, steps, cap,
            PAGED=paged, DEMOTED=demoted is not None, BLOCK=min(_BLOCK, max(16, triton.next_power_of_2(t))),
        )
        host = out.cpu()
        n = int(host[0])
        if n <= cap:
            return host[1:].view(_FIELDS, cap)[:, :n].tolist()
        cap = n
