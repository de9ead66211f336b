"""rules.build against the rule table, stated here independently, on random layouts and drawn grids."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bidiattn import SpanMask, rules
from conftest import random_packed_layout

# The table, written out once more as boolean formulas over
# c = k <= q, b = same block, bp = same block of at most W tokens, wl = q-k < W, ws = |q-k| < W.
TABLE = {
    ("gemma3", "official"): (lambda c, b, bp, wl, ws: c | b, lambda c, b, bp, wl, ws: (c | b) & ws),
    ("gemma3", "transformers"): (lambda c, b, bp, wl, ws: c | b, lambda c, b, bp, wl, ws: (c | b) & wl),
    ("gemma3", "vllm"): (lambda c, b, bp, wl, ws: c | bp, lambda c, b, bp, wl, ws: (c & wl) | bp),
    ("gemma4", "official"): (lambda c, b, bp, wl, ws: c, lambda c, b, bp, wl, ws: (c | b) & ws),
    ("gemma4", "transformers"): (lambda c, b, bp, wl, ws: c, lambda c, b, bp, wl, ws: (c | b) & wl),
    ("gemma4", "vllm"): (lambda c, b, bp, wl, ws: c, lambda c, b, bp, wl, ws: (c | b) & wl),
    ("paligemma", "official"): (lambda c, b, bp, wl, ws: c | b, lambda c, b, bp, wl, ws: (c & wl) | b),
    ("paligemma", "transformers"): (lambda c, b, bp, wl, ws: c | b, lambda c, b, bp, wl, ws: (c & wl) | b),
    ("paligemma", "vllm"): (lambda c, b, bp, wl, ws: c | bp, lambda c, b, bp, wl, ws: (c & wl) | bp),
}
for _conv in rules.CONVENTIONS:
    TABLE["causal", _conv] = (lambda c, b, bp, wl, ws: c, lambda c, b, bp, wl, ws: c & wl)


def oracle(family, convention, layer, ids, cu, window):
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    pos = torch.arange(len(ids)) - cu[seq]
    q, k = pos[:, None], pos[None, :]
    size = torch.tensor([int((ids == i).sum()) for i in ids.tolist()])
    b = (ids[:, None] == ids[None, :]) & (ids[:, None] > 0)
    bp = b & (size <= window)[:, None]
    f = TABLE[family, convention][0 if layer == "full" else 1]
    return f(k <= q, b, bp, (q - k) < window, (q - k).abs() < window) & (seq[:, None] == seq[None, :])


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), window=st.integers(1, 14))
def test_build_matches_table_on_random_layouts(seed, window):
    ids, cu = random_packed_layout(random.Random(seed))
    for family, convention in TABLE:
        for layer in rules.LAYERS:
            spans = rules.build(family, convention, layer, block_ids=ids, window=window, cu_seqlens=cu)
            # Re-validating proves lo <= row <= hi and monotone lo/hi: one contiguous, sorted interval per row.
            SpanMask(spans.lo, spans.hi, spans.cu_seqlens)
            expected = oracle(family, convention, layer, ids, cu, window)
            assert torch.equal(spans.to_dense(), expected), (family, convention, layer, ids.tolist(), cu.tolist())
            assert torch.equal(rules.dense(family, convention, layer, block_ids=ids, window=window, cu_seqlens=cu), expected)
            assert spans.num_pairs() == int(expected.sum())


def test_blocks_longer_than_window_differ_as_documented():
    # A block of n > W tokens: transformers (win_left) and official (win_sym) differ on (n-W)(n-W+1)/2 pairs.
    n, w = 280, 128
    ids = torch.tensor([0] * 40 + [1] * n + [0] * 30)
    a = rules.build("gemma4", "official", "sliding", block_ids=ids, window=w)
    b = rules.build("gemma4", "transformers", "sliding", block_ids=ids, window=w)
    assert b.num_pairs() - a.num_pairs() == (n - w) * (n - w + 1) // 2


def grid(text: str) -> torch.Tensor:
    rows = [line.split()[-1] for line in text.strip().splitlines()]
    return torch.tensor([[ch == "1" for ch in row] for row in rows])


# 12 tokens, image at 3..7 (5 tokens), W = 4. A, C, D are the grids the peers' own code produced
# (shared/reference/mask-grids.md); the vllm grids are drawn from vLLM's rule (block 5 > W dropped).
IMAGE_3_7 = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
GRID_A = """
 0 1...........
 1 11..........
 2 111.........
 3 11111111....
 4 11111111....
 5 11111111....
 6 11111111....
 7 11111111....
 8 111111111...
 9 1111111111..
