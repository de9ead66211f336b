"""Context parallelism: one long sequence's attention spread over several ranks.

So far the sharding plan only (:func:`plan_shards`), a pure host algorithm over a
:class:`~bidiattn.SpanMask`; the distributed forward/backward that consumes it is future work.
"""

from bidiattn.distributed.sharding import ShardPlan, plan_shards

__all__ = ["ShardPlan", "plan_shards"]
