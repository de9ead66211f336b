"""Segment decomposition: a span mask as a few window-attention launches over row segments.

Kernels that only know causal / sliding-window masks (FlashAttention's varlen interface, FA4)
can still run any :class:`~bidiattn.spans.SpanMask` exactly: cut each sequence's query rows
into runs whose intervals follow one *shape*, and give each run its own key range. In a varlen
launch with window ``(L, R)`` (``None`` = unbounded), a run of rows at key positions
``[p_first, p_end)`` over keys ``[k0, k1)`` lets the row at position ``p`` see::

    k0 <= k < k1,   p + (k1 - p_end) - L <= k <= p + (k1 - p_end) + R

(query ``i`` of a run is aligned with key ``i + k_len - q_len``, FlashAttention's convention
for ``seqlen_k > seqlen_q``). Four shapes cover every rule of :mod:`bidiattn.rules`:

=========  ==================================  =========================  ====================
kind       rows of the run                     keys ``[k0, k1)``          window ``(L, R)``
=========  ==================================  =========================  ====================
full       same ``lo``, same ``hi``            ``[lo, hi + 1)``           ``(None, None)``
causal     same ``lo``, ``hi - p`` constant    ``[lo, p_end + hi - p)``   ``(None, 0)``
window     ``lo - p``, ``hi - p`` constant     ``[lo_0, p_end + hi - p)`` ``(hi - lo, 0)``
open       ``lo - p`` constant, same ``hi``    ``[lo_0, hi + 1)``         ``(hi + 1 - p_end - (lo_0 - p_0), None)``
=========  ==================================  =========================  ====================

Example, gemma3 full layer, one sequence of 8 tokens with an image at 2..4: text rows 0..1
are one causal run, the image rows one full run over keys ``[0, 5)``, text rows 5..7 one
causal run over keys ``[0, 8)``::

    row  lo hi   kind     keys 0..7
      0   0  0   causal   x.......
      1   0  1   causal   xx......
      2   0  4   full     xxxxx...
      3   0  4   full     xxxxx...
      4   0  4   full     xxxxx...
      5   0  5   causal   xxxxxx..
      6   0  6   causal   xxxxxxx.
      7   0  7   causal   xxxxxxxx

From each segment start, the segment takes the shape whose run reaches farthest (ties: the
order of the table): the fewest segments. Runs of one kind and one window form one launch; the
segments of a launch never share query rows, and the launches together cover every row once,
so they write one output without a merge. Keys are not copied: segments point into the packed
keys (``k_start``), several segments may read the same keys. Any row is exact on its own as a
one-row ``full`` run, which is where rows go when a mask would need more than ``max_calls``
launches.

Building a plan reads the spans on the host (one copy, one sync): launch sizes depend on the
data. Build it once per layout and share it between the layers that use the same spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .spans import SpanMask, host_to_device

__all__ = ["KINDS", "SegmentCall", "SegmentPlan", "plan_segments"]

KINDS = ("full", "causal", "window", "open")
_FULL, _CAUSAL, _WINDOW, _OPEN = range(4)


@dataclass(frozen=True)
class SegmentCall:
    """One varlen window-attention launch over ``S`` row segments (FlashAttention layout).

    Segment ``j`` holds query rows ``q_start[j] : q_start[j] + q_len[j]`` (packed rows) over
    packed keys ``k_start[j] : k_start[j] + k_len[j]``. ``q_start``/``k_start`` are int32
    ``[S+1]`` (the last entry is the total row / key count, so they read as ``cu_seqlens`` of a
    launch whose lengths come from ``q_len``/``k_len``, int32 ``[S]``, FlashAttention's
    ``seqused_q``/``seqused_k``). ``seq`` (int32 ``[S]``) is each segment's sequence: a paged
    launch gives segment ``j`` the page-table row of sequence ``seq[j]``.
    """

    kind: str
    window_left: int | None
    window_right: int | None
    q_start: torch.Tensor
    q_len: torch.Tensor
    k_start: torch.Tensor
    k_len: torch.Tensor
    max_q_len: int
    max_k_len: int
    seq: torch.Tensor

    @property
    def num_segments(self) -> int:
        return self.q_len.numel()

    @property
    def causal(self) -> bool:
        """True for the ``(None, 0)`` window: FlashAttention's plain ``causal=True``."""
        return self.window_left is None and self.window_right == 0


