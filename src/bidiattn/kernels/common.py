"""Helpers shared by the forward and backward kernels and their launchers.

This module imports no other kernel module, so ``forward`` and ``backward`` can both depend on
it without depending on each other.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

__all__ = ["LOG2E", "bf16_in_interpreter", "fits", "softcap_tanh"]

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels work in base 2 (exp2 is one instruction)
_LOG2E = tl.constexpr(LOG2E)  # the same number, readable inside @triton.jit functions


@triton.jit
def softcap_tanh(b_s, qk_scale, softcap):
    """Softcapped scores in base 2, ``softcap * tanh(s * qk_scale) * LOG2E``, and the ``tanh``
    itself (the backward's derivative term). ``qk_scale`` is ``scale / softcap``. tanh is
    written through exp so that Triton's CPU interpreter runs it too."""
    b_t = 1.0 - 2.0 / (tl.exp(2.0 * (b_s * qk_scale)) + 1.0)
    return b_t * (softcap * _LOG2E), b_t


@contextlib.contextmanager
def fits(cfg, head_dim: int):
    """Turn Triton's launch-time resource error into a ValueError naming the config."""
    try:
        yield
    except OutOfResources as e:
        raise ValueError(f"{cfg} does not fit this GPU at head_dim={head_dim}: {e}") from e


def bf16_in_interpreter(x: torch.Tensor) -> bool:
    """Whether a launcher must run on fp32 copies of ``x`` and its peers: Triton's CPU interpreter
    (``TRITON_INTERPRET=1``) mis-reads bf16, so CPU tests run the same kernels in fp32 and cast
    back; GPUs run real bf16."""
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