10 11111111111.
11 111111111111
"""
GRID_C = """
 0 1...........
 1 11..........
 2 111.........
 3 11111111....
 4 .1111111....
 5 ..111111....
 6 ...11111....
 7 ....1111....
 8 .....1111...
 9 ......1111..
10 .......1111.
11 ........1111
"""
GRID_D = """
 0 1...........
 1 11..........
 2 111.........
 3 1111111.....
 4 .1111111....
 5 ..111111....
 6 ...11111....
 7 ....1111....
 8 .....1111...
 9 ......1111..
10 .......1111.
11 ........1111
"""
GRID_SLIDING_CAUSAL = """
 0 1...........
 1 11..........
 2 111.........
 3 1111........
 4 .1111.......
 5 ..1111......
 6 ...1111.....
 7 ....1111....
 8 .....1111...
 9 ......1111..
10 .......1111.
11 ........1111
"""
GRID_CAUSAL = """
 0 1...........
 1 11..........
 2 111.........
 3 1111........
 4 11111.......
 5 111111......
 6 1111111.....
 7 11111111....
 8 111111111...
 9 1111111111..
10 11111111111.
11 111111111111
"""
# Image at 3..6 (4 tokens = W): vllm keeps it.
IMAGE_3_6 = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
GRID_VLLM_SLIDING_SHORT = """
 0 1...........
 1 11..........
 2 111.........
 3 1111111.....
 4 .111111.....
 5 ..11111.....
 6 ...1111.....
 7 ....1111....
 8 .....1111...
 9 ......1111..
10 .......1111.
11 ........1111
"""
GRID_VLLM_FULL_SHORT = """
 0 1...........
 1 11..........
 2 111.........
 3 1111111.....
 4 1111111.....
 5 1111111.....
 6 1111111.....
 7 11111111....
 8 111111111...
 9 1111111111..
10 11111111111.
11 111111111111
"""
# PaliGemma: prefix 0..4 is the block, W = 3, sliding layer: (c & win_left) | blk.
PREFIX_0_4 = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
GRID_PALI_SLIDING = """
 0 11111.....
 1 11111.....
 2 11111.....
 3 11111.....
 4 11111.....
 5 ...111....
 6 ....111...
 7 .....111..
 8 ......111.
 9 .......111
