"""PyTorch operator registration of the Triton kernels: ``torch.ops.bidiattn.*``.

The forward and backward are ``torch.library.custom_op`` s with fake (meta) implementations,
joined by ``register_autograd``: eager autograd works, and ``torch.compile(fullgraph=True)``
traces a model that calls them as opaque nodes. Spans travel as their three tensors (``lo``,
``hi``, ``cu_seqlens``, ``cu_seqlens_k``) because an operator schema only takes tensors and scalars.

No ``from __future__ import annotations`` here: the schema is inferred from real annotations.
"""

from typing import Optional

import torch

from .kernels.backward import span_attention_backward
from .kernels.forward import span_attention_forward
from .spans import SpanMask

__all__ = ["span_attention", "span_attention_backward_op"]


def _spans(lo: torch.Tensor, hi: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor,
           total_keys: int) -> SpanMask:
    # Validated by the public entry point already; re-checking here would sync the host.
    return SpanMask(lo, hi, cu_seqlens, validate=False, cu_seqlens_k=cu_seqlens_k, total_keys=total_keys)


@torch.library.custom_op("bidiattn::span_attention", mutates_args=())
def span_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
    cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float, softcap: Optional[float],
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``out [T, Hq, D]`` and natural-log ``lse [Hq, T]`` (fp32). Inputs pre-validated;
    ``cu_seqlens_k`` is ``cu_seqlens`` for self-attention; ``deterministic`` is for the backward."""
    return span_attention_forward(q, k, v, _spans(lo, hi, cu_seqlens, cu_seqlens_k, k.shape[0]), scale, softcap)


@span_attention.register_fake
def _span_attention_fake(q, k, v, lo, hi, cu_seqlens, cu_seqlens_k, scale, softcap, deterministic=True):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("bidiattn::span_attention_backward", mutates_args=())
def span_attention_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor, scale: float, softcap: Optional[float], deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv)`` from the gradients of ``out`` and ``lse``; bitwise repeatable
    when ``deterministic`` (no atomics)."""
    spans = _spans(lo, hi, cu_seqlens, cu_seqlens_k, k.shape[0])
    return span_attention_backward(dout, q, k, v, out, lse, spans, scale, softcap, dlse, deterministic=deterministic)


@span_attention_backward_op.register_fake
def _span_attention_backward_fake(dout, dlse, q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k, scale, softcap,
                                  deterministic=True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, lo, hi, cu_seqlens, cu_seqlens_k, scale, softcap, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k)
    ctx.scale, ctx.softcap, ctx.deterministic = scale, softcap, deterministic


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = span_attention_backward_op(dout, dlse, q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k,
                                            ctx.scale, ctx.softcap, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None


span_attention.register_autograd(_backward, setup_context=_setup_context)
