"""PyTorch operator registration of the Triton kernels: ``torch.ops.bidiattn.*``.

The forward and backward are ``torch.library.custom_op`` s with fake (meta) implementations,
joined by ``register_autograd``: eager autograd works, and ``torch.compile(fullgraph=True)``
traces a model that calls them as opaque nodes. Spans travel as their four tensors (``lo``,
``hi``, ``cu_seqlens``, ``cu_seqlens_k``) and a launch plan as a tensor list and an int list
(:func:`plan_arguments`), because an operator schema only takes tensors, lists and scalars.

No ``from __future__ import annotations`` here: the schema is inferred from real annotations.
"""

import weakref
from typing import Optional

import torch

from .kernels.backward import span_attention_backward
from .kernels.forward import span_attention_forward
from .kernels.tiles import KeyTiles
from .launch import BackwardConfig, BackwardPlan, LaunchPlan, TileConfig
from .spans import SpanMask, TileSummary

__all__ = ["plan_arguments", "span_attention", "span_attention_backward_op"]


def _spans(lo: torch.Tensor, hi: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor,
           total_keys: int) -> SpanMask:
    # Validated by the public entry point already; re-checking here would sync the host.
    return SpanMask(lo, hi, cu_seqlens, validate=False, cu_seqlens_k=cu_seqlens_k, total_keys=total_keys)


_FORWARD_INTS = 11  # ints of the forward part of a plan (see plan_arguments)
_FORWARD_TENSORS = 9
_BACKWARD_INTS = 7  # ints of each of the gradient plan's two pass configs


def plan_arguments(plan: LaunchPlan) -> tuple[list[torch.Tensor], list[int]]:
    """A :class:`LaunchPlan` as operator arguments: its tensors (tile arrays, launch orders) and
    its launch parameters as ints, resolved (edge-loop depth, key-range splits, the dQ pass's
    tiles) so none is optional; the gradient plan, if any, follows the forward's. Plain
    attribute reads, so ``torch.compile`` traces them as constants. The tile summaries' row
    counts are not passed: they follow from the configs (``block_m // pack``, the dQ pass's
    ``block_m``), as in :func:`~bidiattn.launch.plan_forward` and ``plan_backward``."""
    t, c = plan.tiles, plan.config
    tensors = [t.seq, t.row_start, t.rows, t.lo_min, t.lo_max, t.hi_min, t.hi_max, t.num_tiles, plan.order]
    ints = [c.block_m, c.block_n, c.num_warps, c.num_stages, c.split_dv, int(c.pack_gqa), c.edge_stages or c.num_stages,
            int(c.tma), int(c.column_halves), plan.pack, plan.kv_splits]
    b = plan.backward
    if b is not None:
        kt, qt = b.key_tiles, b.query_tiles
        tensors += [kt.seq, kt.key_start, kt.keys, kt.q_first, kt.q_last, b.key_order,
                    qt.seq, qt.row_start, qt.rows, qt.lo_min, qt.lo_max, qt.hi_min, qt.hi_max, qt.num_tiles, b.query_order]
        for x in (b.config, b.config.dq_pass):
            ints += [x.block_m, x.block_n, x.num_warps, x.num_stages, int(x.separate_dk_dv), int(x.mask_free_tiles),
                     int(x.tma)]
    return tensors, ints


