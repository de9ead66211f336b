"""Segment decomposition (the FA4 backend's plan) against brute force: the launches, read with
FlashAttention's window rule, give exactly the span mask, every row once; the cut is the greedy
one (the fewest segments)."""

from __future__ import annotations

import random

import pytest
import torch

from bidiattn import rules
from bidiattn.launch import KINDS, SegmentPlan, plan_segments
from bidiattn.spans import SpanMask

from conftest import image_spans, random_packed_layout, tail_rows

RULES = [(f, c, layer) for f in rules.FAMILIES for c in rules.CONVENTIONS for layer in rules.LAYERS]


def check(spans: SpanMask, max_calls: int = 8) -> SegmentPlan:
    plan = plan_segments(spans, max_calls=max_calls)
    assert len(plan.calls) <= max_calls
    assert torch.equal(plan.to_dense(), spans.to_dense())
    for c in plan.calls:
        assert bool((c.q_len > 0).all()) and bool((c.k_len > 0).all())
        assert c.max_q_len == int(c.q_len.max()) and c.max_k_len == int(c.k_len.max())
        work = c.q_len.long() * c.k_len.long()
        assert bool((work[1:] <= work[:-1]).all())  # longest first
    return plan


def check_paged(spans: SpanMask, max_calls: int = 8) -> SegmentPlan:
    """Paged plans: the same mask, every segment's keys from its sequence's first key, and each
    segment's ``seq`` the sequence of its rows."""
    plan = plan_segments(spans, max_calls=max_calls, paged=True)
    assert plan.paged and torch.equal(plan.to_dense(), spans.to_dense())
    row_seq = torch.searchsorted(spans.cu_seqlens[1:], torch.arange(spans.total_tokens), right=True)
    for c in plan.calls:
        assert torch.equal(c.k_start[:-1].long(), spans.cu_seqlens_k[c.seq.long()])
        assert torch.equal(row_seq[c.q_start[:-1].long()], c.seq.long())
        assert torch.equal(row_seq[(c.q_start[:-1] + c.q_len - 1).long()], c.seq.long())
    return plan


@pytest.mark.parametrize("family,convention,layer", RULES)
def test_every_rule_on_random_packed_layouts(family, convention, layer):
    rng = random.Random(repr((family, convention, layer)))
    for _ in range(25):
        ids, cu = random_packed_layout(rng, max_len=50)
        window = rng.randint(1, 12) if rules.rule_for(family, convention, layer).needs_window else None
        spans = rules.build(family, convention, layer, block_ids=ids, cu_seqlens=cu, window=window)
        check(spans)
        tail = tail_rows(spans, [rng.randint(1, 20) for _ in range(spans.num_sequences)])
        check(tail)
        check_paged(spans)
        check_paged(tail)


def greedy_segments(spans: SpanMask) -> set[tuple[int, int, str]]:
    """The cut by its definition, row by row in Python: from each segment start the kind whose
    run reaches farthest (ties: the table's order full, causal, window, open), as
    ``(first row, rows, kind)``."""
    steps = {"full": (0, 0), "causal": (0, 1), "window": (1, 1), "open": (1, 0)}
    lo, hi, cu = spans.lo.tolist(), spans.hi.tolist(), spans.cu_seqlens.tolist()
    cuts = set()
    for first, end in zip(cu[:-1], cu[1:]):
        row = first
        while row < end:
            reach = {}
            for kind in KINDS:
                e = row + 1
                while e < end and (lo[e] - lo[e - 1], hi[e] - hi[e - 1]) == steps[kind]:
                    e += 1
                reach[kind] = e
            kind = max(KINDS, key=lambda k: (reach[k], -KINDS.index(k)))
            cuts.add((row, reach[kind] - row, kind))
            row = reach[kind]
    return cuts


def planned_segments(plan: SegmentPlan) -> set[tuple[int, int, str]]:
    return {(a, n, c.kind) for c in plan.calls for a, n in zip(c.q_start[:-1].tolist(), c.q_len.tolist())}


