"""Context parallelism through the transformers drop-in: one long sequence's rows sharded over a
``torch.distributed`` group, every bidiattn attention layer run by
:func:`bidiattn.distributed.context_attention`.

    shards = ContextShards.build(block_ids, "gemma3", num_q_heads=8, group=group)
    rows = shards.rows                                 # this rank's slice of the sequence
    out = model(input_ids=ids[:, rows], position_ids=positions[:, rows],
                bidiattn_context=shards)              # attn_implementation="bidiattn"

transformers passes unknown keyword arguments of a model's forward down to its attention
functions (its ``**kwargs`` path), so ``bidiattn_context`` reaches every layer; embeddings, MLPs and
rotary embeddings work on the rank's rows as they are. Each layer kind (full, sliding) gets the
whole sequence's spans under the attention function's rule, sharded at the same rows (the hidden
states are sharded once), built once per :class:`ContextShards` and kept on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import rules
from ..distributed.context import context_attention
from ..distributed.rank import plan_rank
from ..distributed.sharding import plan_shards
from ..families import Family
from ..families import family as family_record

__all__ = ["ContextShards"]


@dataclass(frozen=True)
class ContextShards:
    """One sequence's sharding over a process group, for ``model(..., bidiattn_context=)``.

    - ``group``: the ``torch.distributed`` process group (``None``: the world).
    - ``block_ids``: int64 ``[T]``, the *whole* sequence's bidirectional blocks (0: ordinary
      token), as :func:`bidiattn.rules.build` takes them; ``cu_seqlens``: packed sequences, or None.
    - ``starts``: ``world_size + 1`` row offsets; rank ``r`` runs rows ``starts[r]:starts[r+1]``.
    - ``rank``: this process's rank in ``group``.
    - ``layer_plans``: filled by the layers, per (family, rule, layer kind, window, heads,
      device): the spans and this rank's :class:`~bidiattn.distributed.RankPlan`.
    """

    group: object
    block_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    starts: tuple[int, ...]
    rank: int
    layer_plans: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, block_ids: torch.Tensor, family: str | Family, *, num_q_heads: int, group=None,
              convention: str = "official", cu_seqlens: torch.Tensor | None = None, tile: int = 128) -> ContextShards:
        """Shards balanced on the full-attention layers' work under ``family``/``convention``
        (:func:`bidiattn.distributed.plan_shards`, cuts at multiples of ``tile`` rows); every
        layer kind uses these cuts. Needs an initialized ``torch.distributed``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ContextShards needs an initialized torch.distributed process group")
        if not isinstance(block_ids, torch.Tensor) or block_ids.dim() != 1:
            raise TypeError(f"block_ids must be a 1-D tensor of the whole sequence, got "
                            f"{getattr(block_ids, 'shape', type(block_ids).__name__)}")
        spans = rules.build(family, convention, "full", block_ids=block_ids.cpu(),
                            cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu())
        world = dist.get_world_size(group)
        starts = plan_shards(spans, world, num_q_heads=num_q_heads, tile=tile).starts
        return cls(group=group, block_ids=block_ids, cu_seqlens=cu_seqlens, starts=starts, rank=dist.get_rank(group))

    @property
    def rows(self) -> slice:
        """This rank's rows of the sequence."""
        return slice(self.starts[self.rank], self.starts[self.rank + 1])

    def layer_plan(self, family: Family, convention: str, layer: str, window: int | None, num_q_heads: int,
                   device: torch.device):
        """The whole sequence's spans of one layer kind and this rank's plan over them (made once)."""
        key = (family.name, convention, layer, window, num_q_heads, device)
        if key not in self.layer_plans:
            cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device)
            spans = rules.build(family, convention, layer, block_ids=self.block_ids.to(device), window=window,
                                cu_seqlens=cu)
            shards = plan_shards(spans, len(self.starts) - 1, num_q_heads=num_q_heads, starts=self.starts)
            self.layer_plans[key] = spans, plan_rank(spans, shards, self.rank, device=device)
        return self.layer_plans[key]


def context_layer(shards: ContextShards, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, family,
                  convention: str, layer: str, window: int | None, backend: str, scaling: float,
                  softcap: float | None) -> torch.Tensor:
    """One attention layer's ``[1, T_r, Hq, D]`` output on this rank's rows (``query`` ``[1, Hq, T_r,
    D]``, ``key``/``value`` ``[1, Hkv, T_r, D]``, as transformers hands them over)."""
    if not isinstance(shards, ContextShards):
        raise TypeError(f"bidiattn_context must be a ContextShards, got {type(shards).__name__}")
    bsz, hq, t, d = query.shape
    rows = shards.starts[shards.rank + 1] - shards.starts[shards.rank]
    if bsz != 1:
        raise ValueError(f"context parallelism runs one (packed) sequence, batch size 1; got {bsz}")
    if t != rows or key.shape[2] != rows:
        raise ValueError(f"this rank runs rows {shards.starts[shards.rank]}:{shards.starts[shards.rank + 1]} "
                         f"({rows}); the layer got {t} queries and {key.shape[2]} keys (no cache: prefill and "
                         f"training only)")
    spans, plan = shards.layer_plan(family_record(family), convention, layer, window, hq, query.device)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = context_attention(q, k, v, spans, group=shards.group, plan=plan, scale=scaling, softcap=softcap,
                            backend=backend if backend != "flex" else "auto")
    return out[None]