def _plan(spans: SpanMask, q: torch.Tensor, k: torch.Tensor, tensors: list[torch.Tensor], ints: list[int]) -> LaunchPlan:
    """The forward part of :func:`plan_arguments`, back (the config with its optional fields resolved)."""
    bm, bn, warps, stages, split_dv, pack_gqa, edge, tma, halves, pack, kv_splits = ints[:_FORWARD_INTS]
    config = TileConfig(bm, bn, warps, stages, split_dv, kv_splits, bool(pack_gqa), edge, bool(tma), bool(halves))
    *arrays, order = tensors[:_FORWARD_TENSORS]
    return LaunchPlan(weakref.ref(spans), q.shape[1], k.shape[1], q.shape[2], config, pack,
                      TileSummary(bm // pack, *arrays), order, kv_splits)


def _backward_plan(spans: SpanMask, q: torch.Tensor, tensors: list[torch.Tensor], ints: list[int]) -> BackwardPlan | None:
    """The gradient part of :func:`plan_arguments`, back; ``None`` if the plan had none."""
    if len(ints) == _FORWARD_INTS:
        return None
    main, dq = ints[_FORWARD_INTS : _FORWARD_INTS + _BACKWARD_INTS], ints[_FORWARD_INTS + _BACKWARD_INTS :]

    def config(x, dq_config=None):
        bm, bn, warps, stages, separate, mask_free, tma = x
        return BackwardConfig(bm, bn, warps, stages, dq_config, bool(separate), bool(mask_free), bool(tma))

    cfg = config(main, None if dq == main else config(dq))
    kt, key_order, qt, query_order = (tensors[_FORWARD_TENSORS : _FORWARD_TENSORS + 5], tensors[_FORWARD_TENSORS + 5],
                                      tensors[_FORWARD_TENSORS + 6 : -1], tensors[-1])
    return BackwardPlan(weakref.ref(spans), q.shape[2], cfg, KeyTiles(*kt), key_order,
                        TileSummary(cfg.dq_pass.block_m, *qt), query_order)


@torch.library.custom_op("bidiattn::span_attention", mutates_args=())
def span_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
    cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float, softcap: Optional[float],
    plan_tensors: list[torch.Tensor], plan_meta: Optional[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``out [T, Hq, D]`` and natural-log ``lse [Hq, T]`` (fp32). Inputs pre-validated;
    ``cu_seqlens_k`` is ``cu_seqlens`` for self-attention; ``plan_tensors``/``plan_meta``: a launch plan made for these spans (:func:`plan_arguments`),
    or ``[]``/``None`` to plan in the call (an operator schema has no optional tensor list)."""
    spans = _spans(lo, hi, cu_seqlens, cu_seqlens_k, k.shape[0])
    plan = _plan(spans, q, k, plan_tensors, plan_meta) if plan_meta is not None else None
    return span_attention_forward(q, k, v, spans, scale, softcap, plan=plan)


@span_attention.register_fake
def _span_attention_fake(q, k, v, lo, hi, cu_seqlens, cu_seqlens_k, scale, softcap, plan_tensors, plan_meta):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("bidiattn::span_attention_backward", mutates_args=())
def span_attention_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor, scale: float, softcap: Optional[float],
    plan_tensors: list[torch.Tensor], plan_meta: Optional[list[int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv)`` from the gradients of ``out`` and ``lse``, bitwise repeatable.
    ``plan_tensors``/``plan_meta``: the forward's plan arguments; its gradient plan is used if
    it has one."""
    spans = _spans(lo, hi, cu_seqlens, cu_seqlens_k, k.shape[0])
    plan = _backward_plan(spans, q, plan_tensors, plan_meta) if plan_meta is not None else None
    return span_attention_backward(dout, q, k, v, out, lse, spans, scale, softcap, dlse, plan=plan)


@span_attention_backward_op.register_fake
def _span_attention_backward_fake(dout, dlse, q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k, scale, softcap,
                                  plan_tensors, plan_meta):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_SAVED = 9  # q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k; the plan's tensors follow


def _setup_context(ctx, inputs, output):
    q, k, v, lo, hi, cu_seqlens, cu_seqlens_k, scale, softcap, plan_tensors, plan_meta = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k, *plan_tensors)
    ctx.scale, ctx.softcap, ctx.plan_meta = scale, softcap, plan_meta


def _backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k = saved[:_SAVED]
    plan_tensors = list(saved[_SAVED:])
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = span_attention_backward_op(dout, dlse, q, k, v, out, lse, lo, hi, cu_seqlens, cu_seqlens_k,
                                            ctx.scale, ctx.softcap, plan_tensors, ctx.plan_meta)
    # One None per input; a list input gets a list of them (autograd matches the structure).
    return dq, dk, dv, None, None, None, None, None, None, [None] * len(plan_tensors), None


span_attention.register_autograd(_backward, setup_context=_setup_context)
