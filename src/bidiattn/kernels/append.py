"""Fused append of new keys and values into paged caches: one Triton launch for both.

The PyTorch version (the spec, in :func:`bidiattn.serving.kvcache.append`) is a sequence index, a page
lookup and two scattered writes: ~10 small ops per layer and step. Here one program copies one
packed row (all K/V heads) of ``k`` and of ``v`` into its page slot. The copy moves raw bits
(the tensors are viewed as same-width integers), so any cache dtype works, fp8 included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import last_at_most

__all__ = ["append_triton"]

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@triton.jit
def _append_kernel(
    k, v, k_pages, v_pages, page_table, cu_seqlens, start, num_seq,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_pt,
    PAGE_SIZE: tl.constexpr, D: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    a = last_at_most(cu_seqlens, i_t, num_seq, i_t >= 0, STEPS)
    pos = tl.load(start + a) + i_t - tl.load(cu_seqlens + a)
    page = tl.load(page_table + a * stride_pt + pos // PAGE_SIZE).to(tl.int64)
    dst = (page * PAGE_SIZE + pos % PAGE_SIZE) * ROW
    for i_c in range(0, ROW, BLOCK):
        o_c = i_c + tl.arange(0, BLOCK)
        ok = o_c < ROW
        o_h = o_c // D
        o_d = o_c % D
        b_k = tl.load(k + i_t * stride_kt + o_h * stride_kh + o_d, mask=ok)
        b_v = tl.load(v + i_t * stride_vt + o_h * stride_vh + o_d, mask=ok)
        tl.store(k_pages + dst + o_c, b_k, mask=ok)
        tl.store(v_pages + dst + o_c, b_v, mask=ok)


def append_triton(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  page_table: torch.Tensor, cu_seqlens: torch.Tensor, start: torch.Tensor) -> None:
    """Write ``k``/``v`` ``[T, Hkv, D]`` into the pages (inputs validated by the caller)."""
    bits = _BITS[k.element_size()]
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    _, page_size, hkv, d = k_pages.shape
    row = hkv * d
    num_seq = cu_seqlens.numel() - 1
    _append_kernel[(k.shape[0],)](
        k.view(bits), v.view(bits), k_pages.view(bits), v_pages.view(bits), page_table, cu_seqlens, start, num_seq,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), page_table.stride(0),
        PAGE_SIZE=page_size, D=d, ROW=row, BLOCK=min(1024, triton.next_power_of_2(row)),
        STEPS=max(1, (num_seq - 1).bit_length()),
    )
