"""The gluon backend as one differentiable call: the Gluon head-dim-512 forward, the Triton
kernels' backward (fed the forward's ``out`` and ``lse``; exact for any span mask)."""

from __future__ import annotations

import torch

from ...launch import BackwardPlan
from ...spans import SpanMask, TileSummary
from .host import forward_sm90_hd512

__all__ = ["span_attention_sm90_wide"]


class _SpanAttentionSm90Wide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spans, scale, tiles, backward_plan):
        out, lse = forward_sm90_hd512(q, k, v, spans, scale, tiles=tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spans, ctx.scale, ctx.backward_plan = spans, scale, backward_plan
        ctx.set_materialize_grads(False)  # an unused lse brings no gradient
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from ..backward import span_attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = span_attention_backward(dout, q, k, v, out, lse, ctx.spans, ctx.scale, None, dlse,
                                             plan=ctx.backward_plan)
        return dq, dk, dv, None, None, None, None


def span_attention_sm90_wide(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float,
    tiles: tuple[TileSummary, torch.Tensor] | None = None, backward_plan: BackwardPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(out [T, Hq, 512], lse [Hq, T])``: :func:`~.host.forward_sm90_hd512`
    forward (``tiles``: the plan's query-tile table, built in the call without it), the Triton
    backward (``backward_plan``: its tables, planned in the call without it). No softcap."""
    return _SpanAttentionSm90Wide.apply(q, k, v, spans, scale, tiles, backward_plan)
