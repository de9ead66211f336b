"""The gluon backend as one differentiable call: the Gluon head-dim-512 forward and its three
Gluon backward passes (dV, dK, dQ), fed the forward's ``out`` and ``lse``; exact for any span
mask, deterministic (each key tile's GQA heads are summed inside one program)."""

from __future__ import annotations

import torch

from ...spans import SpanMask
from .host import backward_sm90_hd512, forward_sm90_hd512
from .plan import GluonPlan, plan_gluon

__all__ = ["span_attention_sm90_wide"]


class _SpanAttentionSm90Wide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spans, scale, plan):
        out, lse = forward_sm90_hd512(q, k, v, spans, scale, config=plan.config, tiles=plan.tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spans, ctx.scale, ctx.plan = spans, scale, plan
        ctx.set_materialize_grads(False)  # an unused lse brings no gradient
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype)
        dq, dk, dv = backward_sm90_hd512(dout, q, k, v, out, lse, ctx.spans, ctx.scale, dlse=dlse,
                                         tiles=ctx.plan.backward_tiles(ctx.spans))
        return dq, dk, dv, None, None, None


def span_attention_sm90_wide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float,
                             plan: GluonPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(out [T, Hq, 512], lse [Hq, T])`` through the Gluon kernels, launched with
    ``plan`` (:func:`~.plan.plan_gluon`: the forward's config and tiles, the backward's tables; a
    plan without training builds the backward's tables in the backward). No softcap."""
    if plan is None:
        plan = plan_gluon(spans)
    return _SpanAttentionSm90Wide.apply(q, k, v, spans, scale, plan)
