"""Span-attention forward: Triton kernel -> launcher.

One program handles ``BLOCK_M`` query rows of one sequence for one query head (or, with packed
GQA, fewer rows for every query head of one K/V head). Its key range is ``[lo_min, hi_max]`` of
the tile (from :meth:`SpanMask.tile_summary`); key tiles entirely inside ``[lo_max, hi_min]`` are
allowed for every row and run without mask math, the ragged tiles at the two ends apply the
per-row ``lo``/``hi`` mask, and everything else is never visited. The kernel reads two ints per
row, never a dense mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..launch import LaunchPlan, TileConfig, plan_forward
from ..spans import SpanMask
from .common import LOG2E, bf16_in_interpreter, fits, softcap_tanh
from .indexing import program_tile

__all__ = ["span_attention_forward"]


# The key loops' inputs in three bundles. Triton passes a NamedTuple to a jit function as its
# fields, so the generated code is that of plain arguments. _Query and _KV hold run-time values
# built by each program; _Loop holds compile-time values and is built by the launcher (the
# kernel's LOOP argument), since a tuple built inside a kernel turns its constants into tensors.
class _Query(NamedTuple):
    """The program's query rows."""

    q: Any  # q tile [BLOCK_M, WK]: all columns, or the first half with HALVES
    q2: Any  # the second column half with HALVES; otherwise q again, unused
    lo: Any  # per row, the first allowed key
    hi: Any  # per row, the last allowed key
    qk_scale: Any  # scale * log2(e), or scale / softcap with SOFTCAP
    softcap: Any


class _KV(NamedTuple):
    """Where the program's K/V tiles are: one K/V head of one sequence."""

    k: Any  # pointer to K of this head, at the sequence's first key (at row 0 when paged)
    v: Any
    k_desc: Any  # TMA descriptors of K/V as [keys, Hkv * D] matrices (placeholders without TMA)
    v_desc: Any
    row: Any  # TMA row of the sequence's first key
    col: Any  # TMA column of the head's first K/V column
    i_dv: Any  # the program's slice of V (output) columns, of BLOCK_DV columns (split_dv)
    stride: Any  # key-row stride of K/V
    pages: Any  # the sequence's page-table row (paged caches)
    keys: Any  # the sequence's key count


class _Loop(NamedTuple):
    """Compile-time shape of the key loops (and of the program's q and output tiles)."""

    BLOCK_N: Any  # keys per tile
    BLOCK_DV: Any  # V (output) columns per program
    WK: Any  # q/K columns per dot: BLOCK_D, or half of it with HALVES
    WV: Any  # V columns per accumulator: BLOCK_DV, or half of it with HALVES
    D: Any  # the head dim
    PADDED: Any  # D < BLOCK_D: column loads are masked
    SOFTCAP: Any
    PAGE_SIZE: Any  # > 0: keys through the page table
    TMA: Any  # K/V tiles through the descriptors
    HALVES: Any  # q, K, V and the output in two column halves


@triton.jit
def _kv_tile(kv, t_row, row, o_n, col_k, col_v, ZERO_TAIL: tl.constexpr, loop: tl.constexpr):
    """K columns ``[col_k, +WK)`` and V columns ``[col_v, +WV)`` of one key tile: a TMA box at
    row ``t_row``, or pointer loads at row offsets ``row``. ``ZERO_TAIL``: the tile may run past
    the sequence's keys, whose V rows are zeroed (pointer loads mask them)."""
    if loop.TMA:
        # Rows past this sequence's keys belong to the next sequence, or to unwritten slots of
        # its last page (zeros past the tensor end); their scores are masked by hi, and V's rows
        # are zeroed so a non-finite value there cannot reach the output (0 * inf).
        b_k = kv.k_desc.load([t_row, kv.col + col_k])
        b_v = kv.v_desc.load([t_row, kv.col + col_v])
        if ZERO_TAIL:
            b_v = tl.where(o_n[:, None] < kv.keys, b_v, 0.0)
    else:
        o_ck = col_k + tl.arange(0, loop.WK)
        o_cv = col_v + tl.arange(0, loop.WV)
        if ZERO_TAIL or loop.PADDED:
            n_ok = o_n[:, None] < kv.keys
            b_k = tl.load(kv.k + row + o_ck[None, :], mask=n_ok & (o_ck[None, :] < loop.D), other=0.0)
            b_v = tl.load(kv.v + row + o_cv[None, :], mask=n_ok & (o_cv[None, :] < loop.D), other=0.0)
        else:
            b_k = tl.load(kv.k + row + o_ck[None, :])
            b_v = tl.load(kv.v + row + o_cv[None, :])
    return b_k, b_v


