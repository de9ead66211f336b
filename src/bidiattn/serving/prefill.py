"""Chunked-prefill planner: cut prompts into steps of at most ``budget`` tokens, never inside a
bidirectional block.

A block split across two prefill steps would make its first rows miss the keys of its later
rows (they are not computed yet), which is why engines switched bidirectional attention off
under chunked prefill. The planner moves every cut to the start of the block it would split;
a block longer than the whole budget gets a step of its own, longer than the budget, and is
listed in :attr:`PrefillPlan.oversized_blocks`.

Scheduling is first come, first served: a step takes the remaining tokens of the earliest
unfinished request, then of the next ones, until the budget is used or the next token starts a
block that does not fit in what is left of it. Pure Python, CPU; the plan is a frozen value.

Example, budget 8, one request of 14 tokens with a block at 5..10 (``[``...``]``)::

    tokens   0 1 2 3 4 [5 6 7 8 9 10] 11 12 13
    step 0   0 1 2 3 4                          (the block does not fit in the 3 left)
    step 1             [5 6 7 8 9 10] 11 12
    step 2                                  13
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..rules import block_extents
from ..spans import SpanMask

__all__ = ["RequestLayout", "Chunk", "Step", "PrefillPlan", "plan_prefill", "step_spans"]


@dataclass(frozen=True)
class RequestLayout:
    """One prompt: its length and its bidirectional blocks as ``(start, end)`` (end exclusive),
    sorted, non-overlapping, inside ``[0, length)``."""

    length: int
    blocks: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"RequestLayout.length must be a positive int, got {self.length!r}")
        prev_end = 0
        for i, block in enumerate(self.blocks):
            if len(block) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in block):
                raise ValueError(f"block {i} must be a (start, end) pair of ints, got {block!r}")
            start, end = block
            if not (prev_end <= start < end <= self.length):
                raise ValueError(
                    f"block {i} = ({start}, {end}) must satisfy previous end {prev_end} <= start < end <= "
                    f"length {self.length} (blocks sorted, non-overlapping, end exclusive)"
                )
            prev_end = end

    @classmethod
    def from_block_ids(cls, block_ids: torch.Tensor) -> RequestLayout:
        """From per-token block ids (0 = ordinary token; a block is a maximal run of one id)."""
        if not isinstance(block_ids, torch.Tensor) or block_ids.dim() != 1 or block_ids.numel() == 0:
            raise ValueError("block_ids must be a non-empty 1-D tensor")
        cu = torch.tensor([0, block_ids.numel()], dtype=torch.int64, device=block_ids.device)
        start, end, in_block = block_extents(block_ids, cu)
        first = in_block & (start == torch.arange(block_ids.numel(), device=block_ids.device))
        rows = torch.nonzero(first).flatten().tolist()
        ends = end[first].tolist()
        return cls(block_ids.numel(), tuple((s, e + 1) for s, e in zip(rows, ends)))


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, end)`` of request ``request``."""

    request: int
    start: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Step:
    """One prefill forward pass: chunks of one or more requests, packed as varlen sequences."""

    chunks: tuple[Chunk, ...]

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)


@dataclass(frozen=True)
class PrefillPlan:
    """The steps, in order. ``oversized_blocks``: ``(request, start, end)`` of each block longer
    than the budget; each got a step of its own, longer than the budget."""

    budget: int
    steps: tuple[Step, ...]
    oversized_blocks: tuple[tuple[int, int, int], ...]

    @property
    def max_step_tokens(self) -> int:
        return max(s.tokens for s in self.steps)


def plan_prefill(requests: Sequence[RequestLayout], budget: int) -> PrefillPlan:
    """Plan chunked prefill of ``requests`` with at most ``budget`` tokens per step (see module doc)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if not requests:
        raise ValueError("plan_prefill needs at least one request")
    for i, r in enumerate(requests):
        if not isinstance(r, RequestLayout):
            raise TypeError(f"request {i} must be a RequestLayout, got {type(r).__name__}")
    steps: list[Step] = []
    oversized: list[tuple[int, int, int]] = []
    current: list[Chunk] = []
    used = 0
    for ri, layout in enumerate(requests):
        ends = dict(layout.blocks)  # block start -> block end
        blocks = list(layout.blocks)  # sorted: walk them alongside pos
        bi = 0
        pos = 0
        while pos < layout.length:
            while bi < len(blocks) and blocks[bi][1] <= pos:
                bi += 1
            room = budget - used
            cut = min(layout.length, pos + room)
            # Move a cut that falls strictly inside a block back to the block's start.
            j = bi
            while j < len(blocks) and blocks[j][0] < cut:
                if blocks[j][0] < cut < blocks[j][1]:
                    cut = blocks[j][0]
                    break
                j += 1
            if cut > pos:
                current.append(Chunk(ri, pos, cut))
                used += cut - pos
                pos = cut
                if used == budget:
                    steps.append(Step(tuple(current)))
                    current, used = [], 0
                continue
            # The token at pos starts a block that does not fit in what is left of this step.
            if current:
                steps.append(Step(tuple(current)))
                current, used = [], 0
                continue
            end = ends[pos]  # an empty step and still no room: the block is longer than the budget
            oversized.append((ri, pos, end))
            steps.append(Step((Chunk(ri, pos, end),)))
            pos = end
    if current:
        steps.append(Step(tuple(current)))
    return PrefillPlan(budget, tuple(steps), tuple(oversized))


def step_spans(step: Step, request_spans: Sequence[SpanMask]) -> SpanMask:
    """Extend spans of one step: its chunks' rows, over keys ``[0, chunk end)`` of each request.

    ``request_spans[r]`` are request ``r``'s whole-prompt spans (one sequence, from
    :func:`bidiattn.rules.build`). The result packs the chunks in step order: queries are the
    chunk rows, keys the request's first ``chunk.end`` tokens (cache plus chunk), the layout of
    :func:`bidiattn.attention`'s extend spans. Validated, so a chunk that splits a block (a row
    seeing past the chunk end) raises ``ValueError``. The requests' ``window`` hint is kept where
    they share one.
    """
    los, his, q_lens, k_lens = [], [], [], []
    for c in step.chunks:
        if not 0 <= c.request < len(request_spans):
            raise ValueError(f"chunk {c} names request {c.request}, but {len(request_spans)} request spans were given")
        spans = request_spans[c.request]
        if not spans.is_self_attention or spans.num_sequences != 1:
            raise ValueError(f"request {c.request}: request_spans must be one-sequence self-attention spans")
        los.append(spans.lo[c.start : c.end])
        his.append(spans.hi[c.start : c.end])
        q_lens.append(c.tokens)
        k_lens.append(c.end)
    device = los[0].device

    def offsets(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lengths], dtype=torch.int64, device=device).cumsum(0)

    windows = {request_spans[c.request].window for c in step.chunks}
    return SpanMask(torch.cat(los), torch.cat(his), offsets(q_lens), cu_seqlens_k=offsets(k_lens),
                    total_keys=sum(k_lens), window=windows.pop() if len(windows) == 1 else None)