"""

GRID_CASES = [
    ("gemma3", "official", "full", IMAGE_3_7, 4, GRID_A),
    ("gemma3", "official", "sliding", IMAGE_3_7, 4, GRID_D),
    ("gemma3", "transformers", "full", IMAGE_3_7, 4, GRID_A),
    ("gemma3", "transformers", "sliding", IMAGE_3_7, 4, GRID_C),
    ("gemma3", "vllm", "full", IMAGE_3_7, 4, GRID_CAUSAL),
    ("gemma3", "vllm", "sliding", IMAGE_3_7, 4, GRID_SLIDING_CAUSAL),
    ("gemma3", "vllm", "full", IMAGE_3_6, 4, GRID_VLLM_FULL_SHORT),
    ("gemma3", "vllm", "sliding", IMAGE_3_6, 4, GRID_VLLM_SLIDING_SHORT),
    ("gemma4", "official", "full", IMAGE_3_7, 4, GRID_CAUSAL),
    ("gemma4", "official", "sliding", IMAGE_3_7, 4, GRID_D),
    ("gemma4", "vllm", "full", IMAGE_3_7, 4, GRID_CAUSAL),
    ("gemma4", "vllm", "sliding", IMAGE_3_7, 4, GRID_C),
    ("paligemma", "official", "sliding", PREFIX_0_4, 3, GRID_PALI_SLIDING),
    ("paligemma", "vllm", "sliding", IMAGE_3_6, 4, GRID_VLLM_SLIDING_SHORT),
    ("causal", "official", "sliding", IMAGE_3_7, 4, GRID_SLIDING_CAUSAL),
]


@pytest.mark.parametrize("family,convention,layer,ids,window,drawn", GRID_CASES)
def test_drawn_truth_tables(family, convention, layer, ids, window, drawn):
    spans = rules.build(family, convention, layer, block_ids=ids, window=window)
    assert torch.equal(spans.to_dense(), grid(drawn))


def test_spans_are_int32_and_on_input_device():
    spans = rules.build("gemma3", "official", "sliding", block_ids=IMAGE_3_7.int(), window=4)
    assert spans.lo.dtype == spans.hi.dtype == torch.int32
    assert spans.lo.device == IMAGE_3_7.device


def test_build_without_validation_matches():
    ids, cu = random_packed_layout(random.Random(7), max_seqs=4)
    a = rules.build("gemma3", "official", "sliding", block_ids=ids, window=5, cu_seqlens=cu)
    b = rules.build("gemma3", "official", "sliding", block_ids=ids, window=5, cu_seqlens=cu, validate=False)
    assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(family="gemma5"), ValueError, "unknown family 'gemma5'"),
        (dict(convention="sglang"), ValueError, "unknown convention 'sglang'"),
        (dict(layer="global"), ValueError, "unknown layer 'global'"),
        (dict(layer="sliding", window=None), ValueError, "needs window=W"),
        (dict(convention="vllm", window=None), ValueError, "vllm drops blocks longer"),
        (dict(window=0), ValueError, "window must be >= 1.*got 0"),
        (dict(window=2.5), TypeError, "window must be an int"),
        (dict(block_ids=torch.tensor([0.0, 1.0])), TypeError, "integer tensor"),
        (dict(block_ids=torch.tensor([0, -2, 0])), ValueError, "got -2 at row 1"),
        (dict(block_ids=torch.tensor([1, 1, 0, 1])), ValueError, "block id 1 is reused non-contiguously.*rows 0 and 3"),
        (dict(block_ids=torch.tensor([0, 2, 2, 0]), cu_seqlens=torch.tensor([0, 2, 4])), ValueError,
         "block id 2 is split across sequences 0 and 1"),
        (dict(block_ids=torch.tensor([[0, 1]])), ValueError, "shape \\[T\\]"),
        (dict(cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32)), TypeError, "int64"),
        (dict(cu_seqlens=torch.tensor([0, 3, 5])), ValueError, "end at T=4"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 4])), ValueError, "non-decreasing: sequence 1 has length -1"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, exc, match):
    args = dict(family="gemma3", convention="official", layer="full", block_ids=torch.tensor([0, 1, 1, 0]), window=4)
    args.update(kwargs)
    family, convention, layer = args.pop("family"), args.pop("convention"), args.pop("layer")
    with pytest.raises(exc, match=match):
        rules.build(family, convention, layer, **args)


# ----------------------------------------------------------------------------- token types
def test_token_types_gemma3_merges_adjacent_images_and_splits_at_sequences():
    tt = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 1, 0])
    cu = torch.tensor([0, 7, 10])
    ids = rules.block_ids_from_token_types(tt, family="gemma3", cu_seqlens=cu)
    assert ids.tolist() == [0, 1, 1, 1, 0, 2, 2, 3, 3, 0]


def test_token_types_gemma4_image_and_video_are_blocks():
    tt = torch.tensor([0, 1, 1, 2, 2, 0, 2, 3])
    ids = rules.block_ids_from_token_types(tt, family="gemma4")
    assert ids.tolist() == [0, 1, 1, 1, 1, 0, 2, 0]


def test_token_types_paligemma_prefix_is_one_block():
    tt = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1])
    ids = rules.block_ids_from_token_types(tt, family="paligemma", cu_seqlens=torch.tensor([0, 5, 8]))
    assert ids.tolist() == [1, 1, 1, 0, 0, 2, 2, 0]
    with pytest.raises(ValueError, match="row 3 is a prefix token after a suffix token"):
        rules.block_ids_from_token_types(torch.tensor([0, 1, 1, 0]), family="paligemma")
    with pytest.raises(ValueError, match="block_ids_from_mask"):
        rules.block_ids_from_token_types(tt, family="paligemma", convention="vllm")


def test_block_ids_from_mask_type_check():
    with pytest.raises(TypeError, match="bool tensor"):
        rules.block_ids_from_mask(torch.tensor([0, 1]))