@triton.jit
def _scores(b_s, o_n, query, MASK: tl.constexpr, SOFTCAP: tl.constexpr):
    """q·k in base 2 with the tile's mask applied (``MASK`` as in :func:`_attend`)."""
    if SOFTCAP:
        b_s, _ = softcap_tanh(b_s, query.qk_scale, query.softcap)
    else:
        b_s = b_s * query.qk_scale
    if MASK == 1:
        b_s = tl.where(o_n[None, :] >= query.lo[:, None], b_s, float("-inf"))
    elif MASK == 2:
        b_s = tl.where(o_n[None, :] <= query.hi[:, None], b_s, float("-inf"))
    elif MASK == 3:
        allowed = (o_n[None, :] >= query.lo[:, None]) & (o_n[None, :] <= query.hi[:, None])
        b_s = tl.where(allowed, b_s, float("-inf"))
    return b_s


@triton.jit
def _attend(acc, acc2, m_i, l_i, query, kv, start, end, MASK: tl.constexpr, STAGES: tl.constexpr,
            loop: tl.constexpr):
    """Online softmax over the key tiles ``[start, end)``: returns the updated ``(acc, acc2,
    m_i, l_i)``. ``STAGES``: the loop's pipeline depth.

    ``MASK``: 0 every key allowed for every row; 1 only ``lo`` varies (keys below the tile's
    mask-free range, all ``<= hi_min``); 2 only ``hi`` varies (keys above it, all
    ``>= lo_max``); 3 both. Below 2 every key tile ends inside the sequence, so the loads need
    no bounds mask either. With ``HALVES``, q·k is the sum of two dots (``q``/``q2``) and each
    half of V feeds its own accumulator (``acc``/``acc2``); otherwise ``acc2`` is a placeholder.
    """
    ZERO_TAIL: tl.constexpr = MASK >= 2
    BLOCK_N: tl.constexpr = loop.BLOCK_N
    PAGE_SIZE: tl.constexpr = loop.PAGE_SIZE
    # Paged TMA: a key tile lies inside one page (the launcher asks PAGE_SIZE % BLOCK_N == 0) and
    # its first key is a key of the sequence, so its table entry is a real page. Table entries
    # are read one tile ahead, so a load never waits on the table.
    if PAGE_SIZE > 0:
        if loop.TMA:
            p_next = tl.load(kv.pages + start // PAGE_SIZE, mask=start < end, other=0)
        else:
            o_n0 = start + tl.arange(0, BLOCK_N)
            p_next = tl.load(kv.pages + o_n0 // PAGE_SIZE, mask=o_n0 < kv.keys, other=0)
    else:
        p_next = start
    for i_n in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        o_n = i_n + tl.arange(0, BLOCK_N)
        t_row = kv.row + i_n
        row = o_n[:, None].to(tl.int64) * kv.stride
        if PAGE_SIZE > 0:
            if loop.TMA:
                t_row = p_next * PAGE_SIZE + i_n % PAGE_SIZE
                p_next = tl.load(kv.pages + (i_n + BLOCK_N) // PAGE_SIZE, mask=i_n + BLOCK_N < end, other=0)
            else:
                # Key n of the sequence is slot n % PAGE_SIZE of page pages[n // PAGE_SIZE].
                row = (p_next.to(tl.int64) * PAGE_SIZE + o_n % PAGE_SIZE)[:, None] * kv.stride
                o_nn = o_n + BLOCK_N
                p_next = tl.load(kv.pages + o_nn // PAGE_SIZE, mask=o_nn < kv.keys, other=0)
        b_k, b_v = _kv_tile(kv, t_row, row, o_n, 0, kv.i_dv * loop.BLOCK_DV, ZERO_TAIL, loop)
        b_s = tl.dot(query.q, tl.trans(b_k))
        if loop.HALVES:
            b_k2, b_v2 = _kv_tile(kv, t_row, row, o_n, loop.WK, kv.i_dv * loop.BLOCK_DV + loop.WV, ZERO_TAIL, loop)
            b_s = tl.dot(query.q2, tl.trans(b_k2), b_s)
        b_s = _scores(b_s, o_n, query, MASK, loop.SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # Rows with no allowed key so far keep m = -inf; shift by 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.math.exp2(b_s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        if loop.HALVES:
            acc2 = acc2 * alpha[:, None] + tl.dot(b_p.to(b_v2.dtype), b_v2)
        m_i = m_new
    return acc, acc2, m_i, l_i


@triton.jit
def _span_fwd_kernel(
    q, k, v, o, lse, span_lo, span_hi, cu_seqlens, cu_seqlens_k, order, page_table, k_desc, v_desc, tiles,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_lh, stride_os, stride_ls, stride_pt,
    qk_scale, softcap,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, KV_SPLITS: tl.constexpr, PACK: tl.constexpr, STAGES: tl.constexpr,
    EDGE_STAGES: tl.constexpr, LOOP: tl.constexpr,
):
    # Grid: (query head, or K/V head with PACK > 1; query tile in the launch order; output
    # column slice x key-range slice). tiles: the TileSummary arrays (seq, row_start, rows,
    # lo_min, lo_max, hi_min, hi_max); LOOP: a _Loop.
    t_seq, t_row, t_rows, t_lo_min, t_lo_max, t_hi_min, t_hi_max = tiles
    BLOCK_N: tl.constexpr = LOOP.BLOCK_N
    BLOCK_DV: tl.constexpr = LOOP.BLOCK_DV
    D: tl.constexpr = LOOP.D
    i_h = tl.program_id(0)
    # Program i_dv owns output columns [i_dv * BLOCK_DV, +BLOCK_DV) and recomputes q·k for them
    # (BLOCK_DV < BLOCK_D where a full fp32 accumulator does not fit in registers). Program i_s
    # covers one slice of the tile's key range and writes a partial output and lse that the
    # launcher merges (KV_SPLITS > 1: decode, few query tiles over long key ranges).
    i_dv = tl.program_id(2) // KV_SPLITS
    i_s = tl.program_id(2) % KV_SPLITS
    # Keys of the sequence: the query rows themselves, or a longer cache (extend / decode).
    i_t, rows, i_b, bos, seq_len, bos_k, seq_len_k = program_tile(order, t_seq, t_rows, cu_seqlens, cu_seqlens_k)
    if rows == 0:
        return
    lo_min = tl.load(t_lo_min + i_t)
    lo_max = tl.load(t_lo_max + i_t)
    hi_min = tl.load(t_hi_min + i_t)
    hi_max = tl.load(t_hi_max + i_t)

    # PACK > 1: the tile's BLOCK_M rows are BLOCK_M // PACK query rows x the PACK query heads
    # sharing one K/V head, so each K/V tile is read once per group instead of once per head.
    o_m = tl.load(t_row + i_t) + tl.arange(0, BLOCK_M) // PACK
    if PACK > 1:
        head = i_h * PACK + tl.arange(0, BLOCK_M) % PACK
        i_hk = i_h
    else:
        head = tl.zeros([BLOCK_M], tl.int32) + i_h
        i_hk = i_h // GROUP
    m_ok = o_m < seq_len
    rows_g = bos + o_m.to(tl.int64)
    # Rows past the sequence end get an empty span; they are never stored.
    lo = tl.load(span_lo + rows_g, mask=m_ok, other=1)
    hi = tl.load(span_hi + rows_g, mask=m_ok, other=0)

    # With HALVES, q's two column halves; otherwise b_q2 and acc2 are placeholders.
    WQ: tl.constexpr = LOOP.WK
    WO: tl.constexpr = LOOP.WV
    o_d = tl.arange(0, WQ)
    q_off = rows_g[:, None] * stride_qt + head[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(q + q_off, mask=m_ok[:, None] & (o_d[None, :] < D), other=0.0)
    if LOOP.HALVES:
        b_q2 = tl.load(q + q_off + WQ, mask=m_ok[:, None] & (o_d[None, :] + WQ < D), other=0.0)
        acc2 = tl.zeros([BLOCK_M, WO], tl.float32)
    else:
        b_q2 = b_q
        acc2 = tl.zeros([BLOCK_M, 16], tl.float32)
    pt_row = page_table + i_b.to(tl.int64) * stride_pt
    if LOOP.PAGE_SIZE > 0:
        k_base = k + i_hk * stride_kh
        v_base = v + i_hk * stride_kh
    else:
        k_base = k + bos_k * stride_kt + i_hk * stride_kh
        v_base = v + bos_k * stride_kt + i_hk * stride_kh
    # TMA coordinates: K/V as [keys, Hkv * D] matrices; this sequence's keys start at row bos_k.
    kv = _KV(k_base, v_base, k_desc, v_desc, bos_k.to(tl.int32), i_hk * D, i_dv, stride_kt, pt_row, seq_len_k)
    query = _Query(b_q, b_q2, lo, hi, qk_scale, softcap)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, WO], tl.float32)

    # Key tiles [s_lo, s_hi) of this program's slice; inside it, [a1, a2) is mask-free.
    n_first = (lo_min // BLOCK_N) * BLOCK_N
    n_end = hi_max + 1
    full_start = tl.cdiv(lo_max, BLOCK_N) * BLOCK_N
    full_end = ((hi_min + 1) // BLOCK_N) * BLOCK_N
    if KV_SPLITS == 1:
        s_lo = n_first
        s_hi = n_end
    else:
        per = tl.cdiv(tl.cdiv(n_end - n_first, BLOCK_N), KV_SPLITS) * BLOCK_N
        s_lo = tl.minimum(n_first + i_s * per, n_end)
        s_hi = tl.minimum(s_lo + per, n_end)
    if full_start < full_end:
        a1 = tl.minimum(tl.maximum(full_start, s_lo), s_hi)
        a2 = tl.minimum(tl.maximum(full_end, s_lo), s_hi)
        acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, query, kv, s_lo, a1, 1, EDGE_STAGES, LOOP)
        acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, query, kv, a1, a2, 0, STAGES, LOOP)
        acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, query, kv, a2, s_hi, 2, EDGE_STAGES, LOOP)
    else:
        acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, query, kv, s_lo, s_hi, 3, EDGE_STAGES, LOOP)

    # A stored row attends at least itself, so l_i > 0 unless a key slice held none of its keys:
    # then the partial output is 0 with lse = -inf (weight 0 in the merge).
    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    o_dv = i_dv * BLOCK_DV + tl.arange(0, WO)
    o_off = i_s * stride_os + rows_g[:, None] * stride_ot + head[:, None] * stride_oh + o_dv[None, :]
    b_o = acc / l_safe[:, None]
    tl.store(o + o_off, b_o.to(o.dtype.element_ty), mask=m_ok[:, None] & (o_dv[None, :] < D))
    if LOOP.HALVES:
        b_o2 = acc2 / l_safe[:, None]
        tl.store(o + o_off + WO, b_o2.to(o.dtype.element_ty), mask=m_ok[:, None] & (o_dv[None, :] + WO < D))
    if i_dv == 0:
        b_lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse + i_s * stride_ls + head * stride_lh + rows_g, b_lse, mask=m_ok)


@triton.jit
def _merge_kernel(o_part, l_part, o, lse, num_heads, stride_os, stride_ot, stride_oh, stride_ls, stride_lh,
                  stride_out_t, stride_out_h, stride_lse_h,
                  SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (row, head): out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max), lse likewise.
    A slice that held none of the row's keys has lse_s = -inf, so weight 0 (its output unread)."""
    i_t = tl.program_id(0) // num_heads
    i_h = tl.program_id(0) % num_heads
    o_s = tl.arange(0, SPLITS_P2)
    o_d = tl.arange(0, BLOCK_D)
    s_ok = o_s < SPLITS
    b_l = tl.load(l_part + o_s * stride_ls + i_h * stride_lh + i_t, mask=s_ok, other=float("-inf"))
    m = tl.max(b_l, 0)
    w = tl.where(s_ok, tl.exp(b_l - m), 0.0)
    total = tl.sum(w, 0)
    off = o_s[:, None] * stride_os + i_t.to(tl.int64) * stride_ot + i_h * stride_oh + o_d[None, :]
    b_o = tl.load(o_part + off, mask=s_ok[:, None] & (o_d[None, :] < D), other=0.0)
    merged = tl.sum(tl.where(w[:, None] > 0, b_o * w[:, None], 0.0), 0) / total
    tl.store(o + i_t.to(tl.int64) * stride_out_t + i_h * stride_out_h + o_d, merged.to(o.dtype.element_ty), mask=o_d < D)
    tl.store(lse + i_h * stride_lse_h + i_t, m + tl.log(total))


def span_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask,
    scale: float, softcap: float | None, config: TileConfig | None = None,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None, page_size: int = 0, plan: LaunchPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated inputs; returns ``out [T, Hq, D]`` and ``lse [Hq, T]``.

    ``out``/``lse`` may be preallocated (contiguous, q's dtype / fp32); every row is written.
    With ``page_table`` (int32 ``[B, P]``) and ``page_size``, ``k``/``v`` are the flattened pages
    ``[num_pages * page_size, Hkv, D]`` and key ``n`` of sequence ``b`` is row
    ``page_table[b, n // page_size] * page_size + n % page_size`` (see :mod:`bidiattn.serving.kvcache`).
    ``plan`` (:func:`bidiattn.launch.plan_forward` of the same spans) skips the planning;
    ``config`` (a :class:`~bidiattn.launch.TileConfig`) must then be ``None``.
    """
    t_len, hq, d = q.shape
    if plan is None:
        plan = plan_forward(spans, hq, k.shape[1], d, config)
    else:
        if config is not None:
            raise ValueError("pass either config or plan (the plan carries its config)")
        plan.check(q, k, spans)
    if bf16_in_interpreter(q):
        o32, l32 = span_attention_forward(q.float(), k.float(), v.float(), spans, scale, softcap,
                                          page_table=page_table, page_size=page_size, plan=plan)
        out = o32.to(q.dtype) if out is None else out.copy_(o32)
        return out, (l32 if lse is None else lse.copy_(l32))
    cfg, pack, tiles, order, splits = plan.config, plan.pack, plan.tiles, plan.order, plan.kv_splits
    group = hq // k.shape[1]
    block_d = triton.next_power_of_2(d)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(hq, t_len, device=q.device, dtype=torch.float32) if lse is None else lse
    qk_scale = (scale / softcap) if softcap is not None else scale * LOG2E
    grid = (hq // pack, tiles.rows.numel(), cfg.split_dv * splits)
    paging = (page_table, page_size) if page_table is not None else (spans.cu_seqlens, 0)
    if splits == 1:
        with fits(cfg, d):
            _launch_forward(grid, q, k, v, out, lse, 0, 0, spans, order, tiles, qk_scale, softcap, group, d, cfg,
                            block_d, 1, paging, pack)
        return out, lse
    o_part = torch.empty(splits, t_len, hq, d, device=q.device, dtype=torch.float32)
    l_part = torch.empty(splits, hq, t_len, device=q.device, dtype=torch.float32)
    with fits(cfg, d):
        _launch_forward(grid, q, k, v, o_part[0], l_part[0], o_part.stride(0), l_part.stride(0), spans, order, tiles,
                        qk_scale, softcap, group, d, cfg, block_d, splits, paging, pack)
    return merge_parts(o_part, l_part, out, lse)


def merge_parts(o_part: torch.Tensor, l_part: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over disjoint key sets merged exactly, in one launch: the parts ``o_part [S, T,
    H, D]`` (any float dtype, last dim contiguous) and natural-log ``l_part [S, H, T]`` (fp32; -inf
    where a part holds none of the row's keys: its output there is not read) into ``out [T, H,
    D]`` and ``lse [H, T]``, which are returned."""
    splits, t_len, heads, d = o_part.shape
    _merge_kernel[(t_len * heads,)](
        o_part, l_part, out, lse, heads, o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0),
        l_part.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), D=d, BLOCK_D=triton.next_power_of_2(d),
    )
    return out, lse


def _descriptors(k, v, cfg, block_d, page_size):
    """(k_desc, v_desc, True) for TMA loads of K/V viewed as [keys, Hkv * D] (paged: the
    flattened pages, when every key tile lies inside one page), or (k, v, False) where the
    config or the call rules them out (see ``TileConfig.tma``)."""
    d = k.shape[2]
    box = block_d // 2 if cfg.column_halves else block_d
    usable = (cfg.tma and page_size % cfg.block_n == 0 and d == block_d and 16 <= box <= 256 and k.stride(2) == 1
              and k.stride(1) == d and k.shape[0] < 2**31
              and all(x.stride(0) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0 for x in (k, v)))
    if not usable:
        return k, v, False
    shape = [k.shape[0], k.shape[1] * d]
    box_v = block_d // cfg.split_dv // (2 if cfg.column_halves else 1)
    return (TensorDescriptor(k, shape, [k.stride(0), 1], [cfg.block_n, box]),
            TensorDescriptor(v, shape, [v.stride(0), 1], [cfg.block_n, box_v]), True)


def _launch_forward(grid, q, k, v, out, lse, stride_os, stride_ls, spans, order, tiles, qk_scale, softcap, group, d,
                    cfg, block_d, splits, paging, pack):
    page_table, page_size = paging
    k_desc, v_desc, tma = _descriptors(k, v, cfg, block_d, page_size)
    block_dv = block_d // cfg.split_dv
    halves = cfg.column_halves
    loop = _Loop(BLOCK_N=cfg.block_n, BLOCK_DV=block_dv, WK=block_d // 2 if halves else block_d, WV=block_dv // 2 if halves else block_dv,
                 D=d, PADDED=d < block_d, SOFTCAP=softcap is not None, PAGE_SIZE=page_size, TMA=tma, HALVES=halves)
    _span_fwd_kernel[grid](
        q, k, v, out, lse, spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k, order, page_table, k_desc, v_desc,
        (tiles.seq, tiles.row_start, tiles.rows, tiles.lo_min, tiles.lo_max, tiles.hi_min, tiles.hi_max),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        stride_os, stride_ls, page_table.stride(0), qk_scale, softcap if softcap is not None else 1.0,
        GROUP=group, BLOCK_M=cfg.block_m, KV_SPLITS=splits, PACK=pack, STAGES=cfg.num_stages,
        EDGE_STAGES=cfg.edge_stages or cfg.num_stages, LOOP=loop,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
