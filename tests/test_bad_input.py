"""First-contact input: undefined token types, numpy integers, empty sequences in cu_seqlens,
Triton missing, heads-first tensors. Tiny shapes; on CPU the kernels run through Triton's
interpreter (conftest), on a CUDA machine on the GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import bidiattn
from bidiattn import rules
from bidiattn.blocks import BlockList
from bidiattn.spans import SpanMask

np = pytest.importorskip("numpy")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(rows, keys, hq=4, hkv=2, d=16, dtype=torch.float16):
    return (torch.randn(rows, hq, d, dtype=dtype, device=DEVICE), torch.randn(keys, hkv, d, dtype=dtype, device=DEVICE),
            torch.randn(keys, hkv, d, dtype=dtype, device=DEVICE))


# ----------------------------------------------------------------------------- a. token types
@pytest.mark.parametrize(
    "family,types,match",
    [
        ("gemma3", [0, 1, 2, 0], r"token type 2 \(first at row 2\) not defined for family 'gemma3', "
                                 r"which defines 0 = text, 1 = image"),
        ("gemma4", [0, 7, 1, 5, 5], r"token types 5, 7 \(first at row 1\).*'gemma4'.*2 = video, 3 = audio"),
        ("gemma3", [0, -1, 1], r"token type -1 \(first at row 1\)"),
        ("paligemma", [0, 0, 2, 1], r"token type 2 .*'paligemma', which defines 0 = prefix, 1 = suffix"),
    ],
)
def test_undefined_token_types_are_refused_with_the_defined_ones(family, types, match):
    with pytest.raises(ValueError, match=match):
        rules.block_ids_from_token_types(torch.tensor(types), family=family)


def test_gemma4_audio_tokens_are_causal_like_text():
    # 3 = audio soft tokens (transformers' mm_token_type_ids): ordinary rows, not a block, and
    # they separate the images around them.
    ids = rules.block_ids_from_token_types(torch.tensor([0, 3, 3, 1, 1, 3, 2, 2, 0]), family="gemma4")
    assert ids.tolist() == [0, 0, 0, 1, 1, 0, 2, 2, 0]


# ----------------------------------------------------------------------------- b. numpy integers
def test_numpy_integers_are_accepted_where_ints_are():
    ids = torch.tensor([0, 1, 1, 1, 0, 0, 0])
    want = rules.build("gemma3", "official", "sliding", block_ids=ids, window=3)
    got = rules.build("gemma3", "official", "sliding", block_ids=ids, window=np.int64(3))
    assert torch.equal(got.lo, want.lo) and torch.equal(got.hi, want.hi)
    dense = rules.dense("gemma3", "official", "sliding", block_ids=ids, window=np.int32(3))
    assert torch.equal(dense, want.to_dense())

    blocks = BlockList.from_pairs([[(1, 4)]])
    cu = torch.tensor([0, 7])
    want = rules.build_from_blocks("gemma3", "vllm", "full", blocks=blocks, cu_seqlens=cu, total_tokens=7, window=3)
    got = rules.build_from_blocks("gemma3", "vllm", "full", blocks=blocks, cu_seqlens=cu, total_tokens=np.int64(7),
                                  window=np.uint8(3), cu_seqlens_k=cu, total_keys=np.int64(7))
    assert torch.equal(got.lo, want.lo) and torch.equal(got.hi, want.hi)
    assert type(got.total_keys) is int

    spans = SpanMask(want.lo, want.hi, cu, cu_seqlens_k=cu, total_keys=np.int64(7))
    assert type(spans.total_keys) is int and spans.total_keys == 7
    summary = spans.tile_summary(np.int64(4))
    assert summary.block_m == 4 and int(summary.num_tiles) == 2


@pytest.mark.parametrize("bad", [True, 3.0, np.float64(3.0), "3"])
def test_bools_floats_and_strings_are_refused_as_ints(bad):
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(TypeError, match=re.escape(f"window must be an int, got {bad!r}")):
        rules.build("gemma3", "official", "sliding", block_ids=ids, window=bad)
    with pytest.raises(TypeError, match=re.escape(f"total_tokens must be an int, got {bad!r}")):
        rules.build_from_blocks("gemma3", "official", "full", blocks=BlockList.from_pairs([[]]),
                                cu_seqlens=torch.tensor([0, 4]), total_tokens=bad)
    spans = rules.build("gemma3", "official", "full", block_ids=ids)
    with pytest.raises(TypeError, match=re.escape(f"num_q_heads must be an int, got {bad!r}")):
        bidiattn.plan(spans, bad, 1, 16)


def test_numpy_scale_softcap_and_plan_sizes():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0], device=DEVICE)
    spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=2)
    q, k, v = _qkv(8, 8)
    want = bidiattn.attention(q, k, v, spans, scale=0.3, softcap=5.0, backend="reference")
    got = bidiattn.attention(q, k, v, spans, scale=np.float32(0.3), softcap=np.float32(5.0), backend="reference")
    torch.testing.assert_close(got, want)
    plan = bidiattn.plan(spans, np.int64(4), np.int32(2), np.int64(16), window=np.int64(2), backend="triton")
    out = bidiattn.attention(q, k, v, spans, scale=np.float16(0.3), softcap=np.float32(5.0), backend="triton",
                             plan=plan)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------- c. empty sequences
LENGTHS = [0, 5, 0, 0, 7, 0]  # empty slots at the start, between, and at the end


def _packed(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)


def _layout():
    """Block ids of the two real sequences (5 and 7 tokens, one image each)."""
    return torch.tensor([0, 1, 1, 1, 0] + [0, 0, 2, 2, 0, 0, 0])


def test_empty_sequences_build_the_same_spans_as_without_them():
    ids = _layout()
    for layer, window in (("full", None), ("sliding", 2)):
        with_empty = rules.build("gemma3", "official", layer, block_ids=ids, cu_seqlens=_packed(LENGTHS), window=window)
        without = rules.build("gemma3", "official", layer, block_ids=ids, cu_seqlens=_packed([5, 7]), window=window)
        assert with_empty.num_sequences == 6
        assert torch.equal(with_empty.lo, without.lo) and torch.equal(with_empty.hi, without.hi)
        assert torch.equal(with_empty.to_dense(), without.to_dense())
        dense = rules.dense("gemma3", "official", layer, block_ids=ids, cu_seqlens=_packed(LENGTHS), window=window)
        assert torch.equal(dense, without.to_dense())
    # The same through the step builder, from block lists (an empty slot has no blocks).
    blocks = BlockList.from_pairs([[], [(1, 4)], [], [], [(2, 4)], []])
    step = rules.build_from_blocks("gemma3", "official", "full", blocks=blocks, cu_seqlens=_packed(LENGTHS),
                                   total_tokens=12)
    without = rules.build("gemma3", "official", "full", block_ids=ids, cu_seqlens=_packed([5, 7]))
    assert torch.equal(step.lo, without.lo) and torch.equal(step.hi, without.hi)


def test_empty_sequences_in_token_types_and_block_checks():
    tt = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1])  # paligemma: prefix then suffix per sequence
    ids = rules.block_ids_from_token_types(tt, family="paligemma", cu_seqlens=_packed([0, 5, 0, 3, 0]))
    assert ids.tolist() == [1, 1, 0, 0, 0, 2, 2, 0]
    # A block may not run from one sequence into the next, empty slots between them or not.
    with pytest.raises(ValueError, match=r"block id 1 is split across sequences 0 and 2 \(rows 2 and 3\)"):
        rules.build("gemma3", "official", "full", block_ids=torch.tensor([0, 1, 1, 1, 0]),
                    cu_seqlens=_packed([3, 0, 2]))
    with pytest.raises(ValueError, match="non-decreasing: sequence 1 has length -2"):
        SpanMask(torch.zeros(4, dtype=torch.int32), torch.tensor([0, 1, 0, 1], dtype=torch.int32),
                 torch.tensor([0, 4, 2, 4]))
    with pytest.raises(ValueError, match="at least one row"):  # all slots empty: nothing to attend
        SpanMask(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.tensor([0, 0, 0]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_over_empty_sequences_matches_the_packed_call_without_them(backend):
    torch.manual_seed(0)
    ids = _layout().to(DEVICE)
    with_empty = rules.build("gemma3", "official", "sliding", block_ids=ids, cu_seqlens=_packed(LENGTHS).to(DEVICE),
                             window=2)
    without = rules.build("gemma3", "official", "sliding", block_ids=ids, cu_seqlens=_packed([5, 7]).to(DEVICE),
                          window=2)
    q, k, v = _qkv(12, 12)
    grads = []
    for spans in (with_empty, without):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse = bidiattn.attention(qq, kk, vv, spans, backend=backend, return_lse=True)
        (out.float().square().sum() + lse.sum()).backward()
        grads.append((out, lse, qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    want = bidiattn.attention(q.float(), k.float(), v.float(), without, backend="reference")
    torch.testing.assert_close(grads[0][0].float(), want, atol=2e-3, rtol=2e-3)


def test_decode_step_with_empty_slots_through_the_planned_kernel():
    # Extend spans: slot 1 has no new row but 9 cached keys, slot 2 nothing at all.
    torch.manual_seed(0)
    cu_q, cu_k = _packed([1, 0, 0, 2]), _packed([6, 9, 0, 5])
    lo = torch.zeros(3, dtype=torch.int32)
    hi = torch.tensor([5, 3, 4], dtype=torch.int32)
    spans = SpanMask(lo, hi, cu_q, cu_seqlens_k=cu_k, total_keys=20).to(DEVICE)
    q, k, v = _qkv(3, 20)
    plan = bidiattn.plan(spans, 4, 2, 16, backend="triton")
    out = bidiattn.attention(q, k, v, spans, backend="triton", plan=plan)
    want = bidiattn.attention(q.float(), k.float(), v.float(), spans, backend="reference")
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)
    # Row 0 sees keys 0..5 of slot 0 only; rows 1-2 keys 15..19 of slot 3, never slot 1's.
    dense = spans.to_dense().cpu()
    assert dense[0].nonzero().flatten().tolist() == list(range(6))
    assert dense[2].nonzero().flatten().tolist() == list(range(15, 20))


# ----------------------------------------------------------------------------- d. Triton missing
def test_triton_backend_without_triton_names_the_install():
    # A subprocess: hiding triton from sys.modules must not leak into other tests.
    code = """
