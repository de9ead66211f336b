"""Public attention entry point: validates inputs, takes the call's plan, dispatches to its backend."""

from __future__ import annotations

import torch

from . import reference
from .inputs import check_attention_inputs
from .launch import (BACKENDS, Plan, auto_backend, check_plan, fa4_unsupported, gluon_unsupported, planned,
                     triton_unsupported)
from .spans import SpanMask

__all__ = ["attention", "BACKENDS"]

FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def _unsupported(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask) -> Exception | None:
    """Why ``backend`` cannot take this call, or None."""
    if backend == "triton":
        return triton_unsupported(q.device, q.dtype, q.shape[-1])
    if backend == "fa4":
        return fa4_unsupported(q.device, q.dtype, q.shape[-1])
    if backend == "gluon":
        return gluon_unsupported(q.device, q.dtype, q.shape[-1])
    if backend == "flex":
        unsupported = _flex_unsupported(q, k, v)
        if unsupported is None and not spans.is_self_attention:
            unsupported = ValueError("backend='flex' takes self-attention spans only (no cu_seqlens_k); use 'triton' "
                                     "or 'reference'")
        return unsupported
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
    plan: Plan | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention where each query row sees one contiguous key interval (see :class:`SpanMask`).

    Args:
        q: ``[T, Hq, D]`` packed queries.
        k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA); ``[T_keys, Hkv, D]`` for extend
            spans (queries are the last rows of longer key sequences: a prefill chunk over a
            cache, or decode).
        spans: the mask, e.g. from :func:`bidiattn.rules.build` (or
            :func:`bidiattn.serving.prefill.step_spans` for prefill chunks); ``spans.cu_seqlens``
            packs several sequences (varlen) that never see each other; empty ones (padding
            slots) contribute no rows.
        scale: softmax scale, default ``1/sqrt(D)``.
        softcap: logit softcap ``s -> softcap * tanh(s / softcap)``; ``None`` for none. Both
            take any real number type (numpy's too).
        return_lse: also return the natural-log log-sum-exp ``[Hq, T]`` (fp32).
        backend: ``"auto"`` (default: the fastest exact backend that takes the call, see
            :func:`bidiattn.launch.auto_backend`: fa4 on Hopper/Blackwell where FA4 is
            installed and takes the head dim, gluon at head dim 512 on Hopper, triton for
            decode-sized calls, paged keys, inside ``torch.compile``, calls with a softcap at
            head dim 512 and where the others are missing, the reference on CPU or for fp32),
            ``"fa4"`` (FlashAttention-4, fp16/bf16, SM90 head dims multiples of 8 up to 256:
            on SM90 one FA4 launch with the spans as its mask function and block tables, its
            backward FA4's; paged keys and SM100 run the mask as a few FA4 varlen window
            launches over row segments, the backward FA4's per launch where no two segments read
            one key, else the triton kernels'; exact either way; ``pip install
            'bidiattn[fa4]'``), ``"gluon"`` (bidiattn's head-dim-512 forward for SM90, written
            in Triton's Gluon: fp16/bf16, no softcap; the backward the triton kernels'; what
            ``"auto"`` runs at head dim 512 on Hopper), ``"triton"`` (fp16/bf16, head dims
            multiples of 16 up to 512, a deterministic backward, ``torch.compile``-traceable),
            ``"flex"`` (FlexAttention with a block mask built from the spans; compiled on CUDA,
            eager and forward-only on CPU) or ``"reference"`` (dense fp32 spec, any float dtype,
            differentiable).
        plan: :func:`bidiattn.plan` of these ``spans`` (the same object) and head shape, shared
            by the layers that use them; it runs the backend it records (``backend`` must be
            ``"auto"`` or that one). Without it the call plans once per ``SpanMask`` object,
            head shape, backend, dtype and whether gradients are needed, and keeps the plan on
            the spans for the next call (the first call pays the planning: no host sync, except
            fa4's segment plans (paged keys, SM100); inside ``torch.compile`` the triton operator
            plans in the call). ``TypeError`` for another type; ``ValueError`` for a plan made
            for other spans (even equal ones), another head shape or paged keys.

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
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    scale = check_attention_inputs(q, k, v, spans, scale, softcap)
    softcap = None if softcap is None else float(softcap)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if plan is not None:
        check_plan(plan, q, hkv, spans, paged=False, backend=backend)
        run = plan.backend
    elif backend != "auto" or torch.compiler.is_compiling():
        # Traced calls plan nothing outside the operator (the triton operator plans in the call).
        run = backend if backend != "auto" else auto_backend(q.device, q.dtype, d, spans.total_tokens / spans.num_sequences)
    else:
        run = None  # auto: the cached plan's backend takes the call by construction
    if run is not None:
        unsupported = _unsupported(run, q, k, v, spans)
        if unsupported is not None:
            raise unsupported
    if plan is None and not torch.compiler.is_compiling():
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        plan = planned(spans, hq, hkv, d, backend=backend, training=needs_grad, dtype=q.dtype, paged=False,
                       softcap=softcap is not None)
        run = plan.backend
    if run == "reference":
        return reference.attention(q, k, v, spans, scale=scale, softcap=softcap, return_lse=return_lse)
    if run == "flex":
        from .kernels.flex import span_attention_flex

        out, lse = span_attention_flex(q, k, v, spans, scale, softcap)
        return (out, lse) if return_lse else out
    if run == "fa4":
        from .kernels.fa4 import span_attention_fa4

        if plan is None:
            raise ValueError("inside torch.compile, backend='fa4' needs plan=bidiattn.plan(...) built outside the "
                             "compiled code (planning its launches reads the spans on the host)")

        if plan.masked is not None:
            from .kernels.fa4_masked import span_attention_fa4_masked

            out, lse = span_attention_fa4_masked(q, k, v, spans, scale, softcap, tables=plan.masked)
        else:
            out, lse = span_attention_fa4(q, k, v, spans, scale, softcap, plan.segments, plan.backward)
        return (out, lse) if return_lse else out
    if run == "gluon":
        from .kernels.sm90_wide import span_attention_sm90_wide

        if softcap is not None:
            raise ValueError(f"backend='gluon' takes no softcap (got softcap={softcap}); use backend='triton'")
        if plan is None:
            raise ValueError("inside torch.compile, backend='gluon' needs plan=bidiattn.plan(...) built outside the "
                             "compiled code")
        out, lse = span_attention_sm90_wide(q, k, v, spans, scale, plan.gluon)
        return (out, lse) if return_lse else out
    launch = plan.triton if plan is not None else None
    if _skips_operator(q, k, v, spans):
        from .kernels.forward import span_attention_forward

        out, lse = span_attention_forward(q, k, v, spans, scale, softcap, plan=launch)
        return (out, lse) if return_lse else out
    from .ops import plan_arguments, span_attention

    plan_tensors, plan_meta = plan_arguments(launch) if launch is not None else ([], None)
    out, lse = span_attention(q, k, v, spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k, scale, softcap,
                              plan_tensors, plan_meta)
    return (out, lse) if return_lse else out
