"""Span-attention backward: Triton kernels -> launcher.

Three launches (four with ``BackwardConfig.separate_dk_dv``), no atomics, so gradients are
bitwise reproducible:

1. ``delta[h, t] = sum_d o * do - dlse`` (:mod:`.delta`, the softmax-backward row term; ``dlse`` is the
   incoming gradient of the returned lse, zero when lse is not used).
2. dK/dV: one program per (key/value head, tile of ``BLOCK_N`` keys of one sequence), or one
   launch for dV and one for dK. Because ``lo``/``hi`` are non-decreasing over the pack, the
   rows that see a key tile are one contiguous range ``[q_first, q_last]`` (from
   :func:`~bidiattn.kernels.tiles.key_tiles`); the program walks it for every query head of its
   GQA group and sums their contributions in registers.
3. dQ: one program per (query head, query tile), walking the same key range as the forward.

P and dS are recomputed in both 2 and 3: each pass owns the gradient it writes, so no two
programs add into the same element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..launch import BackwardConfig, BackwardPlan, plan_backward
from ..spans import SpanMask
from .common import LOG2E, bf16_in_interpreter, fits, softcap_tanh
from .delta import row_delta
from .indexing import program_tile

__all__ = ["span_attention_backward"]


@triton.jit
def _out_cols(BLOCK_D: tl.constexpr):
    """The gradient columns a program stores, ``0..BLOCK_D - 1``, offset by ``program_id(2)``: a
    run-time zero (the grids have two axes). Unknown at compile time, the offset keeps the
    stores' column masks, and ptxas then schedules the default tiles' loops as fast as with
    the removed ``split_d`` option; compile-time columns made the backward 2-5% slower on an
    H200 (benchmarks/results/refactor-before-after-*)."""
    return tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)


@triton.jit
def _probs(b_q, b_k, b_lse, o_n, lo, hi, seq_len, qk_scale, softcap, masked, SOFTCAP: tl.constexpr,
           MASK_FREE: tl.constexpr):
    """Recompute P for a [M, N] tile; also tanh(x / softcap), the softcap's derivative term.
    With ``MASK_FREE``, the runtime bool ``masked`` false says every (row, key) of the tile is
    allowed: the mask math is skipped."""
    b_s = tl.dot(b_q, tl.trans(b_k))
    if SOFTCAP:
        b_s2, b_t = softcap_tanh(b_s, qk_scale, softcap)
    else:
        b_t = b_s
        b_s2 = b_s * qk_scale
    b_p = tl.math.exp2(b_s2 - b_lse[:, None])
    if MASK_FREE:
        if masked:
            allowed = (o_n[None, :] >= lo[:, None]) & (o_n[None, :] <= hi[:, None]) & (o_n[None, :] < seq_len)
            b_p = tl.where(allowed, b_p, 0.0)
    else:
        allowed = (o_n[None, :] >= lo[:, None]) & (o_n[None, :] <= hi[:, None]) & (o_n[None, :] < seq_len)
        b_p = tl.where(allowed, b_p, 0.0)
    return b_p, b_t


@triton.jit
def _probs_and_grad(b_q, b_k, b_do, b_v, b_lse, b_delta, o_m, o_n, lo, hi, seq_len, qk_scale, softcap, masked,
                    SOFTCAP: tl.constexpr, MASK_FREE: tl.constexpr):
    """Recompute P for a [M, N] tile and dS with respect to the raw q·k (before scale)."""
    b_p, b_t = _probs(b_q, b_k, b_lse, o_n, lo, hi, seq_len, qk_scale, softcap, masked, SOFTCAP, MASK_FREE)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    if SOFTCAP:
        b_ds = b_ds * (1.0 - b_t * b_t)
    return b_p, b_ds


@triton.jit
def _dkdv_step(
    b_dk, b_dv, b_q, b_do, b_k, b_v, i_m, i_h, lse2, delta, span_lo, span_hi, bos, q_last, o_n, seq_len_k,
    stride_lh, qk_scale, softcap, BLOCK_M: tl.constexpr, SOFTCAP: tl.constexpr, PART: tl.constexpr,
):
    """One tile of ``BLOCK_M`` query rows (``b_q``/``b_do`` loaded) against the program's keys."""
    o_m = i_m + tl.arange(0, BLOCK_M)
    m_ok = o_m <= q_last
    rows = bos + o_m.to(tl.int64)
    lo = tl.load(span_lo + rows, mask=m_ok, other=1)
    hi = tl.load(span_hi + rows, mask=m_ok, other=0)
    b_lse = tl.load(lse2 + i_h * stride_lh + rows, mask=m_ok, other=0.0)
    b_delta = tl.load(delta + i_h * stride_lh + rows, mask=m_ok, other=0.0)
    if PART == 1:
        b_p, b_t = _probs(b_q, b_k, b_lse, o_n, lo, hi, seq_len_k, qk_scale, softcap, True, SOFTCAP, False)
    else:
        b_p, b_ds = _probs_and_grad(b_q, b_k, b_do, b_v, b_lse, b_delta, o_m, o_n, lo, hi, seq_len_k,
                                    qk_scale, softcap, True, SOFTCAP, False)
    if PART != 2:
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
    if PART != 1:
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
    return b_dk, b_dv


