"""rules.build_from_blocks (PyTorch path and the Triton kernel through the interpreter) against
rules.build on random packed layouts, whole prompts and extend steps; BlockList errors."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bidiattn import SpanMask, rules
from bidiattn.blocks import BlockList
from bidiattn.serving.prefill import RequestLayout
from conftest import random_packed_layout

pytest.importorskip("triton", reason="triton is not installed")

# On a GPU machine the builder runs its Triton kernel on CUDA tensors; on CPU the PyTorch path,
# and the kernel itself through the interpreter (triton_build).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_RULES = [(f, c, layer) for f in rules.FAMILIES for c in rules.CONVENTIONS for layer in rules.LAYERS]


def pairs_of(ids: torch.Tensor, cu: torch.Tensor) -> list[list[tuple[int, int]]]:
    return [list(RequestLayout.from_block_ids(ids[cu[b] : cu[b + 1]]).blocks) for b in range(len(cu) - 1)]


def cuts(rng: random.Random, length: int, blocks: list[tuple[int, int]]) -> tuple[int, int]:
    """A step [start, end) of one sequence that splits no block."""
    inside = {p for s, e in blocks for p in range(s + 1, e)}
    allowed = [p for p in range(length + 1) if p not in inside]
    end = rng.choice([p for p in allowed if p > 0])
    start = rng.choice([p for p in allowed if p < end])
    return start, end


def triton_build(family, convention, layer, blocks, cu, cu_k, total, window):
    from bidiattn.kernels.span_builder import build_spans_triton

    blocks = BlockList(*(t.to(DEVICE) for t in (blocks.starts, blocks.ends, blocks.cu_blocks)))
    lo, hi = build_spans_triton(rules.rule_for(family, convention, layer), blocks, cu.to(DEVICE), cu_k.to(DEVICE),
                                total, window)
    return lo.cpu(), hi.cpu()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), window=st.integers(1, 14), spare=st.integers(0, 3))
def test_whole_prompts_match_build(seed, window, spare):
    ids, cu = random_packed_layout(random.Random(seed), max_seqs=4)
    pairs = pairs_of(ids, cu)
    blocks = BlockList.from_pairs(pairs, capacity=sum(map(len, pairs)) + spare + 1)
    # Spare slots hold garbage that must never be read as a block.
    blocks.starts[sum(map(len, pairs)):] = 0
    blocks.ends[sum(map(len, pairs)):] = 10**6
    blocks = BlockList(*(t.to(DEVICE) for t in (blocks.starts, blocks.ends, blocks.cu_blocks)))
    for family, convention, layer in ALL_RULES:
        want = rules.build(family, convention, layer, block_ids=ids, window=window, cu_seqlens=cu)
        got = rules.build_from_blocks(family, convention, layer, blocks=blocks, cu_seqlens=cu.to(DEVICE),
                                      total_tokens=ids.numel(), window=window)
        assert got.is_self_attention
        assert torch.equal(got.lo.cpu(), want.lo) and torch.equal(got.hi.cpu(), want.hi), (family, convention, layer, pairs)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), window=st.integers(1, 14))
def test_extend_steps_match_slices_of_the_whole_prompt(seed, window):
    rng = random.Random(seed)
    ids, cu = random_packed_layout(rng, max_seqs=4)
    pairs = pairs_of(ids, cu)
    # The whole layout of each request is passed at every step: blocks past the step's keys too.
    blocks = BlockList.from_pairs(pairs, device=DEVICE)
    steps = [cuts(rng, int(cu[b + 1] - cu[b]), pairs[b]) for b in range(len(pairs))]
    rows = torch.tensor([int(cu[b]) + p for b, (s, e) in enumerate(steps) for p in range(s, e)])
    cu_q = torch.tensor([0, *[e - s for s, e in steps]]).cumsum(0)
    cu_k = torch.tensor([0, *[e for _, e in steps]]).cumsum(0)
    total, total_keys = int(cu_q[-1]), int(cu_k[-1])
    for family, convention, layer in ALL_RULES:
        whole = rules.build(family, convention, layer, block_ids=ids, window=window, cu_seqlens=cu)
        got = rules.build_from_blocks(family, convention, layer, blocks=blocks, cu_seqlens=cu_q.to(DEVICE),
                                      total_tokens=total, window=window, cu_seqlens_k=cu_k.to(DEVICE),
                                      total_keys=total_keys)
        assert not got.is_self_attention and got.total_keys == total_keys
        assert torch.equal(got.lo.cpu(), whole.lo[rows]) and torch.equal(got.hi.cpu(), whole.hi[rows]), (family, convention, layer)


@pytest.mark.parametrize("seed", range(6))
def test_kernel_matches_build(seed):
    rng = random.Random(seed)
    ids, cu = random_packed_layout(rng, max_seqs=5, max_len=300)
    pairs = pairs_of(ids, cu)
    blocks = BlockList.from_pairs(pairs, capacity=sum(map(len, pairs)) + 2)
    window = rng.randint(1, 40)
    steps = [cuts(rng, int(cu[b + 1] - cu[b]), pairs[b]) for b in range(len(pairs))]
    rows = torch.tensor([int(cu[b]) + p for b, (s, e) in enumerate(steps) for p in range(s, e)])
    cu_q = torch.tensor([0, *[e - s for s, e in steps]]).cumsum(0)
    cu_k = torch.tensor([0, *[e for _, e in steps]]).cumsum(0)
    for family, convention, layer in ALL_RULES:
        whole = rules.build(family, convention, layer, block_ids=ids, window=window, cu_seqlens=cu)
        lo, hi = triton_build(family, convention, layer, blocks, cu, cu, ids.numel(), window)
        assert torch.equal(lo, whole.lo) and torch.equal(hi, whole.hi), (family, convention, layer, seed)
        lo, hi = triton_build(family, convention, layer, blocks, cu_q, cu_k, int(cu_q[-1]), window)
        assert torch.equal(lo, whole.lo[rows]) and torch.equal(hi, whole.hi[rows]), (family, convention, layer, seed)


def test_kernel_decode_rows_and_sequences_without_blocks():
    # Decode: one row per sequence at its last position; sequence 1 has no blocks at all.
    pairs = [[(2, 9)], [], [(0, 4), (5, 7)]]
    k_lens = [12, 5, 7]
    blocks = BlockList.from_pairs(pairs)
    cu_q = torch.arange(4)
    cu_k = torch.tensor([0, *k_lens]).cumsum(0)
    lo, hi = triton_build("gemma3", "official", "sliding", blocks, cu_q, cu_k, 3, 4)
    # Rows at 11 (text), 4 (text), 6 (inside block [5, 7): sees to 6, window 4 from the left).
    assert lo.tolist() == [8, 1, 3] and hi.tolist() == [11, 4, 6]
    kwargs = dict(blocks=blocks, cu_seqlens=cu_q, total_tokens=3, window=4, cu_seqlens_k=cu_k, total_keys=24)
    got = rules.build_from_blocks("gemma3", "official", "sliding", validate=False, **kwargs)
    assert got.lo.tolist() == lo.tolist() and got.hi.tolist() == hi.tolist()
    # Decoding the last token of a block means the block was split across steps: refused when validated.
    with pytest.raises(ValueError, match=r"block 2 = \[5, 7\) of sequence 2 straddles the step's first row 6"):
        rules.build_from_blocks("gemma3", "official", "sliding", **kwargs)


def good():
    return dict(blocks=BlockList.from_pairs([[(2, 5), (6, 8)]]), cu_seqlens=torch.tensor([0, 10]), total_tokens=10)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(blocks=BlockList.from_pairs([[(2, 5), (4, 8)]])), ValueError, r"block 1 = \[4, 8\).*overlaps"),
        (dict(blocks=BlockList.from_pairs([[(6, 8), (2, 5)]])), ValueError, r"block 1 = \[2, 5\).*sorted"),
        (dict(blocks=BlockList.from_pairs([[(5, 5)]])), ValueError, r"block 0 = \[5, 5\).*start < end"),
        (dict(blocks=BlockList.from_pairs([[(-1, 3)]])), ValueError, r"0 <= start"),
        (dict(blocks=BlockList.from_pairs([[(8, 12)]])), ValueError, r"straddles the end of the step's 10 keys"),
        (dict(blocks=BlockList.from_pairs([[(4, 8)]]), cu_seqlens=torch.tensor([0, 4]), total_tokens=4,
              cu_seqlens_k=torch.tensor([0, 10]), total_keys=10),
         ValueError, r"straddles the step's first row 6"),
        (dict(blocks=BlockList.from_pairs([[(2, 5)], []])), ValueError, "blocks has 2 sequences"),
        (dict(total_tokens=0), ValueError, "total_tokens must be a positive int"),
        (dict(total_tokens=9), ValueError, "end at total_tokens=9"),
        (dict(total_keys=10), ValueError, "total_keys needs cu_seqlens_k"),
        (dict(cu_seqlens_k=torch.tensor([0, 10])), ValueError, "total_keys must be a positive int"),
        (dict(blocks=[(2, 5)]), TypeError, "BlockList"),
        (dict(window=None, layer="sliding"), ValueError, "needs window=W"),
    ],
)
def test_bad_input_raises_clear_error(change, exc, match):
    kwargs = {**good(), "window": 3, "layer": "full", **change}
    layer = kwargs.pop("layer")
    with pytest.raises(exc, match=match):
        rules.build_from_blocks("gemma3", "official", layer, **kwargs)


def test_block_list_types_and_capacity():
    with pytest.raises(TypeError, match="int32"):
        BlockList(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="differ in length"):
        BlockList(torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="cu_blocks"):
        BlockList(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), torch.tensor([0, 1.0]))
    with pytest.raises(ValueError, match="capacity must be an int >= the 2 blocks"):
        BlockList.from_pairs([[(0, 1), (2, 3)]], capacity=1)
    with pytest.raises(ValueError, match=r"\(start, end\) pair of ints"):
        BlockList.from_pairs([[(0, 1.5)]])
    over = BlockList(torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="end at most at capacity 1"):
        rules.build_from_blocks("gemma3", "official", "full", blocks=over, cu_seqlens=torch.tensor([0, 4]), total_tokens=4)


def test_result_is_a_valid_span_mask_and_unvalidated_build_matches():
    ids, cu = random_packed_layout(random.Random(3), max_seqs=3)
    blocks = BlockList.from_pairs(pairs_of(ids, cu))
    a = rules.build_from_blocks("paligemma", "vllm", "sliding", blocks=blocks, cu_seqlens=cu, total_tokens=ids.numel(),
                                window=5)
    b = rules.build_from_blocks("paligemma", "vllm", "sliding", blocks=blocks, cu_seqlens=cu, total_tokens=ids.numel(),
                                window=5, validate=False)
    SpanMask(a.lo, a.hi, a.cu_seqlens)
    assert a.lo.dtype == torch.int32 and torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
