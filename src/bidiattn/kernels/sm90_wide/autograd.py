"""The gluon backend as one differentiable call: the Gluon head-dim-512 forward and its three
Gluon backward passes (dV, dK, dQ), fed the forward's ``out`` and ``lse``; exact for any span
mask, deterministic (each key tile's GQA heads are summed inside one program)."""

from __future__ import annotations

import torch

from ...spans import SpanMask, TileSummary
from ..tiles import KeyTiles
from .host import backward_key_tiles, backward_sm90_hd512, forward_sm90_hd512

__all__ = ["span_attention_sm90_wide"]


class _SpanAttentionSm90Wide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spans, scale, tiles, key_tiles):
        if tiles is None:
            from ..tiles import query_tiles
            from .host import BLOCK_M

            tiles = query_tiles(spans, BLOCK_M)
        out, lse = forward_sm90_hd512(q, k, v, spans, scale, tiles=tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spans, ctx.scale, ctx.tiles, ctx.key_tiles = spans, scale, tiles, key_tiles
        ctx.set_materialize_grads(False)  # an unused lse brings no gradient
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype)
        keys = backward_key_tiles(ctx.spans) if ctx.key_tiles is None else ctx.key_tiles  # plan without training
        dq, dk, dv = backward_sm90_hd512(dout, q, k, v, out, lse, ctx.spans, ctx.scale, dlse=dlse,
                                         tiles=(keys, ctx.tiles))
        return dq, dk, dv, None, None, None, None


def span_attention_sm90_wide(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float,
    tiles: tuple[TileSummary, torch.Tensor] | None = None, key_tiles: tuple[KeyTiles, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(out [T, Hq, 512], lse [Hq, T])`` through the Gluon kernels. ``tiles``:
    the plan's query-tile table at 64 rows (forward and dQ); ``key_tiles``: its key-tile table at
    64 keys (dK, dV); each is built in the call where the plan has none. No softcap."""
    return _SpanAttentionSm90Wide.apply(q, k, v, spans, scale, tiles, key_tiles)
