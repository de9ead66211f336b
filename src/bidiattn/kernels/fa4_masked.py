"""FlashAttention-4 with the spans as a ``mask_mod``: one FA4 launch per call, forward and backward.

The packed sequence runs as one FA4 batch of one (``q [1, T, Hq, D]``). The spans' packed bounds
(:meth:`SpanMask.packed_bounds`: key positions over the whole pack, so packed sequences never
see each other) go to FA4 as two int32 ``aux_tensors``, read by a CuTe ``mask_mod`` (``lo[q] <=
kv <= hi[q]``) on the key blocks that are partial. Block sparsity: each query block's full and
partial key blocks (forward) and each key block's query blocks (backward), so absent blocks are
never visited and full ones skip the mask. :func:`block_tables_spec` builds them in closed form
(no sort, no host sync); :mod:`.block_tables` builds the same in one Triton launch, what CUDA
runs. Forward and backward are FA4's own, the lse gradient included. This is the route
FlexAttention's FLASH backend takes, called directly: no Dynamo, the mask function compiled once
per process by FA4's kernel cache.

Self-attention spans; head dims up to 128 on SM90 and SM100, up to 256 on SM90. FA4 needs each
sparse key block to equal its key tile, and its forward and backward tiles differ above head dim
128, so the forward's tables and the backward's are built with blocks of their own
(:func:`mask_blocks`). fa4 plans run it where it was measured fastest (``Plan.masked``,
:func:`bidiattn.launch.masked_layers`); CPU tests check the tables and the calls against a fake
FA4 that reads the mask from the aux tensors and checks the block sizes, GPU tests against the
fp32 reference.

FA4 (``flash-attn-4``, CuTe DSL) is imported on first use, never at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from ..spans import SpanMask

__all__ = ["MaskTables", "block_tables_spec", "device_capability", "fa4_interface", "mask_blocks", "mask_tables",
           "masked_backward", "masked_forward", "masked_unsupported", "span_attention_fa4_masked", "span_mask_mod"]

# The tables' blocks per head-dim bound: (forward, windowed forward, backward), each (query rows,
# keys); FA4 4.0.0b36 takes its key tile from the block size. SM90: FA4's own tiles under block
# sparsity, forward 128 x (128, 112, 80) and the backward's key tile (128, 96, 64) with 64-row
# query tiles (a 128-row block is two), except windowed hd256 forwards (SpanMask.window set):
# 128 x 64, FA4's window-kernel tile there (80 keys measured 4% slower on sliding layers, PERF.md
# A22); SM100: 128 x 128 up to head dim 128.
SM90_BLOCKS = ((128, (128, 128), (128, 128), (128, 128)), (192, (128, 112), (128, 112), (128, 96)),
               (256, (128, 80), (128, 64), (128, 64)))
SM100_BLOCKS = ((128, (128, 128), (128, 128), (128, 128)),)
MAX_HEAD_DIM = SM90_BLOCKS[-1][0]


def _tiers(capability: tuple[int, int]):
    """The block table of a compute capability: SM90's, or SM100's for the others."""
    return SM90_BLOCKS if capability[0] == 9 else SM100_BLOCKS


@dataclass(frozen=True)
class MaskTables:
    """The spans as FA4 reads them: packed bounds ``lo``/``hi`` (int32 ``[T]``), per query block
    the partial and full key blocks (``kv_num [1, 1, nq]``, ``kv_idx [1, 1, nq, nk]``, and the
    ``full_*`` pair) of blocks ``block``, per key block the query blocks (``q_*``, for the
    backward; ``None`` for a forward-only table) of blocks ``backward_block``, all int32."""

    lo: torch.Tensor
    hi: torch.Tensor
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_kv_num: torch.Tensor
    full_kv_idx: torch.Tensor
    q_num: torch.Tensor | None
    q_idx: torch.Tensor | None
    full_q_num: torch.Tensor | None
    full_q_idx: torch.Tensor | None
    block: tuple[int, int]
    backward_block: tuple[int, int]


def mask_blocks(head_dim: int, capability: tuple[int, int] = (9, 0), window: int | None = None
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (forward, backward) ``(query, key)`` blocks of the tables at ``head_dim`` on a GPU of
    compute ``capability``, for spans cut by a sliding ``window`` or not (see ``SM90_BLOCKS``).
    ``ValueError`` above the largest head dim the capability takes (:func:`masked_unsupported`)."""
    for bound, forward, windowed, backward in _tiers(capability):
        if head_dim <= bound:
            return (forward if window is None else windowed), backward
    raise ValueError(_too_wide(head_dim, capability))