@pytest.mark.parametrize("family,convention,layer", RULES)
def test_the_vectorized_cut_is_the_greedy_one(family, convention, layer):
    # The plan's segments are the greedy cut's (the fewest segments), on the device in one pass.
    rng = random.Random(repr((family, convention, layer, "greedy")))
    for _ in range(10):
        ids, cu = random_packed_layout(rng, max_len=60)
        window = rng.randint(1, 12) if rules.rule_for(family, convention, layer).needs_window else None
        spans = rules.build(family, convention, layer, block_ids=ids, cu_seqlens=cu, window=window)
        for s in (spans, tail_rows(spans, [rng.randint(1, 20) for _ in range(spans.num_sequences)])):
            assert planned_segments(plan_segments(s, max_calls=64)) == greedy_segments(s)


def test_the_vectorized_cut_on_arbitrary_spans_and_many_segments():
    rng = random.Random(11)
    for n in (1, 2, 3, 50, 3000):
        lo, hi = [], []
        for row in range(n):
            lo.append(rng.randint(lo[-1] if lo else 0, row))
            hi.append(max(rng.randint(row, min(n - 1, row + rng.randint(0, 3))), hi[-1] if hi else 0))
        spans = SpanMask(torch.tensor(lo, dtype=torch.int32), torch.tensor(hi, dtype=torch.int32))
        # More than 1024 segments at n = 3000: the planning reads them back twice.
        assert planned_segments(plan_segments(spans, max_calls=10**6)) == greedy_segments(spans)


def test_example_of_the_docstring():
    plan = check(image_spans(8, [(2, 5)]))
    kinds = {c.kind: (c.q_start[:-1].tolist(), c.q_len.tolist(), c.k_start[:-1].tolist(), c.k_len.tolist())
             for c in plan.calls}
    assert kinds == {"full": ([2], [3], [0], [5]), "causal": ([5, 0], [3, 2], [0, 0], [8, 2])}
    assert [c.causal for c in plan.calls] == [False, True]


def test_benchmark_layout_needs_few_long_segments():
    # 16K tokens, 1092-token images every 2048: 8 image runs, 9 text runs, 2 launches.
    blocks = [(s, s + 1092) for s in range(500, 16384, 2048)]
    plan = check(image_spans(16384, blocks))
    assert len(plan.calls) == 2 and plan.num_segments == 17
    sliding = check(image_spans(16384, blocks, layer="sliding", window=1024))
    # Official sliding rule, images longer than W: per image a window(2W-2) run where hi = q+W-1,
    # an open run where hi = the image end, then window(W-1) text; 5 launches, 26 segments.
    assert len(sliding.calls) == 5 and sliding.num_segments == 26


def test_arbitrary_spans_and_the_launch_budget():
    rng = random.Random(7)
    for _ in range(40):
        n = rng.randint(1, 60)
        lo, hi = [], []
        for row in range(n):
            lo.append(rng.randint(lo[-1] if lo else 0, row))
            hi.append(max(rng.randint(row, min(n - 1, row + rng.randint(0, 6))), hi[-1] if hi else 0))
        spans = SpanMask(torch.tensor(lo), torch.tensor(hi))
        for max_calls in (1, 2, 3, 8):
            check(spans, max_calls=max_calls)
            check_paged(spans, max_calls=max_calls)


def test_paged_plans_turn_runs_with_an_offset_first_key_into_one_row_windows():
    # paligemma sliding, (c ∧ win_left) ∨ blk, W=4, a 9-token block at 10..18 that is not a prefix:
    # its rows from 13 on all see [10, 18]; rows 14..18 form a full run starting at key 10 (13
    # ends the open run before it), which a page-table row cannot express. The benchmark layout
    # of gemma3 has no such run and plans the same segments paged or not.
    spans = image_spans(24, [(10, 19)], family="paligemma", layer="sliding", window=4)
    plain, paged = plan_segments(spans), check_paged(spans)
    assert any(c.kind == "full" and 10 in c.k_start.tolist() for c in plain.calls)
    windows = [c for c in paged.calls if c.kind == "window" and c.window_left == 8]
    assert len(windows) == 1 and windows[0].q_len.tolist() == [1] * 5
    blocks = [(s, s + 1092) for s in range(500, 16384, 2048)]
    for layer, window in (("full", None), ("sliding", 1024)):
        gemma = image_spans(16384, blocks, layer=layer, window=window)
        assert plan_segments(gemma).num_segments == check_paged(gemma).num_segments