import sys
sys.modules["triton"] = None
import torch, bidiattn
from bidiattn import rules
spans = rules.build("causal", "official", "full", block_ids=torch.zeros(4, dtype=torch.int64))
q = torch.randn(4, 2, 16, dtype=torch.float16)
for call in (lambda: bidiattn.attention(q, q, q, spans, backend="triton"),
             lambda: bidiattn.plan(spans, 2, 2, 16, backend="triton")):
    try:
        call()
    except ImportError as err:
        print(type(err).__name__, err)
print("auto", tuple(bidiattn.attention(q, q, q, spans).shape))
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    hint = "ImportError the triton backend needs Triton, which is not installed: pip install 'bidiattn[triton]'"
    assert len(lines) == 3 and all(line.startswith(hint) for line in lines[:2]), run.stdout
    assert lines[2] == "auto (4, 2, 16)"  # CPU tensors: auto runs the reference, no Triton needed


# ----------------------------------------------------------------------------- e. [H, T, D] tensors
def _spans(total=10):
    return rules.build("causal", "official", "full", block_ids=torch.zeros(total, dtype=torch.int64)).to(DEVICE)


@pytest.mark.parametrize(
    "flip,fix",
    [
        (("q",), "use q.transpose(0, 1)"),
        (("q", "k", "v"), "use q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)"),
        (("k",), "use k.transpose(0, 1)"),  # k and v then differ in shape: the same hint
    ],
)
def test_heads_first_tensors_get_a_transpose_hint(flip, fix):
    q, k, v = _qkv(10, 10, hq=4, hkv=2, dtype=torch.float32)
    tensors = {name: (t.transpose(0, 1) if name in flip else t) for name, t in (("q", q), ("k", k), ("v", v))}
    with pytest.raises(ValueError, match=re.escape("bidiattn expects [T, H, D] (tokens first); got q ")) as err:
        bidiattn.attention(tensors["q"], tensors["k"], tensors["v"], _spans(), backend="reference")
    assert str(err.value).endswith(f"— did you pass [H, T, D]? {fix}")


