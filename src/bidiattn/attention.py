"""Public attention entry point: validates inputs and dispatches to a backend."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import torch

from . import reference
from .inputs import check_attention_inputs
from .segments import SegmentPlan
from .spans import SpanMask, as_int

if TYPE_CHECKING:
    from .kernels.forward import LaunchPlan

__all__ = ["attention", "plan_attention", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton", "flex", "fa4")
TRITON_DTYPES = (torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 512
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_missing() -> ImportError | None:
    """An ``ImportError`` with the install hint when Triton cannot be imported, else None."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        missing = ImportError("the triton backend needs Triton, which is not installed: "
                              "pip install 'bidiattn[triton]' (or pip install triton)")
        missing.__cause__ = err
        return missing
    return None


def _triton_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Exception | None:
    """Why the triton backend cannot take these inputs (no CUDA device or interpreter, Triton not
    installed, dtype, head dim), or None if it can."""
    if q.device.type != "cuda" and not _interpreting():
        return ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    missing = _triton_missing()
    if missing is not None:
        return missing
    if q.dtype not in TRITON_DTYPES:
        return TypeError(f"backend='triton' takes float16 or bfloat16, got {q.dtype}")
    d = q.shape[-1]
    if d % 16 or d > TRITON_MAX_HEAD_DIM:
        return ValueError(f"backend='triton' supports head dims that are multiples of 16 up to {TRITON_MAX_HEAD_DIM}, got {d}")
    return None


def _resolve_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     segment_plan: SegmentPlan | None = None) -> tuple[str, Exception | None]:
    """The backend a call runs (``"auto"`` resolved: triton on CUDA where it takes the inputs,
    fa4 instead when a ``segment_plan`` is given and FA4 takes them, else the reference), and
    why triton cannot take the inputs (``None`` if it can; not checked for the reference)."""
    unsupported = _triton_unsupported(q, k, v) if backend != "reference" else None
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" and unsupported is None else "reference"
        if backend == "triton" and segment_plan is not None and not torch.compiler.is_compiling():
            from .kernels.fa4 import fa4_unsupported

            if fa4_unsupported(q, k, v) is None:
                backend = "fa4"
    return backend, unsupported


