"""Reference attention: against a naive per-row loop, gradients, GQA, dtypes and bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch

import bidiattn
from bidiattn import SpanMask, reference, rules
from conftest import random_packed_layout


def make(t_len, hq, hkv, d, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t_len, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(t_len, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(t_len, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def naive(q, k, v, spans, scale, softcap):
    """Row by row, only over the allowed keys, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    cu = spans.cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        for r in range(cu[b], cu[b + 1]):
            keys = slice(cu[b] + int(spans.lo[r]), cu[b] + int(spans.hi[r]) + 1)
            for h in range(q.shape[1]):
                s = (k[keys, h // group].double() @ q[r, h].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                lse[h, r] = torch.logsumexp(s, 0)
                out[r, h] = torch.softmax(s, 0) @ v[keys, h // group].double()
    return out, lse


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 1)])
def test_matches_naive_loop_on_packed_layouts(softcap, hq, hkv):
    ids, cu = random_packed_layout(random.Random(hq * 10 + hkv), max_seqs=3, max_len=23)
    spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=5, cu_seqlens=cu)
    q, k, v = make(spans.total_tokens, hq, hkv, 16, seed=hq)
    out, lse = reference.attention(q, k, v, spans, softcap=softcap, return_lse=True)
    want_out, want_lse = naive(q, k, v, spans, 1 / math.sqrt(16), softcap)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert lse.shape == (hq, spans.total_tokens)
    torch.testing.assert_close(out.double(), want_out, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=2e-6)


def test_gqa_equals_repeated_heads():
    spans = rules.build("gemma4", "official", "sliding", block_ids=torch.tensor([0, 1, 1, 1, 0, 0, 2, 2, 0]), window=2)
    q, k, v = make(9, 6, 2, 8, seed=3)
    a = reference.attention(q, k, v, spans, scale=0.3)
    b = reference.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), spans, scale=0.3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_dtype_and_accuracy(dtype):
    spans = rules.build("paligemma", "official", "full", block_ids=torch.tensor([1] * 5 + [0] * 8))
    q, k, v = make(13, 4, 2, 64, dtype=dtype, seed=5)
    out, lse = reference.attention(q, k, v, spans, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, _ = naive(q, k, v, spans, 1 / 8, None)
    # fp32 math: the only error is the final rounding to dtype.
    eps = torch.finfo(dtype).eps
    assert (out.double() - want).abs().max() <= eps * want.abs().max()


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradcheck_float64(softcap):
    ids = torch.tensor([0, 1, 1, 1, 0, 0, 2, 2])
    cu = torch.tensor([0, 5, 8])
    spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=2, cu_seqlens=cu)
    q, k, v = make(8, 4, 2, 4, dtype=torch.float64, seed=11, requires_grad=True)

    def f(q, k, v):
        out, lse = reference.attention(q, k, v, spans, softcap=softcap, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_public_attention_dispatch():
    spans = rules.build("causal", "official", "full", block_ids=torch.zeros(5, dtype=torch.int64))
    q, k, v = make(5, 2, 1, 16, seed=2)
    for backend in ("auto", "reference"):
        torch.testing.assert_close(bidiattn.attention(q, k, v, spans, backend=backend), reference.attention(q, k, v, spans))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        bidiattn.attention(q, k, v, spans, backend="cuda")


def test_causal_matches_sdpa():
    # An outside check: plain causal spans against PyTorch's own causal attention.
    spans = rules.build("causal", "official", "full", block_ids=torch.zeros(17, dtype=torch.int64))
    q, k, v = make(17, 3, 3, 32, seed=9)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    torch.testing.assert_close(reference.attention(q, k, v, spans), want, atol=1e-5, rtol=1e-5)


SPANS5 = SpanMask(torch.tensor([0, 0, 0, 0, 0], dtype=torch.int32), torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32))


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(q=torch.randn(5, 2, 8)), ValueError, "head dims differ: q has D=8, k/v D=16"),
        (dict(k=torch.randn(5, 3, 16), v=torch.randn(5, 3, 16)), ValueError, "Hq=4 must be a positive multiple of .*Hkv=3"),
        (dict(q=torch.randn(6, 4, 16)), ValueError, "token counts differ: q has 6 rows and k/v 5; spans have 5 query rows and 5 keys"),
        (dict(v=torch.randn(5, 2, 8)), ValueError, "k and v must have the same shape"),
        (dict(q=torch.randn(5, 4, 16).half()), TypeError, "share a dtype"),
        (dict(q=torch.ones(5, 4, 16, dtype=torch.int32)), TypeError, "q has dtype torch.int32"),
        (dict(q=torch.randn(5, 64)), ValueError, "q must have shape \\[T, H, D\\]"),
        (dict(spans="causal"), TypeError, "spans must be a bidiattn.SpanMask"),
        (dict(scale=-1.0), ValueError, "scale must be a positive finite number, got -1.0"),
        (dict(softcap=0.0), ValueError, "softcap must be None or a positive finite number, got 0.0"),
    ],
)
def test_bad_input(change, exc, match):
    args = dict(q=torch.randn(5, 4, 16), k=torch.randn(5, 2, 16), v=torch.randn(5, 2, 16), spans=SPANS5, scale=None, softcap=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        bidiattn.attention(args["q"], args["k"], args["v"], args["spans"], scale=args["scale"], softcap=args["softcap"])
