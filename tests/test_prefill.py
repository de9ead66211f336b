"""Chunked-prefill planner: property tests of its invariants, the documented example, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bidiattn.serving.prefill import Chunk, PrefillPlan, RequestLayout, plan_prefill


@st.composite
def layouts(draw):
    length = draw(st.integers(1, 60))
    blocks, pos = [], 0
    while pos < length:
        pos += draw(st.integers(0, 6))
        if pos >= length or not draw(st.booleans()):
            break
        end = min(length, pos + draw(st.integers(1, 25)))
        blocks.append((pos, end))
        pos = end
    return RequestLayout(length, tuple(blocks))


def check_invariants(requests, budget, plan: PrefillPlan):
    chunks = [c for step in plan.steps for c in step.chunks]
    # First come, first served, and every token of every request exactly once, in order.
    assert chunks == sorted(chunks, key=lambda c: (c.request, c.start))
    for ri, r in enumerate(requests):
        mine = [c for c in chunks if c.request == ri]
        assert mine[0].start == 0 and mine[-1].end == r.length
        assert all(a.end == b.start for a, b in zip(mine, mine[1:]))
        assert all(c.tokens > 0 for c in mine)
        # No block is split.
        for s, e in r.blocks:
            assert any(c.start <= s and e <= c.end for c in mine), (s, e, mine)
    oversized = {(ri, s, e) for ri, r in enumerate(requests) for s, e in r.blocks if e - s > budget}
    assert set(plan.oversized_blocks) == oversized
    for i, step in enumerate(plan.steps):
        if step.tokens > budget:
            # Only a block longer than the budget, alone in its step, may exceed it.
            (c,) = step.chunks
            assert (c.request, c.start, c.end) in oversized
            continue
        if i + 1 < len(plan.steps) and step.tokens < budget:
            # A step closes early only when the next token starts a block that does not fit.
            nxt = plan.steps[i + 1].chunks[0]
            blocks = dict(requests[nxt.request].blocks)
            assert nxt.start in blocks and blocks[nxt.start] - nxt.start > budget - step.tokens


@settings(max_examples=400, deadline=None)
@given(st.lists(layouts(), min_size=1, max_size=4), st.integers(1, 30))
def test_plan_invariants(requests, budget):
    check_invariants(requests, budget, plan_prefill(requests, budget))


def test_documented_example():
    plan = plan_prefill([RequestLayout(14, ((5, 11),))], 8)
    assert [s.chunks for s in plan.steps] == [(Chunk(0, 0, 5),), (Chunk(0, 5, 13),), (Chunk(0, 13, 14),)]
    assert plan.oversized_blocks == ()


def test_block_longer_than_the_budget_gets_its_own_step():
    plan = plan_prefill([RequestLayout(20, ((2, 15),)), RequestLayout(3)], 6)
    assert [s.chunks for s in plan.steps] == [
        (Chunk(0, 0, 2),), (Chunk(0, 2, 15),), (Chunk(0, 15, 20), Chunk(1, 0, 1)), (Chunk(1, 1, 3),)]
    assert plan.oversized_blocks == ((0, 2, 15),) and plan.max_step_tokens == 13


def test_layout_from_block_ids():
    ids = torch.tensor([0, 0, 3, 3, 3, 0, 7, 7, 4, 0])
    assert RequestLayout.from_block_ids(ids) == RequestLayout(10, ((2, 5), (6, 8), (8, 9)))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: RequestLayout(0), ValueError, "length must be a positive int, got 0"),
        (lambda: RequestLayout(10, ((3, 5), (4, 8))), ValueError, r"block 1 = \(4, 8\) must satisfy previous end 5"),
        (lambda: RequestLayout(10, ((3, 11),)), ValueError, "end <= length 10"),
        (lambda: RequestLayout(10, ((5, 5),)), ValueError, r"block 0 = \(5, 5\)"),
        (lambda: plan_prefill([RequestLayout(4)], 0), ValueError, "budget must be a positive int, got 0"),
        (lambda: plan_prefill([], 4), ValueError, "at least one request"),
        (lambda: plan_prefill([(4, ())], 4), TypeError, "request 0 must be a RequestLayout, got tuple"),
    ],
)
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
