"""Index helpers shared by the Triton kernels (inlined by ``triton.jit``)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def last_at_most(offsets, x, n, mask, STEPS: tl.constexpr):
    """The largest ``s`` in ``[0, n - 1]`` with ``offsets[s] <= x`` (int64, ``x``'s shape), for
    non-decreasing ``offsets`` with ``offsets[0] <= x``: e.g. the sequence of a packed row from
    ``cu_seqlens``. ``STEPS >= ceil(log2(n))``; lanes where ``mask`` is false read nothing."""
    a = (x * 0).to(tl.int64)
    b = a + (n - 1)
    for _ in range(STEPS):
        mid = (a + b + 1) // 2
        go = tl.load(offsets + mid, mask=mask, other=0) <= x
        a = tl.where(go, mid, a)
        b = tl.where(go, b, mid - 1)
    return a


@triton.jit
def count_below(values, n, x, mask, STEPS: tl.constexpr):
    """Per lane, how many of ``values[0:n]`` (non-decreasing; each lane its own base pointer and
    ``n``) are below ``x``: a lower-bound binary search; ``STEPS >= ceil(log2(n + 1))``, e.g.
    ``n.bit_length()``. Lanes where ``mask`` is false read nothing."""
    a = (x * 0).to(tl.int64)
    b = a + n
    for _ in range(STEPS):
        mid = (a + b) // 2
        below = (tl.load(values + mid, mask=mask & (mid < b), other=0) < x) & (mid < b)
        a = tl.where(below, mid + 1, a)
        b = tl.where(below, b, mid)
    return a


@triton.jit
def program_tile(order, t_seq, t_rows, cu_seqlens, cu_seqlens_k):
    """The tile of this program (axis 1, in the launcher's ``order``), its row or key count
    (0: a padding tile, exit), its sequence, and the sequence's query and key offsets and
    lengths: ``(i_t, count, i_b, bos, seq_len, bos_k, seq_len_k)``."""
    i_t = tl.load(order + tl.program_id(1))
    count = tl.load(t_rows + i_t)
    i_b = tl.load(t_seq + i_t)
    bos = tl.load(cu_seqlens + i_b)
    seq_len = (tl.load(cu_seqlens + i_b + 1) - bos).to(tl.int32)
    bos_k = tl.load(cu_seqlens_k + i_b)
    seq_len_k = (tl.load(cu_seqlens_k + i_b + 1) - bos_k).to(tl.int32)
    return i_t, count, i_b, bos, seq_len, bos_k, seq_len_k