def test_bad_paged_flag():
    with pytest.raises(TypeError, match="paged must be a bool, got int"):
        plan_segments(image_spans(8, [(2, 5)]), paged=1)


def test_bad_budget():
    with pytest.raises(ValueError, match="max_calls must be a positive int, got 0"):
        plan_segments(image_spans(8, [(2, 5)]), max_calls=0)


def test_to_dense_catches_a_row_written_twice():
    plan = plan_segments(image_spans(8, [(2, 5)]))
    twice = SegmentPlan(plan.calls + plan.calls[:1], plan.total_rows, plan.total_keys)
    with pytest.raises(AssertionError, match="row 2 is written by 2 segments"):
        twice.to_dense()


# ----------------------------------------------------------------------------- the one-launch kernel
def _kernel_vs_spec(spans: SpanMask, paged: bool, demoted: torch.Tensor | None, cap: int = 1024) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from bidiattn.kernels.segments import segment_starts
    from bidiattn.launch import segment_starts_spec

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    spans = spans.to(dev)
    mask = None if demoted is None else demoted.to(dev)
    assert segment_starts(spans, paged, mask, cap) == segment_starts_spec(spans, paged, mask)


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or Triton's interpreter")
@pytest.mark.parametrize("family,convention,layer", [r for r in RULES if r[0] in ("gemma3", "paligemma")])
def test_segment_starts_kernel_equals_its_spec(family, convention, layer):
    """Random packed layouts (empty sequences too), extend spans, paged and demoted rows; a
    capacity smaller than the start count (the launch repeats with room for all)."""
    rng = random.Random(f"{family}-{convention}-{layer}-kernel")  # str seeds are stable across processes
    for i in range(3):
        ids, cu = random_packed_layout(rng, max_len=50)
        if i == 1:  # an empty sequence in the middle and at the end
            cu = torch.cat([cu[:2], cu[1:2], cu[2:], cu[-1:]])
        window = rng.randint(1, 12) if rules.rule_for(family, convention, layer).needs_window else None
        spans = rules.build(family, convention, layer, block_ids=ids, cu_seqlens=cu, window=window)
        tail = tail_rows(spans, [rng.randint(1, 20) for _ in range(spans.num_sequences)])
        demoted = torch.zeros(spans.total_tokens, dtype=torch.int8)
        demoted[rng.randrange(spans.total_tokens):][:rng.randint(1, 9)] = 1
        for s in (spans, tail):
            for paged in (False, True):
                _kernel_vs_spec(s, paged, None)
        _kernel_vs_spec(spans, False, demoted)
        _kernel_vs_spec(spans, True, demoted, cap=2)


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or Triton's interpreter")
def test_segment_starts_kernel_over_chunks_and_many_segments():
    """More rows than one chunk step (carries across chunks), int32 and int64 spans."""
    rng = random.Random(5)
    for n, dtype in ((1, torch.int32), (1500, torch.int32), (2100, torch.int64)):
        lo, hi = [], []
        for row in range(n):
            lo.append(rng.randint(lo[-1] if lo else 0, row))
            hi.append(max(rng.randint(row, min(n - 1, row + rng.randint(0, 3))), hi[-1] if hi else 0))
        spans = SpanMask(torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype))
        _kernel_vs_spec(spans, False, None, cap=64)
        _kernel_vs_spec(spans, True, None)
    blocks = [(s, s + 1092) for s in range(500, 6000, 2048)]
    _kernel_vs_spec(image_spans(6000, blocks, layer="sliding", window=1024), False, None)