def mask_tables(spans: SpanMask, head_dim: int, backward: bool = True, capability: tuple[int, int] = (9, 0),
                window: int | None = None) -> MaskTables:
    """:class:`MaskTables` of self-attention ``spans`` for ``head_dim`` on a GPU of compute
    ``capability`` (blocks from :func:`mask_blocks` for ``window``, else the spans' hint), built
    without a host sync: the one-launch Triton kernel of :mod:`.block_tables` on CUDA (or under
    Triton's interpreter), else its PyTorch spec :func:`block_tables_spec`; ``backward=False``
    leaves out the backward's."""
    why = masked_unsupported(spans, head_dim, capability)
    if why is not None:
        raise ValueError(why)
    forward_block, backward_block = mask_blocks(head_dim, capability, spans.window if window is None else window)
    build = block_tables_spec
    if (spans.lo.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and importlib.util.find_spec("triton"):
        from .block_tables import block_tables as build
    return MaskTables(*build(spans, forward_block, backward_block if backward else None),
                      block=forward_block, backward_block=backward_block)


def block_tables_spec(spans: SpanMask, forward_block: tuple[int, int],
                      backward_block: tuple[int, int] | None) -> tuple:
    """The tables of self-attention ``spans`` in PyTorch ops, the spec of
    :func:`bidiattn.kernels.block_tables.block_tables`: ``(lo, hi, kv_num, kv_idx, full_kv_num,
    full_kv_idx, q_num, q_idx, full_q_num, full_q_idx)`` as :class:`MaskTables` holds them, the
    forward's at ``forward_block = (query rows, keys)``, the backward's at ``backward_block`` (None:
    none). Each index row lists its runs of blocks first, then valid blocks never read."""
    if not spans.is_self_attention:
        raise ValueError("block tables take self-attention spans only (no cu_seqlens_k)")
    glo, ghi = spans.packed_bounds()
    t = spans.total_tokens
    bq, bk = forward_block
    v0, v1, f0, f1 = _block_bounds(glo, ghi, t, bq, bk)
    nk = -(-t // bk)
    forward = (*_runs(v0, f0 - v0, f1, v1 + 1 - f1, nk), *_runs(f0, f1 - f0, f1, torch.zeros_like(f1), nk))
    backward = (None,) * 4
    if backward_block is not None:
        bq, bk = backward_block
        v0, v1, f0, f1 = _block_bounds(glo, ghi, t, bq, bk)
        kb = torch.arange(-(-t // bk), device=glo.device)
        # Per key block, the query blocks whose runs hold it: each bound is non-decreasing over
        # the query blocks, so each set is one run of query blocks.
        first = torch.searchsorted(v1, kb)  # visited: v0 <= kb <= v1
        last = torch.searchsorted(v0, kb, right=True) - 1
        full_first = torch.searchsorted(f1, kb, right=True)  # full: f0 <= kb < f1
        full_last = torch.searchsorted(f0, kb, right=True) - 1
        full = full_last >= full_first
        full_first = torch.where(full, full_first, last + 1)
        full_last = torch.where(full, full_last, last)
        nq = -(-t // bq)
        backward = (*_runs(first, full_first - first, full_last + 1, last - full_last, nq),
                    *_runs(full_first, full_last + 1 - full_first, full_first, torch.zeros_like(kb), nq))
    return (glo.to(torch.int32), ghi.to(torch.int32), *forward, *backward)


def _block_bounds(glo: torch.Tensor, ghi: torch.Tensor, t: int, bq: int, bk: int):
    """Per query block of ``bq`` rows: the key blocks of ``bk`` keys it visits, ``[v0, v1]``, and
    those every row sees whole, ``[f0, f1)`` (``f1 == f0``: none); all four non-decreasing. Rows
    may be empty (``lo > hi``): a block of them visits none (``v1 == v0 - 1``)."""
    first = torch.arange(0, t, bq, device=glo.device)
    last = (first + bq - 1).clamp_(max=t - 1)
    v0 = glo[first] // bk
    v1 = torch.maximum(ghi[last] // bk, v0 - 1)
    f0 = -(-glo[last] // bk)
    return v0, v1, f0, torch.maximum((ghi[first] + 1) // bk, f0)


def _runs(start1, count1, start2, count2, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[1, 1, n]`` and index rows ``[1, 1, n, width]`` (int32): ``start1 + j`` for ``j <
    count1``, then ``start2 + j - count1``, clamped to valid blocks."""
    j = torch.arange(width, device=start1.device)
    idx = torch.where(j < count1[:, None], start1[:, None] + j, start2[:, None] + (j - count1[:, None]))
    return (count1 + count2).to(torch.int32)[None, None], idx.clamp_(0, width - 1).to(torch.int32)[None, None]


@functools.cache
def span_mask_mod():
    """The CuTe ``mask_mod``: query row ``q`` keeps key ``kv`` where ``lo[q] <= kv <= hi[q]``,
    ``lo``/``hi`` the two aux tensors. Built on first use (imports CUTLASS's DSL)."""
    import cutlass
    import cutlass.cute as cute

    @cute.jit
    def span_mask(b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        # The row index arrives as a one-lane SSA value: materialize it to index the bounds.
        rows = cute.make_rmem_tensor(q_idx.shape, cutlass.Int32)
        rows.store(q_idx)
        row = rows[0]
        lo = cute.make_rmem_tensor(1, cutlass.Int32)
        lo[0] = aux_tensors[0][row]
        hi = cute.make_rmem_tensor(1, cutlass.Int32)
        hi[0] = aux_tensors[1][row]
        return (kv_idx >= lo.load()) & (kv_idx <= hi.load())

    return span_mask


def fa4_interface():
    """FA4's Python interface (``flash_attn.cute.interface``), imported on first use; the segment
    launches (:mod:`.fa4`) call it too. It lives here, below the planner, because the planner
    imports this module and :mod:`.fa4` imports the planner."""
    from flash_attn.cute import interface

    return interface


def masked_unsupported(spans: SpanMask, head_dim: int, capability: tuple[int, int] = (9, 0)) -> str | None:
    """Why this path cannot take ``spans`` at ``head_dim`` on a GPU of compute ``capability``
    (beyond what FA4 itself refuses), or None."""
    if not spans.is_self_attention:
        return "the fa4 mask_mod path takes self-attention spans only (no cu_seqlens_k)"
    return _too_wide(head_dim, capability) if head_dim > _tiers(capability)[-1][0] else None


def _too_wide(head_dim: int, capability: tuple[int, int]) -> str:
    return (f"the fa4 mask_mod path takes head dims up to {_tiers(capability)[-1][0]} on compute capability "
            f"{capability[0]}.{capability[1]}, got {head_dim}")


def device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA ``device``; SM90's for others (the CPU tests' fake FA4)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


def _sparse(num, idx, full_num, full_idx, block):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return BlockSparseTensorsTorch(num, idx, full_num, full_idx, block_size=block)


def masked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: MaskTables, scale: float,
                   softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One FA4 forward launch over contiguous ``q``/``k``/``v`` ``[T, H, D]`` with the span mask
    function and ``tables``' block sparsity: ``out [T, Hq, D]``, natural-log ``lse [Hq, T]``."""
    fa4 = fa4_interface()
    out, lse = fa4._flash_attn_fwd(
        q[None], k[None], v[None], softmax_scale=scale, softcap=softcap, mask_mod=span_mask_mod(),
        block_sparse_tensors=_sparse(tables.kv_num, tables.kv_idx, tables.full_kv_num, tables.full_kv_idx,
                                     tables.block),
        aux_tensors=[tables.lo, tables.hi], return_lse=True,
    )[:2]
    return out[0], lse[0]


def masked_backward(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, tables: MaskTables, scale: float,
                    softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA4's backward of :func:`masked_forward` fed ``out``/``lse`` (those of this launch, or of a
    whole attention this launch is a key-disjoint part of: then the result is this part's share of
    the gradients): ``(dq, dk, dv)``."""
    if tables.q_num is None:
        raise RuntimeError("these mask tables were built without the backward's (mask_tables(backward=False))")
    fa4 = fa4_interface()
    dq, dk, dv = fa4._flash_attn_bwd(
        q[None], k[None], v[None], out[None], dout[None].contiguous(), lse[None], softmax_scale=scale,
        softcap=softcap or 0.0, mask_mod=span_mask_mod(), aux_tensors=[tables.lo, tables.hi],
        block_sparse_tensors=_sparse(tables.q_num, tables.q_idx, tables.full_q_num, tables.full_q_idx,
                                     tables.backward_block),
        dlse=None if dlse is None else dlse[None].contiguous(),
    )[:3]
    return dq[0], dk[0], dv[0]


class _MaskedFA4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tables: MaskTables, scale: float, softcap: float | None):
        ctx.set_materialize_grads(False)
        out, lse = masked_forward(q, k, v, tables, scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tables, ctx.scale, ctx.softcap = tables, scale, softcap
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        return (*masked_backward(dout, dlse, q, k, v, out, lse, ctx.tables, ctx.scale, ctx.softcap), None, None, None)


def span_attention_fa4_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float,
                              softcap: float | None, tables: MaskTables | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [T, Hq, D]`` and natural-log ``lse [Hq, T]`` (fp32) of validated inputs through one
    FA4 launch with the spans' ``mask_mod``; differentiable (FA4's backward, lse gradient
    included). ``tables``: :func:`mask_tables` of ``spans``; built here when not given, or when the
    call needs gradients and ``tables`` lacks the backward's (a forward plan's)."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if tables is None or (needs_grad and tables.q_num is None):  # else a plan's, checked when it was made
        capability = device_capability(q.device)
        why = masked_unsupported(spans, q.shape[-1], capability)
        if why is not None:
            raise ValueError(why)
        tables = mask_tables(spans, q.shape[-1], backward=needs_grad, capability=capability)
    q, k, v = (x.contiguous() for x in (q, k, v))
    if not needs_grad:  # no autograd node to build: the launch alone
        return masked_forward(q, k, v, tables, scale, softcap)
    return _MaskedFA4.apply(q, k, v, tables, scale, softcap)
