"""FlashAttention-4 backend: span masks as a few FA4 varlen window launches (no mask tensor).

The forward runs the launches of a :class:`~bidiattn.segments.SegmentPlan`: each launch is
FA4's varlen kernel over row segments (``cu_seqlens_q``/``seqused_q`` point at the segment's
rows inside the packed queries, ``cu_seqlens_k``/``seqused_k`` at its keys inside the packed
keys), with the causal / sliding-window mask FA4 already has. Segments never share rows, so
every launch writes its rows of one ``out``/``lse`` in place; keys are read where they are,
never copied. The result is exact: each row sees exactly its span.

The backward is bidiattn's deterministic Triton backward, fed FA4's ``out`` and ``lse``: FA4's
own varlen backward writes dK/dV per segment, and segments of one launch share keys (every text
run of a sequence reads its prefix), so its writes would race.

FA4 (``flash-attn-4``, CuTe DSL) is imported on first use, never at import time.
"""

from __future__ import annotations

import torch

from ..segments import SegmentPlan, plan_segments
from ..spans import SpanMask

__all__ = ["STRATEGIES", "fa4_attention", "fa4_unsupported", "span_attention_fa4_forward", "span_attention_fa4"]

FA4_DTYPES = (torch.float16, torch.bfloat16)
STRATEGIES = ("auto", "segments", "mask_mod")


def _fa4_interface():
    from flash_attn.cute import interface

    return interface


def fa4_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Exception | None:
    """Why FA4 cannot take these inputs here, or None if it can (imports FA4; reads the GPU's
    compute capability: call it at dispatch, not at import)."""
    try:
        _fa4_interface()
    except ImportError as err:
        return ValueError(f"backend='fa4' needs FlashAttention-4 (pip install 'bidiattn[fa4]'): {err}")
    if q.device.type != "cuda":
        return ValueError(f"backend='fa4' needs CUDA tensors, got {q.device}")
    if q.dtype not in FA4_DTYPES:
        return TypeError(f"backend='fa4' takes float16 or bfloat16, got {q.dtype}")
    major, minor = torch.cuda.get_device_capability(q.device)
    d = q.shape[-1]
    if major == 9:
        ok = d % 8 == 0 and 8 <= d <= 256
        limit = "multiples of 8 up to 256"
    elif major in (10, 11):
        ok = (d % 8 == 0 and 8 <= d <= 128) or d == 256
        limit = "multiples of 8 up to 128, and 256"
    else:
        return ValueError(f"backend='fa4' runs on SM90/SM100 GPUs (Hopper, Blackwell), this is sm_{major}{minor}")
    if not ok:
        return ValueError(f"backend='fa4' on sm_{major}{minor} supports head dims {limit}, got {d}")
    return None


def span_attention_fa4_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float, softcap: float | None,
    plan: SegmentPlan | None = None, *, page_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [T, Hq, D]`` and natural-log ``lse [Hq, T]`` (fp32) through FA4 launches.

    With ``page_table`` (int32 ``[B, P]``), ``k``/``v`` are K/V pages ``[num_pages, page_size,
    Hkv, D]`` and the plan must be paged (:func:`plan_segments` with ``paged=True``): segment
    ``j`` reads its keys through row ``seq[j]`` of the table (the rows are gathered per launch,
    ``S x P`` ints; no K/V is copied).

    ``plan`` defaults to :func:`plan_segments` of ``spans`` (one host sync); pass one plan to
    every layer that shares the spans. Inputs are pre-validated by :func:`bidiattn.attention`.
    """
    fa4 = _fa4_interface()
    paged = page_table is not None
    plan = plan_segments(spans, paged=paged) if plan is None else plan
    if plan.spans is not spans:
        raise ValueError("segment_plan was planned from another SpanMask; plan_segments(spans) of the spans passed")
    if plan.paged != paged:
        raise ValueError(f"a {'paged' if plan.paged else 'contiguous'} segment plan for a "
                         f"{'paged' if paged else 'contiguous'} cache; plan_segments(spans, paged={paged})")
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)

    def launch(call):
        keys = (dict(page_table=page_table[call.seq.long()].contiguous(), cu_seqlens_k=None) if paged
                else dict(cu_seqlens_k=call.k_start))
        fa4._flash_attn_fwd(
            q, k, v,
            cu_seqlens_q=call.q_start, seqused_q=call.q_len, seqused_k=call.k_len,
            max_seqlen_q=call.max_q_len, max_seqlen_k=call.max_k_len,
            softmax_scale=scale, causal=False, softcap=softcap,
            window_size_left=call.window_left, window_size_right=call.window_right,
            pack_gqa=None, return_lse=True, out=out, lse=lse, **keys,
        )

    for call in plan.calls:
        launch(call)
    return out, lse


class _SpanAttentionFA4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spans, scale, softcap, plan):
        out, lse = span_attention_fa4_forward(q, k, v, spans, scale, softcap, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spans, ctx.scale, ctx.softcap = spans, scale, softcap
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from .backward import span_attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = span_attention_backward(dout, q, k, v, out, lse, ctx.spans, ctx.scale, ctx.softcap, dlse)
        return dq, dk, dv, None, None, None, None


def span_attention_fa4(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float, softcap: float | None,
    plan: SegmentPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable :func:`span_attention_fa4_forward` (backward: bidiattn's Triton kernels)."""
    return _SpanAttentionFA4.apply(q, k, v, spans, scale, softcap, plan)


def fa4_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float, softcap: float | None, *,
    return_lse: bool, plan: SegmentPlan | None, strategy: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``backend="fa4"`` of :func:`bidiattn.attention` on validated inputs: picks the strategy
    (see its ``fa4_strategy``), refuses what a strategy cannot do, returns ``(out, lse)``
    (``lse`` is ``None`` from ``mask_mod``, which never returns one)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"fa4_strategy must be one of {STRATEGIES}, got {strategy!r}")
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if strategy == "auto":
        mask_mod_ok = needs_grad and spans.is_self_attention and not return_lse and q.shape[-1] <= 128
        strategy = "mask_mod" if mask_mod_ok else "segments"
    if strategy == "segments":
        return span_attention_fa4(q, k, v, spans, scale, softcap, plan)
    if not spans.is_self_attention:
        raise ValueError("fa4_strategy='mask_mod' takes self-attention spans only; use 'segments'")
    if return_lse:
        # The FLASH backend's lse is ln(2) times the true one (torch 2.11, FA4 4.0.0b36):
        # refused rather than returned wrong.
        raise ValueError("fa4_strategy='mask_mod' returns no lse (FlexAttention's FLASH lse is wrong by a "
                         "factor ln 2 in the tested versions); use 'segments'")
    if needs_grad and q.shape[-1] > 128:
        # One BlockMask serves both passes; FA4 wants 80-key blocks forward and 64 backward at
        # hd256 on SM90.
        raise ValueError(f"fa4_strategy='mask_mod' has no backward at head dim {q.shape[-1]} (> 128): FA4's "
                         "forward and backward key tiles differ there; use 'segments'")
    from .flex import span_attention_flex

    out, _ = span_attention_flex(q, k, v, spans, scale, softcap, flash=True)
    return out, None
