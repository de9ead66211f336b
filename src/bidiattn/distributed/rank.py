"""One rank's view of a :class:`~bidiattn.distributed.ShardPlan`: its rows' spans re-based onto
each key range it reads.

For every key shard ``s`` that rank ``r`` needs, the plan records the rows of ``r`` that see
``s`` (``row_ranges[(r, s)]``, contiguous) and the keys of ``s`` they read
(``key_ranges[(r, s)]``, contiguous). :func:`plan_rank` turns each pair into a
:class:`RankBlock`: a :class:`~bidiattn.SpanMask` over exactly those rows and keys, the spans
clipped to the key range and shifted so that key 0 is its first key. Packed positions are used
throughout (:meth:`SpanMask.packed_bounds`), so a block may cross packed sequences: a row's
interval never leaves its own sequence, and clipping keeps it inside the range.

Empty spans: a row that sees none of a key range is simply not in that block (the row range
stops before it); every row of a block sees at least one key of it, because the plan's row range
is exactly the rows whose interval meets the shard, and the key range is the union of those
intersections. No empty span (``lo > hi``) is ever built, so every backend takes the blocks
as they are, and a row absent from a block adds nothing to its merged output (its lse there is
``-inf``). Example, rank 1 of ``plan_shards(spans, 3, tile=3)`` on 9 rows with an image at 2..4
(rows 3..5 own keys 3..5, ``x`` allowed, ``o`` a key of the block)::

            keys  012 345 678
    rank 1  row 3 xxx xx. ...     block from shard 1 (own): rows 3..5 x keys 3..5
            row 4 xxx xx. ...       lo 0 0 0 / hi 1 1 2  (self-attention spans)
            row 5 xxx xxx ...     block from shard 0: rows 3..5 x keys 0..2
                                    lo 0 0 0 / hi 2 2 2  (extend spans, 3 keys)

Imports only :mod:`bidiattn.spans` and the sharding plan: host work, once per layout and rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bidiattn.distributed.sharding import ShardPlan
from bidiattn.spans import SpanMask, as_int

__all__ = ["RankBlock", "RankPlan", "plan_rank"]


@dataclass(frozen=True)
class RankBlock:
    """The rows of one rank that read one key shard, and their spans over the keys they read.

    - ``source``: the key shard (= the rank that owns those keys).
    - ``distance``: ring distance ``min(|r - s|, W - |r - s|)``; blocks of one distance arrive
      in one exchange step (0: the rank's own keys, no transfer).
    - ``rows``: ``(q0, q1)``, half-open, local to the rank's own rows (row 0 = the shard's first).
    - ``keys``: ``(k0, k1)``, half-open, local to the source shard's keys.
    - ``spans``: a :class:`~bidiattn.SpanMask` of ``q1 - q0`` rows over ``k1 - k0`` keys, one
      packed "sequence": self-attention spans for the own block (rows and keys are the same
      tokens, each row sees itself), extend spans (``cu_seqlens_k``) for the others, whose rows
      need not see their own position. Built with ``validate=False``; every row's interval is
      non-empty and ``lo``/``hi`` are non-decreasing.
    """

    source: int
    distance: int
    rows: tuple[int, int]
    keys: tuple[int, int]
    spans: SpanMask

    @property
    def num_keys(self) -> int:
        """Keys of the block (what its owner sends for it when it is not the own block)."""
        return self.keys[1] - self.keys[0]


@dataclass(frozen=True)
class RankPlan:
    """Rank ``rank``'s share of a :class:`ShardPlan`: its rows and its blocks in arrival order.

    - ``shards``: the whole plan (every rank also reads it to know what to send to whom).
    - ``rank``: this rank; ``rows``: ``(starts[rank], starts[rank + 1])``, its packed rows/keys.
    - ``blocks``: one :class:`RankBlock` per needed shard, in ``shards.order[rank]`` (own first,
      then by ring distance); empty for a rank without rows.

    Its block spans live on the device given to :func:`plan_rank`; reuse one ``RankPlan`` for
    every layer with the same spans, so that each block's launch plan is made once (a
    ``SpanMask`` keeps the plans of calls made on it).
    """

    shards: ShardPlan
    rank: int
    rows: tuple[int, int]
    blocks: tuple[RankBlock, ...]

    @property
    def num_rows(self) -> int:
        """Rows (and keys) the rank owns."""
        return self.rows[1] - self.rows[0]

    def max_distance(self) -> int:
        """Number of exchange steps of the whole plan: the largest ring distance any rank reads
        across (0 when nobody reads another shard); every rank runs the same steps."""
        w = self.shards.world_size
        return max((min((s - r) % w, (r - s) % w) for (r, s) in self.shards.key_ranges), default=0)


def _block_spans(glo: torch.Tensor, ghi: torch.Tensor, rows: tuple[int, int], keys: tuple[int, int],
                 own: bool, device: torch.device) -> SpanMask:
    """Spans of packed rows ``rows`` clipped to packed keys ``keys`` and re-based to key 0."""
    q0, q1 = rows
    k0, k1 = keys
    lo = glo[q0:q1].clamp(min=k0) - k0
    hi = ghi[q0:q1].clamp(max=k1 - 1) - k0
    lo, hi = lo.to(torch.int32).to(device), hi.to(torch.int32).to(device)
    cu_q = torch.tensor([0, q1 - q0], dtype=torch.int64, device=device)
    if own:
        return SpanMask(lo, hi, cu_q, validate=False)
    cu_k = torch.tensor([0, k1 - k0], dtype=torch.int64, device=device)
    return SpanMask(lo, hi, cu_q, validate=False, cu_seqlens_k=cu_k, total_keys=k1 - k0)


def plan_rank(spans: SpanMask, shards: ShardPlan, rank: int, *, device: torch.device | str | None = None) -> RankPlan:
    """Rank ``rank``'s blocks under ``shards`` (see the module): per needed key shard, in
    arrival order, the rows that read it and their spans re-based onto the keys they read.

    Args:
        spans: the whole sequence's self-attention spans, the ones ``shards`` was made from
            (``shards.starts[-1] == spans.total_tokens``; not otherwise checked).
        shards: :func:`~bidiattn.distributed.plan_shards` of ``spans``.
        rank: in ``[0, shards.world_size)``.
        device: where the block spans go (default: ``spans``' device).

    ``TypeError``/``ValueError`` name a wrong argument.
    """
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a SpanMask, got {type(spans).__name__}")
    if not isinstance(shards, ShardPlan):
        raise TypeError(f"shards must be a ShardPlan (bidiattn.distributed.plan_shards), got {type(shards).__name__}")
    if not spans.is_self_attention:
        raise ValueError("context parallelism shards self-attention spans; got extend spans (cu_seqlens_k set)")
    if shards.starts[-1] != spans.total_tokens:
        raise ValueError(f"the plan covers {shards.starts[-1]} rows but spans have {spans.total_tokens}")
    rank = as_int(rank, "rank")
    if not 0 <= rank < shards.world_size:
        raise ValueError(f"rank must be in [0, {shards.world_size}), got {rank}")
    device = spans.lo.device if device is None else torch.device(device)
    w = shards.world_size
    a, b = shards.starts[rank], shards.starts[rank + 1]
    glo, ghi = spans.to("cpu").packed_bounds()
    blocks = []
    for s in shards.order[rank]:
        q0, q1 = shards.row_ranges[(rank, s)]
        k0, k1 = shards.key_ranges[(rank, s)]
        block = _block_spans(glo, ghi, (q0, q1), (k0, k1), s == rank, device)
        s0 = shards.starts[s]
        blocks.append(RankBlock(source=s, distance=min((s - rank) % w, (rank - s) % w), rows=(q0 - a, q1 - a),
                                keys=(k0 - s0, k1 - s0), spans=block))
    return RankPlan(shards=shards, rank=rank, rows=(a, b), blocks=tuple(blocks))