def _skips_operator(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask) -> bool:
    """Whether a triton call may launch the kernel itself instead of through the
    ``bidiattn::span_attention`` operator, whose dispatch costs host time on every call: only
    where the operator would do
    nothing but call the same launcher — eager (not traced by ``torch.compile``), no gradient
    needed, plain tensors (no fake or other subclass), and no function/dispatch mode or functorch
    transform (``vmap``, ``grad``) that expects to see the operator."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    tensors = (q, k, v, spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k)
    if any(type(x) is not torch.Tensor for x in tensors):
        return False
    return (not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None)


def _flex_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Exception | None:
    """Why the flex backend cannot take these inputs, or None if it can."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return ValueError(f"backend='flex' needs FlexAttention (torch >= 2.5), this is torch {torch.__version__}")
    if q.dtype not in FLEX_DTYPES:
        return TypeError(f"backend='flex' takes float16, bfloat16 or float32, got {q.dtype}")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return ValueError("backend='flex' has no backward on CPU (a FlexAttention limit); use backend='reference'")
    return None


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
    segment_plan: SegmentPlan | None = None,
    fa4_strategy: str = "auto",
    plan: LaunchPlan | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention where each query row sees one contiguous key interval (see :class:`SpanMask`).

    Args:
        q: ``[T, Hq, D]`` packed queries.
        k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA); ``[T_keys, Hkv, D]`` for extend
            spans (queries are the last rows of longer key sequences: a prefill chunk over a
            cache, or decode).
        spans: the mask, e.g. from :func:`bidiattn.rules.build` (or
            :func:`bidiattn.serving.planner.step_spans` for prefill chunks); ``spans.cu_seqlens`` packs
            several sequences (varlen) that never see each other; empty ones (padding slots)
            contribute no rows (tested on reference, triton and flex; not yet run on fa4).
        scale: softmax scale, default ``1/sqrt(D)``.
        softcap: logit softcap ``s -> softcap * tanh(s / softcap)``; ``None`` for none. Both
            take any real number type (numpy's too).
        return_lse: also return the natural-log log-sum-exp ``[Hq, T]`` (fp32).
        backend: ``"triton"`` (fp16/bf16, head dims multiple of 16 up to 512, differentiable
            with a deterministic backward, ``torch.compile``-traceable), ``"flex"`` (PyTorch FlexAttention with a block mask built from the spans;
            fp16/bf16/fp32, compiled on CUDA; eager, slow and forward-only on CPU),
            ``"fa4"`` (FlashAttention-4 on Hopper/Blackwell, fp16/bf16, head dims FA4 supports
            there (SM90: multiples of 8 up to 256): the mask as a few FA4 varlen window launches
            over row segments, see :mod:`bidiattn.segments`; exact; backward through the triton
            kernels; needs ``pip install 'bidiattn[fa4]'``; one host sync per call to plan the
            launches unless ``segment_plan`` is given),
            ``"reference"`` (dense fp32 spec, any float dtype, differentiable) or ``"auto"``:
            fa4 when ``segment_plan`` is given and FA4 takes the inputs (outside
            ``torch.compile``), else triton for CUDA inputs that it supports, else the reference.
            fa4 needs the ``segment_plan`` to pay: planned, its forward is faster than triton's;
            planning in the call (a host sync) makes it slower.
        fa4_strategy: how ``backend="fa4"`` expresses the mask: ``"segments"`` (the launches
            above; backward through the triton kernels), ``"mask_mod"`` (one FA4 launch through
            FlexAttention's FLASH backend: the spans as a ``mask_mod`` plus block sparsity built
            on the device, FA4's own backward; self-attention spans only, no lse, backward up
            to head dim 128) or ``"auto"``: ``mask_mod`` where it can take the call and
            gradients are needed (the faster forward+backward), ``segments`` otherwise (the
            faster forward).
        segment_plan: for ``backend="fa4"``: :func:`bidiattn.segments.plan_segments` of
            ``spans``, built once and shared by the layers that use the same spans (saves the
            planning and its host sync on every call). Ignored by the other backends.
        plan: for the triton kernels: :func:`plan_attention` of these ``spans`` (the same
            object) and head shape, built once and shared by the layers that use them (the
            backward uses its gradient plan when it has one); without it every call plans its
            launch (two small Triton launches per tile table, and their host time).
            ``ValueError`` if the call does not run the triton backend or the plan is for other
            spans or heads.

    The triton backend runs as the operator ``torch.ops.bidiattn.span_attention`` (autograd,
    ``torch.compile``); an eager call that needs no gradient, with plain tensors and no
    dispatch/function mode or functorch transform active, launches the same kernel directly
    (bitwise the same output, less host time per call).

    Returns:
        ``out [T, Hq, D]`` in q's dtype (and ``lse``). Example mask, one sequence of 6 tokens,
        image at 2..3, full layer of gemma3 (``x`` allowed)::

            q\\k 012345
            0    x.....
            1    xx....
            2    xxxx..
            3    xxxx..
            4    xxxxx.
            5    xxxxxx
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    scale = check_attention_inputs(q, k, v, spans, scale, softcap)
    softcap = None if softcap is None else float(softcap)
    backend, unsupported = _resolve_backend(backend, q, k, v, segment_plan)
    if plan is not None:
        from .kernels.forward import LaunchPlan

        if not isinstance(plan, LaunchPlan):
            raise TypeError(f"plan must be a LaunchPlan from bidiattn.plan_attention, got {type(plan).__name__}")
        if backend != "triton":
            raise ValueError(f"plan is a launch plan of the triton backend; this call runs backend={backend!r}")
        plan.check(q, k, spans)
    if backend == "reference":
        return reference.attention(q, k, v, spans, scale=scale, softcap=softcap, return_lse=return_lse)
    if backend == "flex":
        unsupported = _flex_unsupported(q, k, v)
        if unsupported is None and not spans.is_self_attention:
            unsupported = ValueError("backend='flex' takes self-attention spans only (no cu_seqlens_k); use 'triton' or 'reference'")
        if unsupported is not None:
            raise unsupported
        from .kernels.flex import span_attention_flex

        out, lse = span_attention_flex(q, k, v, spans, scale, softcap)
        return (out, lse) if return_lse else out
    if backend == "fa4":
        from .kernels.fa4 import fa4_attention, fa4_unsupported

        unsupported = fa4_unsupported(q, k, v)
        if unsupported is not None:
            raise unsupported
        if segment_plan is not None and not isinstance(segment_plan, SegmentPlan):
            raise TypeError(f"segment_plan must be a SegmentPlan, got {type(segment_plan).__name__}")
        out, lse = fa4_attention(q, k, v, spans, scale, softcap, return_lse=return_lse, plan=segment_plan,
                                 strategy=fa4_strategy)
        return (out, lse) if return_lse else out
    if unsupported is not None:
        raise unsupported
    if _skips_operator(q, k, v, spans):
        from .kernels.forward import span_attention_forward

        out, lse = span_attention_forward(q, k, v, spans, scale, softcap, plan=plan)
        return (out, lse) if return_lse else out
    from .ops import plan_arguments, span_attention

    plan_tensors, plan_meta = plan_arguments(plan) if plan is not None else ([], None)
    out, lse = span_attention(q, k, v, spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k, scale, softcap,
                              plan_tensors, plan_meta)
    return (out, lse) if return_lse else out


def plan_attention(spans: SpanMask, num_q_heads: int, num_kv_heads: int, head_dim: int, *,
                   window: int | None = None, backward: bool = True) -> LaunchPlan:
    """The triton kernels' launch plan for ``spans`` and a head shape (``q [T, Hq, D]``,
    ``k``/``v [T_keys, Hkv, D]`` with ``Hq = num_q_heads``, ``Hkv = num_kv_heads``,
    ``D = head_dim``): tile configs, per-tile bounds and longest-first launch orders, built on
    the spans' device with no host sync. Pass it as ``attention(..., plan=)`` to every layer
    that uses these spans and head shape; ``window`` is the layers' sliding window, if any.
    ``backward``: also plan the gradient kernels (their key and query tiles), for training;
    ``False`` skips that work for inference (a backward through such a plan plans in the call).

    The plan summarizes the mask itself — per tile of query rows the min/max of ``lo``/``hi``
    (row ``i`` sees keys ``lo[i]..hi[i]``), per key tile the rows that see it — so it is valid
    for this ``SpanMask`` object only: :func:`attention` raises ``ValueError`` for a plan made
    from other spans (even equal ones) or another head shape. Spans must be on a CUDA device
    (or run under ``TRITON_INTERPRET=1``); bad sizes, a head count that is not a multiple of
    the K/V head count or a non-positive window raise ``ValueError``; sizes and the window may
    be any integer type (numpy's too; bools and floats raise ``TypeError``). Without Triton
    installed it raises ``ImportError`` naming the install.

    Example (a model's layers sharing one mask)::

        spans = rules.build("gemma3", "official", "full", block_ids=ids)
        plan = bidiattn.plan_attention(spans, 16, 8, 128)
        for layer in layers:
            out = bidiattn.attention(q, k, v, spans, backend="triton", plan=plan)
    """
    if not isinstance(backward, bool):
        raise TypeError(f"backward must be a bool, got {type(backward).__name__}")
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    num_q_heads, num_kv_heads, head_dim = (as_int(num_q_heads, "num_q_heads"), as_int(num_kv_heads, "num_kv_heads"),
                                           as_int(head_dim, "head_dim"))
    window = None if window is None else as_int(window, "window")
    if spans.lo.device.type != "cuda" and not _interpreting():
        raise ValueError(f"plan_attention plans the triton kernels: spans must be on a CUDA device "
                         f"(or TRITON_INTERPRET=1), got {spans.lo.device}")
    missing = _triton_missing()
    if missing is not None:
        raise missing
    from .kernels.forward import plan_forward

    plan = plan_forward(spans, num_q_heads, num_kv_heads, head_dim, window=window)
    if not backward:
        return plan
    from .kernels.backward import plan_backward

    return dataclasses.replace(plan, backward=plan_backward(spans, head_dim))