def test_a_plain_token_count_mismatch_gets_no_transpose_hint():
    q, k, v = _qkv(10, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="token counts differ") as err:
        bidiattn.attention(q, k, v, _spans(12), backend="reference")
    assert "transpose" not in str(err.value)


def test_flags_must_be_bools():
    from bidiattn.serving.kvcache import PagedKVCache, paged_attention

    spans = rules.build("gemma3", "official", "full", block_ids=torch.tensor([0, 1, 1, 0, 0]))
    q, k, v = _qkv(5, 5)
    with pytest.raises(TypeError, match="return_lse must be a bool, got 'yes'"):
        bidiattn.attention(q, k, v, spans, return_lse="yes")
    cache = PagedKVCache.allocate(2, 4, 2, 16, dtype=torch.float16, device=DEVICE)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE)
    for name in ("return_lse", "validate"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got 1"):
            paged_attention(q, cache, table, spans, **{name: 1})


def test_key_offsets_are_named_in_their_errors_and_validate_is_a_bool():
    lo, hi = torch.tensor([0, 0]), torch.tensor([2, 3])
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and end at total_keys=3, got first=0, last=4"):
        SpanMask(lo, hi, cu_seqlens=torch.tensor([0, 2]), cu_seqlens_k=torch.tensor([0, 4]), total_keys=3)
    with pytest.raises(TypeError, match="SpanMask.validate must be a bool, got 'no'"):
        SpanMask(torch.tensor([0, 0]), torch.tensor([0, 1]), validate="no")