@dataclass(frozen=True)
class SegmentPlan:
    """The launches that together compute a span mask; see the module docstring.

    ``spans`` is the mask it was planned from: backends take a plan only together with that
    same object, so a plan can never be applied to other spans of the same size.

    ``paged``: every segment's keys start at its sequence's first key (``k_start`` is the
    sequence's offset, ``k_len`` the key end), so a launch can read them through the
    sequence's page-table row, which has no start offset; the window alone bounds each row's
    first key.
    """

    calls: tuple[SegmentCall, ...]
    total_rows: int
    total_keys: int
    spans: SpanMask | None = field(default=None, repr=False, compare=False)
    paged: bool = False

    @property
    def num_segments(self) -> int:
        return sum(c.num_segments for c in self.calls)

    def to(self, device: torch.device | str, spans: SpanMask | None = None) -> SegmentPlan:
        """The plan with its tensors on ``device`` (one copy), tied to ``spans`` if given."""
        spans = self.spans if spans is None else spans
        parts = [t for c in self.calls for t in (c.q_start, c.q_len, c.k_start, c.k_len, c.seq)]
        flat = host_to_device(torch.cat(parts), device) if parts else torch.empty(0, dtype=torch.int32)
        moved = list(torch.split(flat, [t.numel() for t in parts]))
        calls = []
        for c in self.calls:
            q_start, q_len, k_start, k_len, seq, moved = *moved[:5], moved[5:]
            calls.append(replace(c, q_start=q_start, q_len=q_len, k_start=k_start, k_len=k_len, seq=seq))
        return SegmentPlan(tuple(calls), self.total_rows, self.total_keys, spans, self.paged)

    def to_dense(self) -> torch.Tensor:
        """Bool ``[T, T_keys]``: the mask the launches compute, read with FlashAttention's window
        rule (the executable statement of what a launch does; tests compare it with
        :meth:`SpanMask.to_dense`). Raises if two segments write the same row."""
        device = self.calls[0].q_len.device if self.calls else torch.device("cpu")
        mask = torch.zeros(self.total_rows, self.total_keys, dtype=torch.bool, device=device)
        written = torch.zeros(self.total_rows, dtype=torch.int64, device=device)
        keys = torch.arange(self.total_keys, device=device)
        for c in self.calls:
            q_len, k_len = c.q_len.long(), c.k_len.long()
            seg = torch.repeat_interleave(torch.arange(c.num_segments, device=device), q_len)
            first = torch.cumsum(q_len, 0) - q_len
            i = torch.arange(seg.numel(), device=device) - first[seg]
            row = c.q_start[:-1].long()[seg] + i
            k0 = c.k_start[:-1].long()[seg]
            centre = k0 + i + k_len[seg] - q_len[seg]
            ok = (keys[None] >= k0[:, None]) & (keys[None] < (k0 + k_len[seg])[:, None])
            if c.window_left is not None:
                ok &= keys[None] >= (centre - c.window_left)[:, None]
            if c.window_right is not None:
                ok &= keys[None] <= (centre + c.window_right)[:, None]
            mask[row] = ok
            written.index_add_(0, row, torch.ones_like(row))
        if bool((written != 1).any()):
            bad = int(torch.nonzero(written != 1)[0])
            raise AssertionError(f"row {bad} is written by {int(written[bad])} segments")
        return mask


def _run_ends(new_run: torch.Tensor) -> torch.Tensor:
    """For every row, one past the last row of the run it belongs to, given where runs start."""
    t_len = new_run.numel()
    starts = torch.nonzero(new_run).flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([t_len])])
    return ends[torch.cumsum(new_run.long(), 0) - 1]


def _changed(new_seq: torch.Tensor, *keys: torch.Tensor) -> torch.Tensor:
    out = new_seq.clone()
    for key in keys:
        out[1:] |= key[1:] != key[:-1]
    return out


