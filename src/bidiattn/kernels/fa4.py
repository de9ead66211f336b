"""FlashAttention-4 backend: span masks as a few FA4 varlen window launches (no mask tensor).

Forward: the launches of a :class:`~bidiattn.launch.SegmentPlan`, each FA4's varlen kernel over
row segments (``cu_seqlens_q``/``seqused_q`` point at a segment's rows inside the packed
queries, ``cu_seqlens_k``/``seqused_k`` at its keys inside the packed keys) with the causal /
sliding-window mask FA4 already has and the FA4 options the plan chose for the launch
(``pack_gqa``). Segments never share rows, so every launch writes its rows of one ``out``/``lse``
in place; keys are read where they are, never copied. Exact: each row sees exactly its span.

Backward: FA4's own varlen backward, launch by launch, where the plan says so
(``SegmentPlan.fa4_backward``: no key is read by two segments), else bidiattn's Triton backward
fed FA4's ``out`` and ``lse``. FA4's backward writes dK/dV at the keys it reads, and segments of
one launch may share keys (every text run of a sequence reads the prefix before it), so it does
not point into the packed keys as the forward does: it copies each segment's keys and rows into
a layout of their own (segments one after another: an ordinary varlen batch), runs FA4's
backward over it with the forward's ``out``/``lse``, puts dQ back at its rows (every row is in
one segment) and adds dK/dV into fp32 sums at the keys they came from. Exact for any plan: with
the row's true ``lse`` and ``out``, a segment's backward gives its rows' dQ and its share of each
key's dK/dV, and the shares sum over the segments that read the key. The copies of one FA4 call
hold at most twice the keys (the plan's ``grad_chunks``). Not bitwise repeatable (FA4's backward
and the sums add with atomics). Where FA4's backward cannot take the call (SM100's hd256
backward takes no softcap and no lse gradient), the Triton backward runs.

FA4 (``flash-attn-4``, CuTe DSL) is imported on first use, never at import time.
"""

from __future__ import annotations

import torch

from ..launch import BackwardPlan, SegmentPlan
from ..spans import SpanMask
from . import fa4_masked

__all__ = ["span_attention_fa4", "span_attention_fa4_backward", "span_attention_fa4_forward"]


def span_attention_fa4_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None, plan: SegmentPlan,
    *, page_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [T, Hq, D]`` and natural-log ``lse [Hq, T]`` (fp32) through the FA4 launches of
    ``plan`` (validated inputs; the plan made for their spans). No host sync.

    With ``page_table`` (int32 ``[B, P]``), ``k``/``v`` are K/V pages ``[num_pages, page_size,
    Hkv, D]`` and the plan is paged: segment ``j`` reads its keys through row ``seq[j]`` of the
    table (the rows are gathered per launch, ``S x P`` ints; no K/V is copied).
    """
    fa4 = fa4_masked.fa4_interface()
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for call in plan.calls:
        keys = (dict(page_table=page_table[call.seq.long()].contiguous(), cu_seqlens_k=None) if page_table is not None
                else dict(cu_seqlens_k=call.k_start))
        fa4._flash_attn_fwd(
            q, k, v,
            cu_seqlens_q=call.q_start, seqused_q=call.q_len, seqused_k=call.k_len,
            max_seqlen_q=call.max_q_len, max_seqlen_k=call.max_k_len,
            softmax_scale=scale, causal=False, softcap=softcap,
            window_size_left=call.window_left, window_size_right=call.window_right,
            pack_gqa=call.pack_gqa, return_lse=True, out=out, lse=lse, **keys,
        )
    return out, lse


def _expand(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``starts[j] + i`` for ``i < lengths[j]``, segment after segment (int64 ``[total]``,
    ``total`` the lengths' sum, known on the host: no sync)."""
    lengths = lengths.long()
    base = starts.long() - (torch.cumsum(lengths, 0) - lengths)
    return torch.repeat_interleave(base, lengths, output_size=total) + torch.arange(total, device=starts.device)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """int32 ``[S+1]`` prefix sums of ``lengths`` (a varlen batch's ``cu_seqlens``)."""
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def fa4_backward_unsupported(q: torch.Tensor, softcap: float | None, dlse: torch.Tensor | None) -> str | None:
    """Why FA4's backward cannot take this call (FA4 4.0.0b36: SM100's dedicated hd256 backward
    takes neither a softcap nor an lse gradient), or None."""
    if q.device.type != "cuda" or q.shape[-1] != 256 or (softcap is None and dlse is None):
        return None
    if torch.cuda.get_device_capability(q.device)[0] in (10, 11):
        return "FA4's SM100 hd256 backward takes no softcap and no lse gradient"
    return None


def span_attention_fa4_backward(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, scale: float, softcap: float | None, plan: SegmentPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`span_attention_fa4_forward`'s ``out`` (and ``lse`` through
    ``dlse``, or ``None``) by FA4's backward over copied segments (see the module doc); no host
    sync (the copies' sizes are the plan's host ints)."""
    fa4 = fa4_masked.fa4_interface()
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    for call in plan.calls:
        q_start, k_start = call.q_start[:-1], call.k_start[:-1]
        for chunk in call.grad_chunks:
            part = slice(chunk.first, chunk.end)
            rows = _expand(q_start[part], call.q_len[part], chunk.rows)
            keys = _expand(k_start[part], call.k_len[part], chunk.keys)
            grads = fa4._flash_attn_bwd(
                q[rows], k[keys], v[keys], out[rows], dout[rows], lse[:, rows].contiguous(),
                softmax_scale=scale, causal=False, softcap=0.0 if softcap is None else softcap,
                window_size_left=call.window_left, window_size_right=call.window_right,
                cu_seqlens_q=_offsets(call.q_len[part]), cu_seqlens_k=_offsets(call.k_len[part]),
                max_seqlen_q=chunk.max_q_len, max_seqlen_k=chunk.max_k_len,
                dlse=None if dlse is None else dlse[:, rows].contiguous(),
            )
            dq.index_copy_(0, rows, grads[0])
            dk.index_add_(0, keys, grads[1].float())
            dv.index_add_(0, keys, grads[2].float())
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _SpanAttentionFA4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spans, scale, softcap, plan, backward_plan):
        out, lse = span_attention_fa4_forward(q, k, v, scale, softcap, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spans, ctx.scale, ctx.softcap, ctx.plan, ctx.backward_plan = spans, scale, softcap, plan, backward_plan
        ctx.set_materialize_grads(False)  # an unused lse brings no gradient (FA4 then takes dlse=None)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        if ctx.plan.fa4_backward and fa4_backward_unsupported(q, ctx.softcap, dlse) is None:
            dq, dk, dv = span_attention_fa4_backward(dout, dlse, q, k, v, out, lse, ctx.scale, ctx.softcap, ctx.plan)
        else:
            from .backward import span_attention_backward

            dq, dk, dv = span_attention_backward(dout, q, k, v, out, lse, ctx.spans, ctx.scale, ctx.softcap, dlse,
                                                 plan=ctx.backward_plan)
        return dq, dk, dv, None, None, None, None, None


def span_attention_fa4(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float, softcap: float | None,
    plan: SegmentPlan, backward_plan: BackwardPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable :func:`span_attention_fa4_forward`; the backward is FA4's where
    ``plan.fa4_backward`` says so, else the Triton kernels' (``backward_plan``: their tables,
    planned in the call without it). See the module doc."""
    return _SpanAttentionFA4.apply(q, k, v, spans, scale, softcap, plan, backward_plan)
