"""Public attention entry point: validates inputs and dispatches to a backend."""

from __future__ import annotations

import torch

from . import reference
from .spans import SpanMask

__all__ = ["attention", "BACKENDS"]

BACKENDS = ("auto", "reference")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spans: SpanMask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention where each query row sees one contiguous key interval (see :class:`SpanMask`).

    Same arguments and results as :func:`bidiattn.reference.attention`, plus ``backend``:
    ``"reference"`` (dense fp32 spec) or ``"auto"`` (the fastest available backend; today
    only the reference exists, kernels come with later releases).

    Shapes: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, out ``[T, Hq, D]``, lse ``[Hq, T]``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    return reference.attention(q, k, v, spans, scale=scale, softcap=softcap, return_lse=return_lse)
