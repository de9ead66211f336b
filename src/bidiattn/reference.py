"""Reference attention: the executable spec every backend is tested against.

Plain PyTorch, fp32 (or fp64 for fp64 inputs) math on the dense mask built from the spans.
O(T^2) memory per head; for tests and small inputs only.
"""

from __future__ import annotations

import torch

from .inputs import check_attention_inputs
from .spans import SpanMask

__all__ = ["attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spans: SpanMask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention under a :class:`~bidiattn.SpanMask`, computed densely.

    ``out[t, h] = sum_k softmax_k(s[t, h, k]) v[k, h // G]`` over the allowed keys ``k`` of row
    ``t``, with ``s = softcap * tanh(scale * q·k / softcap)`` (or ``scale * q·k`` without a
    softcap) and ``G = Hq / Hkv`` query heads per key/value head (GQA).

    Args:
        q: ``[T, Hq, D]`` packed queries (fp16, bf16, fp32 or fp64).
        k, v: ``[T, Hkv, D]``; ``Hq`` must be a multiple of ``Hkv``.
        spans: the mask; ``spans.total_tokens == T``.
        scale: softmax scale, default ``1/sqrt(D)``.
        softcap: logit softcap, ``None`` for none.
        return_lse: also return the log-sum-exp of the (scaled, capped) logits.

    Returns:
        ``out`` ``[T, Hq, D]`` in q's dtype, and with ``return_lse`` also ``lse`` ``[Hq, T]``
        fp32 (fp64 for fp64 inputs). Every row attends at least itself, so no row is empty.
        Differentiable through autograd.
    """
    scale = check_attention_inputs(q, k, v, spans, scale, softcap)
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    mask = spans.to_dense()
    qf = q.to(math_dtype).transpose(0, 1)
    kf = k.to(math_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.to(math_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    logits = torch.matmul(qf, kf.transpose(1, 2)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse[..., None]), vf).transpose(0, 1).to(q.dtype)
    return (out, lse) if return_lse else out