def plan_segments(spans: SpanMask, max_calls: int = 8, paged: bool = False) -> SegmentPlan:
    """Cut ``spans`` into row segments and group them into at most ``max_calls`` launches.

    Works for self-attention and extend spans, packed sequences, every rule. Planned on the
    CPU (one copy of the spans to the host, a sync); the plan's tensors live on the spans'
    device. Rows whose shape would need a launch beyond ``max_calls`` become one-row ``full``
    segments (exact; the benchmark layouts need two to five launches).

    ``paged``: plan for keys read through page tables (see :attr:`SegmentPlan.paged`). A
    ``full`` or ``causal`` run whose first key is not the sequence's first cannot start its
    keys there, so its rows become one-row ``window`` segments (``L = hi - lo``): exact, but a
    one-row segment fills a whole query tile. No rule of :mod:`bidiattn.rules` makes such runs
    except around blocks longer than the window under ``(c ∧ win_left) ∨ blk`` (paligemma-style
    sliding layers with a block that is not the prefix).
    """
    if not isinstance(paged, bool):
        raise TypeError(f"paged must be a bool, got {type(paged).__name__}")
    if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
        raise ValueError(f"max_calls must be a positive int, got {max_calls!r}")
    host = spans.to("cpu") if spans.lo.device.type != "cpu" else spans
    seq, pos, _ = host.local_rows()
    lo, hi = host.lo.long(), host.hi.long()
    t_len = host.total_tokens
    new_seq = torch.ones(t_len, dtype=torch.bool)
    new_seq[1:] = seq[1:] != seq[:-1]
    dlo, dhi = lo - pos, hi - pos
    signatures = ((lo, hi), (lo, dhi), (dlo, dhi), (dlo, hi))
    run_end = torch.stack([_run_ends(_changed(new_seq, *sig)) for sig in signatures]).t().contiguous()
    # Greedy: from each segment start take the kind whose run reaches farthest (the fewest
    # segments; ties go to the earlier kind of the table). A run that ends inside a block
    # never steals the block's last row from it, which would cost a mostly empty row tile.
    starts, kinds = [], []
    row = 0
    while row < t_len:
        ends = run_end[row].tolist()  # per segment, not per row: a plan has few segments
        kind = max(range(4), key=lambda k: (ends[k], -k))
        starts.append(row)
        kinds.append(kind)
        row = ends[kind]
    start = torch.tensor(starts)
    end = torch.cat([start[1:], start.new_tensor([t_len])])
    plan = _group(host, seq, pos, lo, hi, torch.tensor(kinds), start, end, max_calls, paged)
    return plan.to(spans.lo.device, spans)


def _one_row_windows(lo, kind, start, end):
    """Paged plans: ``full``/``causal`` segments whose keys do not start at 0 become one-row
    ``window`` segments (their window then bounds the first key)."""
    bad = ((kind == _FULL) | (kind == _CAUSAL)) & (lo[start] > 0)
    if not bool(bad.any()):
        return kind, start, end
    lengths = end - start
    row_bad = torch.repeat_interleave(bad, lengths)
    row_kind = torch.where(row_bad, torch.full_like(row_bad, _WINDOW, dtype=kind.dtype),
                           torch.repeat_interleave(kind, lengths))
    seg_of_row = torch.repeat_interleave(torch.arange(start.numel()), lengths)
    new = torch.ones_like(row_bad)
    new[1:] = row_bad[1:] | (seg_of_row[1:] != seg_of_row[:-1])
    rows = torch.arange(row_bad.numel())
    new_start = rows[new] + start[0]
    new_end = torch.cat([new_start[1:], end[-1:]])
    return row_kind[new], new_start, new_end