@triton.jit
def _dkdv_kernel(
    q, k, v, do, lse2, delta, dk, dv, span_lo, span_hi, cu_seqlens, cu_seqlens_k, order, q_desc, do_desc,
    t_seq, t_row, t_rows, t_q_first, t_q_last,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lh,
    scale, qk_scale, softcap,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, PART: tl.constexpr, TMA: tl.constexpr,
):
    # PART 0: dK and dV; 1: dV alone (P only: no do·vᵀ, no dS); 2: dK alone.
    i_hk = tl.program_id(0)
    i_t, keys, i_b, bos, _, bos_k, seq_len_k = program_tile(order, t_seq, t_rows, cu_seqlens, cu_seqlens_k)
    if keys == 0:
        return
    q_first = tl.load(t_q_first + i_t)
    q_last = tl.load(t_q_last + i_t)
    o_n = tl.load(t_row + i_t) + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_c = _out_cols(BLOCK_D)
    n_ok = o_n < seq_len_k
    krow = (bos_k + o_n.to(tl.int64))[:, None] * stride_kt + i_hk * stride_kh
    b_k = tl.load(k + krow + o_d[None, :], mask=n_ok[:, None] & (o_d[None, :] < D), other=0.0)
    b_v = b_k
    if PART != 1:
        b_v = tl.load(v + krow + o_d[None, :], mask=n_ok[:, None] & (o_d[None, :] < D), other=0.0)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Row tiles wholly inside [q_first, q_last] hold rows of this sequence only: with TMA they
    # load unmasked. The last, partial tile (rows past q_last belong to other rows or sequences,
    # which may hold anything) loads through masked pointers, so the gradients stay exact.
    if TMA:
        m_full = q_first + ((q_last + 1 - q_first) // BLOCK_M) * BLOCK_M
    else:
        m_full = q_first
    for i_g in range(GROUP):
        i_h = i_hk * GROUP + i_g
        if TMA:
            for i_m in range(q_first, m_full, BLOCK_M):
                b_q = q_desc.load([(bos + i_m).to(tl.int32), i_h * D])
                b_do = do_desc.load([(bos + i_m).to(tl.int32), i_h * D])
                b_dk, b_dv = _dkdv_step(b_dk, b_dv, b_q, b_do, b_k, b_v, i_m, i_h, lse2, delta, span_lo, span_hi,
                                        bos, q_last, o_n, seq_len_k, stride_lh, qk_scale, softcap, BLOCK_M, SOFTCAP,
                                        PART)
        for i_m in range(m_full, q_last + 1, BLOCK_M):
            o_m = i_m + tl.arange(0, BLOCK_M)
            m_ok = o_m <= q_last
            qrow = (bos + o_m.to(tl.int64))[:, None] * stride_qt + i_h * stride_qh
            b_q = tl.load(q + qrow + o_d[None, :], mask=m_ok[:, None] & (o_d[None, :] < D), other=0.0)
            b_do = tl.load(do + qrow + o_d[None, :], mask=m_ok[:, None] & (o_d[None, :] < D), other=0.0)
            b_dk, b_dv = _dkdv_step(b_dk, b_dv, b_q, b_do, b_k, b_v, i_m, i_h, lse2, delta, span_lo, span_hi, bos,
                                    q_last, o_n, seq_len_k, stride_lh, qk_scale, softcap, BLOCK_M, SOFTCAP, PART)
    out_ok = n_ok[:, None] & (o_c[None, :] < D)
    if PART != 1:
        tl.store(dk + krow + o_c[None, :], (b_dk * scale).to(dk.dtype.element_ty), mask=out_ok)
    if PART != 2:
        tl.store(dv + krow + o_c[None, :], b_dv.to(dv.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse, b_delta, o_m, i_n, lo, hi, seq_len_k, full_start, full_end, qk_scale,
             softcap, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, MASK_FREE: tl.constexpr):
    """One key tile (``b_k``/``b_v`` loaded) of the dQ pass."""
    o_n = i_n + tl.arange(0, BLOCK_N)
    b_p, b_ds = _probs_and_grad(b_q, b_k, b_do, b_v, b_lse, b_delta, o_m, o_n, lo, hi, seq_len_k,
                                qk_scale, softcap, (i_n < full_start) | (i_n >= full_end), SOFTCAP, MASK_FREE)
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k)


@triton.jit
def _dq_kernel(
    q, k, v, do, lse2, delta, dq, span_lo, span_hi, cu_seqlens, cu_seqlens_k, order, k_desc, v_desc,
    t_seq, t_row, t_rows, t_lo_min, t_lo_max, t_hi_min, t_hi_max,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lh,
    scale, qk_scale, softcap,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, MASK_FREE: tl.constexpr, TMA: tl.constexpr,
):
    i_h = tl.program_id(0)
    i_t, rows_n, i_b, bos, seq_len, bos_k, seq_len_k = program_tile(order, t_seq, t_rows, cu_seqlens, cu_seqlens_k)
    if rows_n == 0:
        return
    o_m = tl.load(t_row + i_t) + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_c = _out_cols(BLOCK_D)
    m_ok = o_m < seq_len
    rows = bos + o_m.to(tl.int64)
    lo = tl.load(span_lo + rows, mask=m_ok, other=1)
    hi = tl.load(span_hi + rows, mask=m_ok, other=0)
    qrow = rows[:, None] * stride_qt + i_h * stride_qh
    b_q = tl.load(q + qrow + o_d[None, :], mask=m_ok[:, None] & (o_d[None, :] < D), other=0.0)
    b_do = tl.load(do + qrow + o_d[None, :], mask=m_ok[:, None] & (o_d[None, :] < D), other=0.0)
    b_lse = tl.load(lse2 + i_h * stride_lh + rows, mask=m_ok, other=0.0)
    b_delta = tl.load(delta + i_h * stride_lh + rows, mask=m_ok, other=0.0)
    k_base = k + bos_k * stride_kt + (i_h // GROUP) * stride_kh
    v_base = v + bos_k * stride_kt + (i_h // GROUP) * stride_kh
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_first = (tl.load(t_lo_min + i_t) // BLOCK_N) * BLOCK_N
    # Key tiles in [full_start, full_end) lie inside [lo_max, hi_min]: allowed for every row.
    full_start = tl.cdiv(tl.load(t_lo_max + i_t), BLOCK_N) * BLOCK_N
    full_end = ((tl.load(t_hi_min + i_t) + 1) // BLOCK_N) * BLOCK_N
    n_end = tl.load(t_hi_max + i_t) + 1
    # Key tiles that end inside the sequence load unmasked through TMA; the last, partial one
    # (keys past the sequence belong to the next, which may hold anything) through masked
    # pointers, so dQ stays exact.
    if TMA:
        n_full = tl.maximum(n_first, tl.minimum(n_end, (seq_len_k // BLOCK_N) * BLOCK_N))
        for i_n in range(n_first, n_full, BLOCK_N):
            b_k = k_desc.load([(bos_k + i_n).to(tl.int32), (i_h // GROUP) * D])
            b_v = v_desc.load([(bos_k + i_n).to(tl.int32), (i_h // GROUP) * D])
            b_dq = _dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse, b_delta, o_m, i_n, lo, hi, seq_len_k, full_start,
                            full_end, qk_scale, softcap, BLOCK_N, SOFTCAP, MASK_FREE)
    else:
        n_full = n_first
    for i_n in range(n_full, n_end, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        n_ok = o_n < seq_len_k
        krow = o_n.to(tl.int64)[:, None] * stride_kt
        b_k = tl.load(k_base + krow + o_d[None, :], mask=n_ok[:, None] & (o_d[None, :] < D), other=0.0)
        b_v = tl.load(v_base + krow + o_d[None, :], mask=n_ok[:, None] & (o_d[None, :] < D), other=0.0)
        b_dq = _dq_step(b_dq, b_q, b_do, b_k, b_v, b_lse, b_delta, o_m, i_n, lo, hi, seq_len_k, full_start, full_end,
                        qk_scale, softcap, BLOCK_N, SOFTCAP, MASK_FREE)
    tl.store(dq + qrow + o_c[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=m_ok[:, None] & (o_c[None, :] < D))


def span_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    spans: SpanMask, scale: float, softcap: float | None, dlse: torch.Tensor | None = None,
    config: BackwardConfig | None = None, plan: BackwardPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the forward's ``out`` (and ``lse``, via ``dlse``).

    ``lse`` is the forward's natural-log lse ``[Hq, T]``; shapes as in the forward. ``plan``
    (:func:`bidiattn.launch.plan_backward` of the same spans) skips the planning; ``config`` (a
    :class:`~bidiattn.launch.BackwardConfig`) must then be ``None``.
    """
    if bf16_in_interpreter(q):
        grads = span_attention_backward(do.float(), q.float(), k.float(), v.float(), out.float(), lse, spans,
                                        scale, softcap, dlse, config, plan)
        return tuple(g.to(q.dtype) for g in grads)
    t_len, hq, d = q.shape
    hkv = k.shape[1]
    if plan is None:
        plan = plan_backward(spans, d, config)
    else:
        if config is not None:
            raise ValueError("pass either config or plan (the plan carries its config)")
        plan.check(q, spans)
    cfg = plan.config
    block_d = triton.next_power_of_2(d)
    q, k, v, do, out = (x.contiguous() for x in (q, k, v, do, out))
    lse = lse.contiguous()
    delta = row_delta(out, do, dlse)
    lse2 = lse * LOG2E
    qk_scale = (scale / softcap) if softcap is not None else scale * LOG2E
    cap = softcap if softcap is not None else 1.0
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (q, k, v, do, lse, lse2, delta, spans, scale, qk_scale, cap, hq, hkv, d, block_d, softcap is not None)
    with fits(cfg, d):
        _launch_dkdv(*args, dk, dv, cfg, plan.key_tiles, plan.key_order)
    with fits(cfg.dq_pass, d):
        _launch_dq(*args, dq, cfg.dq_pass, plan.query_tiles, plan.query_order)
    return dq, dk, dv


def _descriptors(a, b, cfg: BackwardConfig, rows: int, block_d: int):
    """``(a_desc, b_desc, True)``: TMA descriptors of two contiguous ``[T, H, D]`` tensors viewed
    as ``[T, H * D]`` with ``[rows, D]`` blocks, or ``(a, b, False)`` where ``cfg.tma`` is off or
    the shapes rule TMA out (see :class:`BackwardConfig`)."""
    d = a.shape[2]
    if not (cfg.tma and d == block_d and 16 <= d <= 256 and a.shape[0] < 2**31
            and all(x.data_ptr() % 16 == 0 and x.is_contiguous() for x in (a, b))):
        return a, b, False
    return tuple(TensorDescriptor(x, [x.shape[0], x.shape[1] * d], [x.shape[1] * d, 1], [rows, d]) for x in (a, b)) + (True,)


def _tile_args(cfg: BackwardConfig, d: int, block_d: int, softcap: bool) -> dict:
    return dict(D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, SOFTCAP=softcap,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_dkdv(q, k, v, do, lse, lse2, delta, spans, scale, qk_scale, cap, hq, hkv, d, block_d, softcap,
                 dk, dv, cfg, kt, order):
    # PART 1 (dV) then 2 (dK), or 0: both in one launch.
    q_desc, do_desc, tma = _descriptors(q, do, cfg, cfg.block_m, block_d)
    for part in ((1, 2) if cfg.separate_dk_dv else (0,)):
        _dkdv_kernel[(hkv, kt.keys.numel())](
            q, k, v, do, lse2, delta, dk, dv, spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k, order,
            q_desc, do_desc, kt.seq, kt.key_start, kt.keys, kt.q_first, kt.q_last,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), scale, qk_scale, cap,
            GROUP=hq // hkv, PART=part, TMA=tma, **_tile_args(cfg, d, block_d, softcap))


def _launch_dq(q, k, v, do, lse, lse2, delta, spans, scale, qk_scale, cap, hq, hkv, d, block_d, softcap, dq, cfg,
               qt, order):
    k_desc, v_desc, tma = _descriptors(k, v, cfg, cfg.block_n, block_d)
    _dq_kernel[(hq, qt.rows.numel())](
        q, k, v, do, lse2, delta, dq, spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k, order, k_desc, v_desc,
        qt.seq, qt.row_start, qt.rows, qt.lo_min, qt.lo_max, qt.hi_min, qt.hi_max,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), scale, qk_scale, cap,
        GROUP=hq // hkv, MASK_FREE=cfg.mask_free_tiles, TMA=tma, **_tile_args(cfg, d, block_d, softcap))
