"""Context parallelism: one long sequence's attention spread over several ranks.

- :func:`plan_shards`: the sharding plan, a pure host algorithm over a :class:`~bidiattn.SpanMask`
  (balanced contiguous row shards, the key shards/ranges each rank reads, arrival order).
- :func:`plan_rank`: one rank's blocks, its rows' spans re-based onto each key range it reads.
- :func:`context_attention`: the exact forward and backward on ``torch.distributed``
  point-to-point batches (gloo on CPU, NCCL on GPUs), an autograd function.
- :func:`simulate_context_attention`: the same per-rank math with the ranks run in turn in one
  process (no process group), for checks on one device.
"""

from bidiattn.distributed.context import context_attention, simulate_context_attention
from bidiattn.distributed.rank import RankBlock, RankPlan, plan_rank
from bidiattn.distributed.sharding import ShardPlan, plan_shards

__all__ = ["RankBlock", "RankPlan", "ShardPlan", "context_attention", "plan_rank", "plan_shards",
           "simulate_context_attention"]
