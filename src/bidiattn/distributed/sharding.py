"""Sharding plan for context parallelism: which rows each rank owns, which keys it must fetch.

The packed rows (and, for self-attention spans, the keys: key ``k`` is row ``k``) are cut into
``world_size`` contiguous shards at multiples of ``tile`` rows, so that each rank's work (allowed
(query, key) pairs times heads) is balanced. Rank ``r`` owns rows and keys ``[starts[r],
starts[r+1])`` and needs key shard ``s`` iff one of its rows sees a key of ``s``. Because each
span contains its own row and ``lo``/``hi`` are non-decreasing over the pack, the keys a rank
needs from a shard form one contiguous range, recorded so that a sliding layer fetches only
its halo. Example, ``plan_shards(spans, 3, tile=3)`` on 9 rows with an image at 2..4
(``x`` allowed)::

            keys  012 345 678
    rank 0  row 0 x.. ... ...     needs (0, 1): the image row 2 sees keys 3..4 of rank 1
            row 1 xx. ... ...
            row 2 xxx xx. ...
    rank 1  row 3 xxx xx. ...     needs (0, 1); arrival order (1, 0)
            row 4 xxx xx. ...
            row 5 xxx xxx ...
    rank 2  row 6 xxx xxx x..     needs (0, 1, 2); arrival order (2, 0, 1) (0 and 1 are both
            row 7 xxx xxx xx.     one hop away on a ring of 3)
            row 8 xxx xxx xxx

Imports only :mod:`bidiattn.spans` and torch (no kernels): it runs on the host, once per layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bidiattn.spans import SpanMask, as_int

__all__ = ["ShardPlan", "plan_shards"]


@dataclass(frozen=True)
class ShardPlan:
    """Where each rank's rows and keys are and what it needs from the others.

    - ``world_size``: number of ranks.
    - ``starts``: ``world_size + 1`` packed row offsets; rank ``r`` owns rows (and keys)
      ``[starts[r], starts[r+1])``. Interior cuts are multiples of the plan's ``tile``; a shard
      may be empty (more ranks than tiles).
    - ``work``: per rank, sum over its rows of ``(hi - lo + 1) * num_q_heads``.
    - ``needs``: per rank, the sorted tuple of key shards it reads (its own included when it
      has rows; an empty rank needs nothing).
    - ``order``: per rank, ``needs`` in arrival order: own shard first, then the others by ring
      distance ``min(|r - s|, world_size - |r - s|)``, lower rank first on a tie.
    - ``row_ranges``: ``(r, s) -> (q0, q1)``, the packed rows of rank ``r`` that see shard ``s``
      (half-open), for every ``s`` in ``needs[r]``.
    - ``key_ranges``: ``(r, s) -> (k0, k1)``, the packed keys of shard ``s`` that rank ``r``
      reads (half-open, inside ``[starts[s], starts[s+1])``).
    - ``tile``, ``tile_work``: the cut granularity and the largest work of ``tile``
      consecutive rows (the balance bound: ``max(work) <= sum(work) / world_size + tile_work``).
    """

    world_size: int
    starts: tuple[int, ...]
    work: tuple[int, ...]
    needs: tuple[tuple[int, ...], ...]
    order: tuple[tuple[int, ...], ...]
    row_ranges: dict
    key_ranges: dict
    tile: int
    tile_work: int

    def bytes_needed(self, r: int) -> int:
        """Keys (not bytes: multiply by heads * head_dim * element size * 2 for K and V) that
        rank ``r`` must receive: the sum of its needed key ranges outside its own shard."""
        r = as_int(r, "r")
        if not 0 <= r < self.world_size:
            raise ValueError(f"r must be in [0, {self.world_size}), got {r}")
        return sum(k1 - k0 for (q, s), (k0, k1) in self.key_ranges.items() if q == r and s != r)


def _nearest_cuts(prefix: torch.Tensor, total: int, world_size: int) -> list[int]:
    """Indices into ``prefix`` (strictly increasing int64 work at the candidate cuts, from 0 to
    ``total``) nearest to the targets ``r * total / world_size``, lower one on a tie. Exact
    integer arithmetic: compare ``world_size * prefix`` with ``r * total``."""
    scaled = prefix * world_size
    targets = torch.arange(world_size + 1, dtype=torch.int64) * total
    above = torch.searchsorted(scaled, targets).clamp(max=scaled.numel() - 1)
    below = (above - 1).clamp(min=0)
    take_below = (targets - scaled[below]) <= (scaled[above] - targets)
    return torch.where(take_below, below, above).tolist()


def plan_shards(spans: SpanMask, world_size: int, *, num_q_heads: int = 1, tile: int = 128,
                starts: tuple[int, ...] | None = None) -> ShardPlan:
    """Cut ``spans``' packed rows into ``world_size`` balanced contiguous shards (see the module).

    ``starts``: cut at these ``world_size + 1`` rows instead (non-decreasing, from 0 to the row
    count): the shards of another layer's plan, so that the layers of one model (full and
    sliding, whose spans differ) share the sharding of their hidden states.

    Cuts are at multiples of ``tile`` rows (or at the end), each the tile boundary whose prefix
    work is nearest the ideal cumulative target ``r * total / world_size``; so the largest
    rank's work is at most ``total / world_size + tile_work``. With fewer tiles than ranks some
    shards are empty (zero rows, zero work, no needs). Self-attention spans only: extend spans
    (``cu_seqlens_k``) raise ``ValueError``. A sequence boundary is not a cut constraint: a
    packed sequence may straddle ranks.
    """
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a SpanMask, got {type(spans).__name__}")
    if not spans.is_self_attention:
        raise ValueError("context parallelism shards self-attention spans; got extend spans (cu_seqlens_k set)")
    world_size = as_int(world_size, "world_size")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    tile = as_int(tile, "tile")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    num_q_heads = as_int(num_q_heads, "num_q_heads")
    if num_q_heads < 1:
        raise ValueError(f"num_q_heads must be >= 1, got {num_q_heads}")

    spans = spans.to("cpu")
    glo, ghi = spans.packed_bounds()
    rows = spans.total_tokens
    row_work = (ghi - glo + 1) * num_q_heads
    prefix = torch.nn.functional.pad(torch.cumsum(row_work, 0), (1, 0))  # prefix[j]: work of rows < j
    total = int(prefix[-1])
    span = min(tile, rows)
    tile_work = int((prefix[span:] - prefix[:-span]).max())

    # Bound: candidate prefixes rise by at most tile_work between neighbours (<= tile rows), so
    # the nearest to each target t_r is within tile_work / 2 of it (t_0 and t_W are hit exactly);
    # rank r's work P(c_{r+1}) - P(c_r) <= (t_{r+1} - t_r) + tile_work = total / W + tile_work.
    if starts is None:
        candidates = torch.cat([torch.arange(0, rows, tile, dtype=torch.int64), torch.tensor([rows])])
        picks = _nearest_cuts(prefix[candidates], total, world_size)
        starts = tuple(int(candidates[i]) for i in picks)
    else:
        if not isinstance(starts, (tuple, list)):
            raise TypeError(f"starts must be a tuple of ints or None, got {type(starts).__name__}")
        starts = tuple(as_int(x, "starts[i]") for x in starts)
        if (len(starts) != world_size + 1 or starts[0] != 0 or starts[-1] != rows
                or any(a > b for a, b in zip(starts, starts[1:]))):
            raise ValueError(f"starts must be {world_size + 1} non-decreasing rows from 0 to {rows}, got {starts}")
    work = tuple(int(prefix[starts[r + 1]] - prefix[starts[r]]) for r in range(world_size))

    needs, order, row_ranges, key_ranges = [], [], {}, {}
    for r in range(world_size):
        a, b = starts[r], starts[r + 1]
        mine = []
        for s in range(world_size):
            s0, s1 = starts[s], starts[s + 1]
            if a == b or s0 == s1:
                continue
            # Rows seeing s: ghi >= s0 and glo < s1; both bounds non-decreasing, so contiguous.
            q0 = max(a, int(torch.searchsorted(ghi, torch.tensor(s0), right=False)))
            q1 = min(b, int(torch.searchsorted(glo, torch.tensor(s1), right=False)))
            if q0 >= q1:
                continue
            mine.append(s)
            row_ranges[(r, s)] = (q0, q1)
            key_ranges[(r, s)] = (max(int(glo[q0]), s0), min(int(ghi[q1 - 1]) + 1, s1))
        needs.append(tuple(mine))
        dist = lambda s, r=r: (min((s - r) % world_size, (r - s) % world_size), s)  # noqa: E731
        order.append(tuple(sorted(mine, key=dist)))
    return ShardPlan(world_size=world_size, starts=starts, work=work, needs=tuple(needs), order=tuple(order),
                     row_ranges=row_ranges, key_ranges=key_ranges, tile=tile, tile_work=tile_work)
