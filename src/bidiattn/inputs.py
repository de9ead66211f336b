"""Validation of attention inputs, shared by every backend's public entry point."""

from __future__ import annotations

import math
from numbers import Real

import torch

from .spans import SpanMask

__all__ = ["check_attention_inputs", "check_scale_softcap"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spans: SpanMask,
    scale: float | None,
    softcap: float | None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> float:
    """Check q/k/v/spans/scale/softcap against each other; return the resolved softmax scale.

    Shapes: q ``[T, Hq, D]``, k and v ``[T_keys, Hkv, D]`` with ``Hq % Hkv == 0`` (``T_keys == T``
    unless the spans are extend spans). A shape error whose shapes fit heads-first tensors
    (``[H, T, D]``) says so. ``scale``/``softcap`` may be any real number type (e.g. numpy's).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [T, H, D], got {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == spans.lo.device):
        raise ValueError(f"q, k, v and spans must be on one device, got {q.device}, {k.device}, {v.device}, {spans.lo.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
                         + _heads_first_hint(q, k, v, spans))
    t_q, hq, d = q.shape
    t_k, hkv, d_k = k.shape
    if t_q != spans.total_tokens or t_k != spans.total_keys:
        raise ValueError(
            f"token counts differ: q has {t_q} rows and k/v {t_k}; spans have {spans.total_tokens} query rows "
            f"and {spans.total_keys} keys" + _heads_first_hint(q, k, v, spans)
        )
    if d != d_k:
        raise ValueError(f"head dims differ: q has D={d}, k/v D={d_k}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads Hq={hq} must be a positive multiple of key/value heads Hkv={hkv}")
    return check_scale_softcap(scale, softcap, d)


def _heads_first_hint(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask) -> str:
    """A hint for a shape error, naming the tensors that look ``[H, T, D]`` (their second dim is
    the spans' token count, their first is not); "" when none does."""
    expected = (("q", q, spans.total_tokens), ("k", k, spans.total_keys), ("v", v, spans.total_keys))
    flipped = [name for name, t, n in expected if t.shape[1] == n != t.shape[0]]
    if not flipped:
        return ""
    got = ", ".join(f"{name} {tuple(t.shape)}" for name, t, _ in expected)
    fix = ", ".join(f"{name}.transpose(0, 1)" for name in flipped)
    return (f". bidiattn expects [T, H, D] (tokens first); got {got} for {spans.total_tokens} query rows and "
            f"{spans.total_keys} keys — did you pass [H, T, D]? use {fix}")


def check_scale_softcap(scale: float | None, softcap: float | None, head_dim: int) -> float:
    """Check the softmax scale and logit softcap (any real number type: Python's or numpy's);
    return the scale as a float (default ``1/sqrt(head_dim)``)."""
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, Real) or not math.isfinite(softcap) or softcap <= 0
    ):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    return float(scale)
