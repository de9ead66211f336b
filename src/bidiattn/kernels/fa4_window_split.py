"""A sliding layer as FA4's own window kernel plus masked launches for the keys the window leaves out.

Where every row's span holds the row's window ``[q - W + 1, q]`` (clipped to its sequence), the
span is that window plus at most a part before it (``[lo, q - W]``: an image longer than the
window) and a part after it (``[q + 1, hi]``: image rows seeing the rest of their image)::

    keys ->  0 1 2 3 4 5 6 7    window W=3, an image at 4..6
    row 3    . W W W . . . .    W: FA4's window launch (bit-mask masking)
    row 4    . . W W W a a .    a: the part after the row (a masked launch)
    row 5    . . . W W W a .    b: a part before the window (none here: images
    row 6    . . . . W W W .       longer than W, under rules that keep them whole)
    row 7    . . . . . W W W

One FA4 varlen window launch covers every row; each part that some row has is one masked FA4
launch (:mod:`.fa4_masked`) over the same rows with that part as its spans (kept non-decreasing,
so the block tables hold: rows without the part get an empty span). The key sets are disjoint,
so the outputs merge exactly by their lse (the split-KV merge of :mod:`.forward`, one launch).
Backward: each launch's FA4 backward fed the merged ``out`` and ``lse`` (and the lse gradient)
gives its keys' share of dQ, dK and dV; the shares add.

The point is speed: FA4's window kernel masks a row of a partial tile with one bit-mask
instruction, a mask function costs a few instructions per score element (benchmarks/NOTES.md).
Self-attention spans only; :func:`window_split` says whether a layer splits (one host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spans import SpanMask
from . import fa4_masked

__all__ = ["WindowSplit", "span_attention_fa4_window_split", "window_split"]


@dataclass(frozen=True)
class WindowSplit:
    """The launches of a split layer: FA4's window ``(window - 1, 0)`` over the sequences of
    ``cu_seqlens`` (int32 ``[B+1]``, ``lengths`` int32 ``[B]``, the longest ``max_seqlen``), and the
    mask tables of the parts before and after the window (``None`` where no row has one) with
    the rows that have each (bool ``[T]``)."""

    window: int
    cu_seqlens: torch.Tensor
    lengths: torch.Tensor
    max_seqlen: int
    before: fa4_masked.MaskTables | None
    before_rows: torch.Tensor | None
    after: fa4_masked.MaskTables | None
    after_rows: torch.Tensor | None


def window_split(spans: SpanMask, window: int, head_dim: int, *, backward: bool = True,
                 capability: tuple[int, int] = (9, 0)) -> WindowSplit | None:
    """The :class:`WindowSplit` of self-attention ``spans`` for a window of ``window`` keys, or
    ``None`` where a row's span does not hold its window (then the layer does not split). One
    host sync (whether it splits, which parts occur, the longest sequence); ``backward``: build
    the parts' backward tables too. ``ValueError`` for extend spans or a bad window."""
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    why = fa4_masked.masked_unsupported(spans, head_dim, capability)
    if why is not None:
        raise ValueError(why)
    seq, pos, _ = spans.local_rows()
    lo, hi = spans.lo.long(), spans.hi.long()
    first = (pos - window + 1).clamp(min=0)
    holds = ((lo <= first) & (hi >= pos)).all()
    has_before, has_after = lo < first, hi > pos
    lengths = spans.cu_seqlens[1:] - spans.cu_seqlens[:-1]
    flags = torch.stack([holds.long(), has_before.any().long(), has_after.any().long(),
                         lengths.max()]).cpu().tolist()
    if not flags[0]:
        return None
    bos = spans.cu_seqlens[seq]

    def last_upper(has, upper):
        # The part's upper bound: its own where the row has the part, else the last one before it
        # on the packed key axis (far below zero before any, so that a truncating division by
        # the block size stays negative): non-decreasing, and below the row's lower bound where
        # the row has none, so the block tables skip such rows' blocks.
        return torch.where(has, upper + bos, -(1 << 30)).cummax(0).values - bos

    before = after = None
    if flags[1]:  # [lo, q - W]
        before = SpanMask(lo, last_upper(has_before, pos - window), spans.cu_seqlens, validate=False)
    if flags[2]:  # [q + 1, hi]
        after = SpanMask(pos + 1, last_upper(has_after, hi), spans.cu_seqlens, validate=False)

    def tables(part):
        return None if part is None else fa4_masked.mask_tables(part, head_dim, backward=backward,
                                                                capability=capability)

    return WindowSplit(window, spans.cu_seqlens.to(torch.int32), lengths.to(torch.int32), int(flags[3]),
                       tables(before), has_before if before is not None else None,
                       tables(after), has_after if after is not None else None)


def _parts(split: WindowSplit):
    return [(t, rows) for t, rows in ((split.before, split.before_rows), (split.after, split.after_rows))
            if t is not None]


def _window_kwargs(split: WindowSplit) -> dict:
    return dict(cu_seqlens_q=split.cu_seqlens, cu_seqlens_k=split.cu_seqlens, max_seqlen_q=split.max_seqlen,
                max_seqlen_k=split.max_seqlen, causal=False, window_size_left=split.window - 1,
                window_size_right=0)


class _WindowSplitFA4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, split: WindowSplit, scale: float, softcap: float | None):
        ctx.set_materialize_grads(False)
        fa4 = fa4_masked.fa4_interface()
        parts = _parts(split)
        # Launch s writes part s; the parts' rows without keys there get lse -inf (weight 0).
        o_part = torch.empty(1 + len(parts), *q.shape, dtype=q.dtype, device=q.device)
        l_part = torch.empty(1 + len(parts), q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        fa4._flash_attn_fwd(q, k, v, seqused_q=split.lengths, seqused_k=split.lengths, softmax_scale=scale,
                            softcap=softcap, pack_gqa=False, return_lse=True, out=o_part[0], lse=l_part[0],
                            **_window_kwargs(split))
        for s, (tables, rows) in enumerate(parts, 1):
            o, l = fa4_masked.masked_forward(q, k, v, tables, scale, softcap)
            o_part[s].copy_(o)
            l_part[s].copy_(l).masked_fill_(~rows[None, :], float("-inf"))
        if parts:
            from .forward import merge_parts  # Triton, imported with the kernels

            out, lse = merge_parts(o_part, l_part, torch.empty_like(q), torch.empty_like(l_part[0]))
        else:
            out, lse = o_part[0], l_part[0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.split, ctx.scale, ctx.softcap = split, scale, softcap
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        split = ctx.split
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        fa4 = fa4_masked.fa4_interface()
        grads = fa4._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=ctx.scale,
                                    softcap=ctx.softcap or 0.0, dlse=None if dlse is None else dlse.contiguous(),
                                    **_window_kwargs(split))[:3]
        dq, dk, dv = (g.float() for g in grads)
        for tables, _ in _parts(split):
            for total, part in zip((dq, dk, dv), fa4_masked.masked_backward(dout, dlse, q, k, v, out, lse, tables,
                                                                            ctx.scale, ctx.softcap)):
                total += part.float()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def span_attention_fa4_window_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                    softcap: float | None, split: WindowSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [T, Hq, D]`` and natural-log ``lse [Hq, T]`` (fp32) of validated inputs over the
    spans ``split`` was made from (:func:`window_split`); differentiable (the parts' tables need
    their backward's). No host sync."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _WindowSplitFA4.apply(q, k, v, split, scale, softcap)