def _group(spans, seq, pos, lo, hi, kind, start, end, max_calls, paged) -> SegmentPlan:
    if paged:
        kind, start, end = _one_row_windows(lo, kind, start, end)
    last = end - 1
    p_first, p_end = pos[start], pos[last] + 1
    lo0, hi0 = lo[start], hi[start]
    dlo, dhi = lo0 - p_first, hi0 - p_first
    k0 = lo0
    k1 = torch.where((kind == _CAUSAL) | (kind == _WINDOW), p_end + dhi, hi0 + 1)
    left = torch.where(kind == _WINDOW, dhi - dlo, k1 - p_end - dlo)
    bos = spans.cu_seqlens_k[seq[start]]
    if paged:
        # Keys from the sequence's first: the window of every kind left here bounds the first key.
        k0 = torch.zeros_like(k0)
    # One launch per (kind, window): full and causal have fixed windows, window/open one per L.
    has_left = (kind == _WINDOW) | (kind == _OPEN)
    key = torch.where(has_left, left, torch.zeros_like(left))
    groups = torch.stack([kind, key], 1)
    uniq, inverse = torch.unique(groups, dim=0, return_inverse=True)
    rows = torch.zeros(uniq.shape[0], dtype=torch.int64, device=start.device)
    rows.index_add_(0, inverse, end - start)
    by_rows = sorted(range(uniq.shape[0]), key=lambda g: (-int(rows[g]), int(uniq[g, 0]), int(uniq[g, 1])))
    full = [g for g in by_rows if int(uniq[g, 0]) == _FULL]
    others = [g for g in by_rows if int(uniq[g, 0]) != _FULL]
    # Over budget: keep the launches that cover the most rows, one launch left for full rows.
    keep = set(full + (others if len(full) + len(others) <= max_calls else others[:max_calls - 1]))
    demoted = torch.tensor([g not in keep for g in range(uniq.shape[0])], device=start.device)[inverse]
    if bool(demoted.any()):
        return _demote(spans, seq, pos, lo, hi, kind, start, end, demoted, paged)
    calls = []
    for g in sorted(keep, key=lambda g: (int(uniq[g, 0]), int(uniq[g, 1]))):
        sel = inverse == g
        kind_g, left_g = int(uniq[g, 0]), int(uniq[g, 1])
        window = {_FULL: (None, None), _CAUSAL: (None, 0), _WINDOW: (left_g, 0), _OPEN: (left_g, None)}[kind_g]
        calls.append(_call(KINDS[kind_g], window, start[sel], (end - start)[sel], (bos + k0)[sel], (k1 - k0)[sel],
                           seq[start][sel], spans.total_tokens, spans.total_keys))
    return SegmentPlan(tuple(calls), spans.total_tokens, spans.total_keys, spans, paged)


def _demote(spans, seq, pos, lo, hi, kind, start, end, demoted, paged) -> SegmentPlan:
    """Re-cut with the rows of demoted segments as one-row full segments."""
    row_demoted = torch.repeat_interleave(demoted, end - start)
    row_kind = torch.repeat_interleave(kind, end - start)
    row_kind = torch.where(row_demoted, torch.full_like(row_kind, _FULL), row_kind)
    rows = torch.arange(spans.total_tokens, device=start.device)
    seg_of_row = torch.repeat_interleave(torch.arange(start.numel(), device=start.device), end - start)
    # A demoted row starts its own segment; a kept row keeps its segment.
    new = torch.ones_like(row_demoted)
    new[1:] = row_demoted[1:] | row_demoted[:-1] | (seg_of_row[1:] != seg_of_row[:-1])
    new_start = rows[new]
    new_end = torch.cat([new_start[1:], new_start.new_tensor([spans.total_tokens])])
    return _group(spans, seq, pos, lo, hi, row_kind[new_start], new_start, new_end, spans.total_tokens, paged)


def _call(kind, window, q_start, q_len, k_start, k_len, seq, total_rows, total_keys) -> SegmentCall:
    def cu(starts: torch.Tensor, total: int) -> torch.Tensor:
        return torch.cat([starts, starts.new_tensor([total])]).to(torch.int32)

    # Segments in the order a kernel schedules them: most rows x keys first (stable), so a launch
    # does not end on its longest tiles. The start arrays keep their trailing total, so they are
    # not sorted: only q_len/k_len give the lengths.
    idx = torch.sort(q_len * k_len, descending=True, stable=True).indices
    q_start, q_len, k_start, k_len, seq = q_start[idx], q_len[idx], k_start[idx], k_len[idx], seq[idx]

    return SegmentCall(
        kind=kind, window_left=window[0], window_right=window[1],
        q_start=cu(q_start, total_rows), q_len=q_len.to(torch.int32),
        k_start=cu(k_start, total_keys), k_len=k_len.to(torch.int32),
        max_q_len=int(q_len.max()), max_k_len=int(k_len.max()), seq=seq.to(torch.int32),
    )
