"""The context-parallel sharding plan (bidiattn.distributed.plan_shards) against brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bidiattn import rules
from bidiattn.distributed import ShardPlan, plan_shards
from bidiattn.spans import SpanMask
from conftest import image_spans, random_packed_layout, tail_rows


def _brute(spans: SpanMask, plan: ShardPlan):
    """needs / row ranges / key ranges from the dense mask."""
    dense = spans.to_dense()
    s = plan.starts
    needs, rows, keys = [], {}, {}
    for r in range(plan.world_size):
        mine = []
        for q in range(plan.world_size):
            block = dense[s[r]:s[r + 1], s[q]:s[q + 1]]
            if block.any():
                mine.append(q)
                rr = torch.nonzero(block.any(1))[:, 0]
                kk = torch.nonzero(block.any(0))[:, 0]
                rows[(r, q)] = (s[r] + int(rr[0]), s[r] + int(rr[-1]) + 1)
                keys[(r, q)] = (s[q] + int(kk[0]), s[q] + int(kk[-1]) + 1)
        needs.append(tuple(mine))
    return tuple(needs), rows, keys


def _check(spans: SpanMask, world_size: int, tile: int, heads: int = 1) -> ShardPlan:
    plan = plan_shards(spans, world_size, num_q_heads=heads, tile=tile)
    T = spans.total_tokens
    starts = plan.starts
    assert len(starts) == world_size + 1 and starts[0] == 0 and starts[-1] == T
    assert all(a <= b for a, b in zip(starts, starts[1:]))  # contiguous cover, each row once
    assert all(c % tile == 0 or c == T for c in starts)
    row_work = (spans.hi.long() - spans.lo.long() + 1) * heads
    assert plan.work == tuple(int(row_work[starts[r]:starts[r + 1]].sum()) for r in range(world_size))
    total = int(row_work.sum())
    w = min(tile, T)
    tile_work = max(int(row_work[i:i + w].sum()) for i in range(T - w + 1))
    assert plan.tile_work == tile_work
    assert max(plan.work) * world_size <= total + tile_work * world_size  # max <= ideal + one tile
    prefix = [int(row_work[:c].sum()) for c in starts]  # each cut within half a tile of its target
    assert all(2 * abs(world_size * prefix[r] - r * total) <= world_size * tile_work for r in range(world_size + 1))
    needs, rows, keys = _brute(spans, plan)
    assert plan.needs == needs
    assert plan.row_ranges == rows
    assert plan.key_ranges == keys
    for r in range(world_size):
        assert sorted(plan.order[r]) == list(plan.needs[r])
        if plan.needs[r]:
            assert plan.order[r][0] == r
        dist = [min((q - r) % world_size, (r - q) % world_size) for q in plan.order[r]]
        assert dist == sorted(dist)
        outside = sum(k1 - k0 for (a, q), (k0, k1) in keys.items() if a == r and q != r)
        assert plan.bytes_needed(r) == outside
    return plan


def _random_spans(seed: int, layer: str, window: int = 7) -> SpanMask:
    rng = random.Random(seed)
    ids, cu = random_packed_layout(rng, max_seqs=3, max_len=40)
    return rules.build("gemma3", "official", layer, block_ids=ids, window=window, cu_seqlens=cu)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6), layer=st.sampled_from(["full", "sliding"]), world=st.integers(1, 6),
       tile=st.integers(1, 16), heads=st.integers(1, 3))
def test_plan_matches_brute_force_and_balance_bound(seed, layer, world, tile, heads):
    _check(_random_spans(seed, layer), world, tile, heads)


@settings(max_examples=30, deadline=None)
@given(row_work=st.lists(st.integers(1, 30), min_size=1, max_size=60), world=st.integers(1, 8),
       tile=st.integers(1, 8))
def test_balance_bound_on_skewed_work(row_work, world, tile):
    """Arbitrary non-decreasing spans (very uneven row work): the bound still holds."""
    lo, hi = [], []
    for i, w in enumerate(row_work):
        lo.append(max(0, min(i, (lo[-1] if lo else 0) + (w % 3))))
        hi.append(i)
    spans = SpanMask(torch.tensor(lo, dtype=torch.int32), torch.tensor(hi, dtype=torch.int32))
    _check(spans, world, tile)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_causal_full_layer_needs_all_earlier_shards(world):
    T = 64
    spans = rules.build("causal", "official", "full", block_ids=torch.zeros(T, dtype=torch.int64))
    plan = _check(spans, world, tile=4)
    for r in range(world):
        if plan.starts[r] < plan.starts[r + 1]:
            assert plan.needs[r] == tuple(q for q in range(r + 1) if plan.starts[q] < plan.starts[q + 1])


@pytest.mark.parametrize("window", [5, 16, 33])
def test_sliding_layer_needs_only_its_halo(window):
    T = 128
    spans = image_spans(T, [], layer="sliding", window=window)
    plan = _check(spans, 4, tile=8)
    for (r, q), (k0, k1) in plan.key_ranges.items():
        if q == r:
            continue
        assert q < r  # text only: causal, no later shard
        assert k1 - k0 <= window - 1
        assert plan.starts[r] - plan.starts[q + 1] < window - 1  # the shard is within W keys


def test_image_straddling_a_cut_makes_the_earlier_rank_need_the_later_shard():
    spans = image_spans(64, [(28, 40)])
    plan = _check(spans, 2, tile=32)
    assert plan.starts == (0, 32, 64)
    assert plan.needs[0] == (0, 1) and plan.key_ranges[(0, 1)] == (32, 40) and plan.bytes_needed(0) == 8
    assert plan.row_ranges[(0, 1)] == (28, 32)
    text = image_spans(64, [])
    assert _check(text, 2, tile=32).needs[0] == (0,)


def test_more_ranks_than_tiles_leaves_empty_shards():
    spans = image_spans(20, [(3, 9)])
    plan = _check(spans, 6, tile=8)  # 3 tiles for 6 ranks
    empty = [r for r in range(6) if plan.starts[r] == plan.starts[r + 1]]
    assert len(empty) >= 3
    for r in empty:
        assert plan.work[r] == 0 and plan.needs[r] == () and plan.order[r] == () and plan.bytes_needed(r) == 0
    assert _check(spans, 1, tile=128).starts == (0, 20)


def test_numpy_ints_accepted():
    plan = plan_shards(image_spans(32, [(4, 10)]), np.int64(2), num_q_heads=np.int32(2), tile=np.int64(8))
    assert plan.world_size == 2 and isinstance(plan.world_size, int)


def test_bad_arguments():
    spans = image_spans(16, [(2, 5)])
    with pytest.raises(TypeError, match="spans must be a SpanMask"):
        plan_shards(torch.zeros(3), 2)
    with pytest.raises(TypeError, match="world_size.*2.0"):
        plan_shards(spans, 2.0)
    with pytest.raises(TypeError, match="world_size.*True"):
        plan_shards(spans, True)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        plan_shards(spans, 0)
    with pytest.raises(ValueError, match="tile must be >= 1, got 0"):
        plan_shards(spans, 2, tile=0)
    with pytest.raises(TypeError, match="tile"):
        plan_shards(spans, 2, tile="8")
    with pytest.raises(ValueError, match="num_q_heads must be >= 1, got -1"):
        plan_shards(spans, 2, num_q_heads=-1)
    with pytest.raises(ValueError, match="shards self-attention spans"):
        plan_shards(tail_rows(spans, [4]), 2)
    plan = plan_shards(spans, 2, tile=4)
    with pytest.raises(ValueError, match="r must be in"):
        plan.bytes_needed(2)


def test_fixed_starts_are_used_and_checked():
    spans = image_spans(40, [(5, 20)], "gemma3", "official", "sliding", window=6)
    plan = plan_shards(spans, 3, starts=(0, 10, 10, 40))
    assert plan.starts == (0, 10, 10, 40) and plan.needs[1] == ()
    assert sum(plan.work) == int(((spans.hi - spans.lo + 1)).sum())
    for bad in ((0, 10, 40), (0, 20, 10, 40), (1, 10, 20, 40), (0, 10, 20, 39)):
        with pytest.raises(ValueError, match="starts must be 4 non-decreasing rows from 0 to 40"):
            plan_shards(spans, 3, starts=bad)
    with pytest.raises(TypeError, match="starts must be a tuple of ints or None, got str"):
        plan_shards(spans, 3, starts="0,10")
