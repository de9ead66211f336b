"""FlexAttention backend: the block mask built from spans, and outputs/gradients vs the reference."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention", reason="FlexAttention needs torch >= 2.5")

import bidiattn  # noqa: E402
from bidiattn import reference, rules  # noqa: E402
from bidiattn.kernels.flex import block_mask_from_spans  # noqa: E402
from conftest import gpu_size_spans, lowp_attention, random_packed_layout  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Eager FlexAttention on CPU warns that it materializes the scores; that is expected in tests.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def element_mask(block_mask, t: int) -> torch.Tensor:
    """What FlexAttention computes from a BlockMask: full blocks whole, partial blocks through
    mask_mod, nothing else."""
    bs_q, bs_k = block_mask.BLOCK_SIZE
    allowed = torch.zeros(t, t, dtype=torch.bool)
    rows = torch.arange(t)
    for num, idx, masked in (
        (block_mask.kv_num_blocks, block_mask.kv_indices, True),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False),
    ):
        for qb in range(num.shape[-1]):
            for kb in idx[0, 0, qb, : int(num[0, 0, qb])].tolist():
                q_sl, k_sl = slice(qb * bs_q, (qb + 1) * bs_q), slice(kb * bs_k, (kb + 1) * bs_k)
                qi, ki = rows[q_sl, None], rows[None, k_sl]
                assert not allowed[q_sl, k_sl].any(), f"block ({qb}, {kb}) listed twice"
                if masked:
                    allowed[q_sl, k_sl] = block_mask.mask_mod(0, 0, qi, ki)
                else:
                    allowed[q_sl, k_sl] = True
    return allowed


def packed_dense(spans) -> torch.Tensor:
    glo, ghi = spans.packed_bounds()
    keys = torch.arange(spans.total_tokens)
    return (keys[None, :] >= glo[:, None].long()) & (keys[None, :] <= ghi[:, None].long())


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("block_size", [16, 32, (16, 40), (32, 24)])
def test_block_mask_equals_the_spans(seed, block_size):
    rng = random.Random(seed)
    family, convention = rng.choice(rules.FAMILIES), rng.choice(rules.CONVENTIONS)
    if (family, convention) == ("paligemma", "vllm"):
        convention = "official"
    ids, cu = random_packed_layout(rng, max_seqs=4, max_len=70)
    spans = rules.build(family, convention, rng.choice(rules.LAYERS), block_ids=ids, window=rng.randint(1, 20), cu_seqlens=cu)
    want = spans.to_dense()
    assert torch.equal(packed_dense(spans), want)
    assert torch.equal(element_mask(block_mask_from_spans(spans, block_size), spans.total_tokens), want)


def test_padded_block_mask_adds_rows_that_see_only_themselves():
    ids, cu = random_packed_layout(random.Random(2), max_seqs=2, max_len=50)
    spans = rules.build("paligemma", "official", "full", block_ids=ids, cu_seqlens=cu)
    t = spans.total_tokens
    padded = t + 19
    want = torch.zeros(padded, padded, dtype=torch.bool)
    want[:t, :t] = spans.to_dense()
    want[range(t, padded), range(t, padded)] = True
    assert torch.equal(element_mask(block_mask_from_spans(spans, 16, padded_length=padded), padded), want)


def run_flex(spans, hq, hkv, d, dtype, softcap=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = spans.total_tokens
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype).to(DEVICE) for h in (hq, hkv, hkv))
    spans = spans.to(DEVICE)
    out, lse = bidiattn.attention(q, k, v, spans, softcap=softcap, return_lse=True, backend="flex")
    ref32, ref_lse = reference.attention(q.float(), k.float(), v.float(), spans, softcap=softcap, return_lse=True)
    torch_err = (lowp_attention(q, k, v, spans, 1 / math.sqrt(d), softcap).float() - ref32).abs().max().item()
    err = (out.float() - ref32).abs().max().item()
    assert out.dtype == dtype and out.shape == q.shape
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_packed_gqa_softcap(dtype):
    ids, cu = random_packed_layout(random.Random(7), max_seqs=3, max_len=80)
    spans = rules.build("gemma4", "official", "sliding", block_ids=ids, window=11, cu_seqlens=cu)
    run_flex(spans, 4, 2, 64, dtype, softcap=5.0 if dtype != torch.float32 else None, seed=1)


@pytest.mark.gpu
def test_gradients_match_the_reference():
    ids, cu = random_packed_layout(random.Random(3), max_seqs=2, max_len=60)
    spans = rules.build("gemma3", "official", "full", block_ids=ids, cu_seqlens=cu).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    t = spans.total_tokens
    q, k, v = (torch.randn(t, h, 32, generator=g).to(DEVICE).requires_grad_() for h in (4, 2, 2))
    dout = torch.randn(t, 4, 32, generator=g).to(DEVICE)
    grads = []
    for backend in ("flex", "reference"):
        out = bidiattn.attention(q, k, v, spans, softcap=3.0, backend=backend)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only limit")
def test_flex_refuses_gradients_on_cpu():
    spans = rules.build("causal", "official", "full", block_ids=torch.zeros(4, dtype=torch.int64))
    q = torch.randn(4, 1, 16, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        bidiattn.attention(q, q, q, spans, backend="flex")


def test_flex_rejects_float64():
    spans = rules.build("causal", "official", "full", block_ids=torch.zeros(4, dtype=torch.int64))
    q = torch.randn(4, 1, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='flex' takes float16, bfloat16 or float32, got torch.float64"):
        bidiattn.attention(q, q, q, spans, backend="flex")


def test_no_warning_leaks_from_the_lse_request():
    spans = rules.build("causal", "official", "full", block_ids=torch.zeros(5, dtype=torch.int64)).to(DEVICE)
    q = torch.randn(5, 1, 16, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        bidiattn.attention(q, q, q, spans, backend="flex")


@pytest.mark.gpu
@pytest.mark.parametrize("length,d", [(70, 16), (70, 64), (300, 32)])
def test_lengths_that_are_not_a_multiple_of_128_on_gpu(length, d):
    # Compiled FlexAttention had no kernel for these without padding (torch 2.11, H200).
    run = torch.arange(length) // 20
    spans = rules.build("gemma3", "official", "full", block_ids=torch.where(run % 2 == 1, run, 0))
    run_flex(spans, 2, 1, d, torch.bfloat16, seed=length)


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv", [(128, 16, 8), (256, 8, 4)])
def test_real_sizes_on_gpu(d, hq, hkv):
    spans = gpu_size_spans()
    run_flex(spans, hq, hkv, d, torch.bfloat16, seed=d)
