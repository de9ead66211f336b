"""backend="fa4" (FlashAttention-4 launches over row segments) against the fp32 reference.

GPU tests need FA4 (``pip install 'bidiattn[fa4]'``, or ``../shared/device/stage-fa4.sh`` on the
GPU machine); where it does not import they skip with that reason. The pure-torch planning is
tested on CPU in test_segments.py. Tolerance as for the triton backend: error <= 2x PyTorch's
own low-precision error against fp32 (+ small atol).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import bidiattn
from bidiattn import reference, rules
from bidiattn.segments import plan_segments
from bidiattn.spans import SpanMask
from conftest import gpu_size_spans, image_spans, lowp_attention, random_packed_layout, tail_rows


def fa4_available() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        return False
    return True


requires_fa4 = pytest.mark.skipif(not fa4_available(), reason="FlashAttention-4 (flash_attn.cute) is not installed")


def check_forward(spans, hq, hkv, d, dtype, softcap=None, seed=0, strategy="segments"):
    g = torch.Generator().manual_seed(seed)
    t, tk = spans.total_tokens, spans.total_keys
    q = torch.randn(t, hq, d, generator=g).to(dtype).cuda()
    k, v = (torch.randn(tk, hkv, d, generator=g).to(dtype).cuda() for _ in range(2))
    spans = spans.to("cuda")
    scale = 1 / math.sqrt(d)
    if strategy == "mask_mod":
        out = bidiattn.attention(q, k, v, spans, softcap=softcap, backend="fa4", fa4_strategy=strategy)
        lse = None
    else:
        out, lse = bidiattn.attention(q, k, v, spans, softcap=softcap, return_lse=True, backend="fa4",
                                      fa4_strategy=strategy)
    ref32, ref_lse = reference.attention(q.float(), k.float(), v.float(), spans, softcap=softcap, return_lse=True)
    torch_err = (lowp_attention(q, k, v, spans, scale, softcap).float() - ref32).abs().max().item()
    err = (out.float() - ref32).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    if lse is not None:
        assert not torch.isnan(lse).any()
        torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("length", [1, 7, 63, 130, 333])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_odd_lengths(length, dtype):
    blocks = [(length // 3, length // 3 + length // 2)] if length > 2 else []
    check_forward(image_spans(length, blocks), 4, 2, 128, dtype, seed=length)


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("family,convention", [(f, c) for f in rules.FAMILIES for c in rules.CONVENTIONS])
@pytest.mark.parametrize("layer", rules.LAYERS)
def test_every_rule_on_packed_sequences(family, convention, layer):
    rng = random.Random(hash((family, convention, layer, "fa4")) % 997)
    ids, cu = random_packed_layout(rng, max_seqs=4, max_len=300, block_frac=0.4)
    spans = rules.build(family, convention, layer, block_ids=ids, window=37, cu_seqlens=cu)
    check_forward(spans, 8, 2, 128, torch.bfloat16, seed=3)
    check_forward(tail_rows(spans, [rng.randint(1, 150) for _ in range(spans.num_sequences)]), 8, 2, 128,
                  torch.bfloat16, seed=4)


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("d", [64, 256])
def test_head_dims_and_softcap(d):
    # Full layer only: each FA4 variant (head dim x window kind) is a separate JIT compile.
    spans = image_spans(517, [(40, 300), (400, 470)], "gemma3", "official", "full")
    check_forward(spans, 4, 1, d, torch.bfloat16, softcap=30.0 if d == 256 else None, seed=d)


@pytest.mark.gpu
@requires_fa4
def test_real_size_and_a_shared_plan():
    spans = gpu_size_spans().to("cuda")
    check_forward(spans, 16, 8, 128, torch.bfloat16, seed=9)
    q, k, v = (torch.randn(spans.total_tokens, h, 128, device="cuda", dtype=torch.bfloat16) for h in (16, 8, 8))
    plan = plan_segments(spans)
    shared = bidiattn.attention(q, k, v, spans, backend="fa4", segment_plan=plan)
    assert torch.equal(shared, bidiattn.attention(q, k, v, spans, backend="fa4"))
    # auto takes fa4 when a plan is given, triton without one.
    assert torch.equal(shared, bidiattn.attention(q, k, v, spans, segment_plan=plan))
    assert torch.equal(bidiattn.attention(q, k, v, spans), bidiattn.attention(q, k, v, spans, backend="triton"))
    other = SpanMask(spans.lo.clone(), spans.hi.clone())
    with pytest.raises(ValueError, match="segment_plan was planned from another SpanMask"):
        bidiattn.attention(q, k, v, other, backend="fa4", segment_plan=plan)


@pytest.mark.gpu
@requires_fa4
@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("family,convention,layer", [("gemma3", "official", "full"), ("gemma4", "official", "sliding"),
                                                     ("paligemma", "vllm", "sliding")])
@pytest.mark.parametrize("d", [128, 256])
def test_mask_mod_strategy_forward(family, convention, layer, d):
    rng = random.Random(hash((family, layer, d)) % 997)
    ids, cu = random_packed_layout(rng, max_seqs=3, max_len=300, block_frac=0.4)
    spans = rules.build(family, convention, layer, block_ids=ids, window=37, cu_seqlens=cu)
    check_forward(spans, 8, 2, d, torch.bfloat16, seed=5, strategy="mask_mod")


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("strategy", ["segments", "mask_mod"])
def test_gradients_match_the_reference(strategy):
    spans = image_spans(301, [(20, 150), (200, 260)], "gemma4", "official", "sliding", window=64).to("cuda")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(301, h, 128, generator=g).to(torch.bfloat16).cuda() for h in (4, 2, 2))
    dout = torch.randn(301, 4, 128, generator=g).cuda()

    def grads(fn):
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad((fn(*x).float() * dout).sum(), x)

    got = grads(lambda a, b, c: bidiattn.attention(a, b, c, spans, backend="fa4", fa4_strategy=strategy))
    want = grads(lambda a, b, c: reference.attention(a.float(), b.float(), c.float(), spans))
    lowp = grads(lambda a, b, c: lowp_attention(a, b, c, spans, 1 / math.sqrt(128), None))
    for name, a, w, t in zip("qkv", got, want, lowp):
        err = (a.float() - w).abs().max().item()
        bound = 2 * (t.float() - w).abs().max().item() + 1e-3 * w.abs().max().item() + 1e-5
        assert err <= bound, (name, err, bound)


def test_without_fa4_or_cuda_it_says_why():
    q = torch.randn(5, 2, 64, dtype=torch.bfloat16)
    spans = image_spans(5, [(1, 3)])
    with pytest.raises(ValueError, match="backend='fa4' needs"):
        bidiattn.attention(q, q[:, :1], q[:, :1], spans, backend="fa4")


@pytest.mark.gpu
@requires_fa4
def test_strategy_errors():
    q = torch.randn(300, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    spans = image_spans(300, [(10, 200)]).to("cuda")
    with pytest.raises(ValueError, match="fa4_strategy must be one of .* got 'dense'"):
        bidiattn.attention(q, q, q, spans, backend="fa4", fa4_strategy="dense")
    with pytest.raises(ValueError, match="returns no lse"):
        bidiattn.attention(q, q, q, spans, backend="fa4", fa4_strategy="mask_mod", return_lse=True)
    q256 = torch.randn(300, 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="no backward at head dim 256"):
        bidiattn.attention(q256, q256, q256, spans, backend="fa4", fa4_strategy="mask_mod")
    extend = tail_rows(spans.to("cpu"), [5]).to("cuda")
    with pytest.raises(ValueError, match="self-attention spans only"):
        bidiattn.attention(q[-5:], q, q, extend, backend="fa4", fa4_strategy="mask_mod")


def test_auto_without_fa4_support_ignores_the_plan():
    q = torch.randn(5, 2, 64)
    spans = image_spans(5, [(1, 3)])
    got = bidiattn.attention(q, q[:, :1], q[:, :1], spans, segment_plan=plan_segments(spans))
    assert torch.equal(got, reference.attention(q, q[:, :1], q[:, :1], spans))


def paged_case(spans, page_size, hq, hkv, d, seed):
    """Pages of a shuffled pool holding each sequence's keys; q; the table; the flat keys."""
    from bidiattn.serving.kvcache import PagedKVCache, append

    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    k_lens = (spans.cu_seqlens_k[1:] - spans.cu_seqlens_k[:-1]).tolist()
    per = [-(-n // page_size) for n in k_lens]
    pool = list(range(sum(per) + 5))
    rng.shuffle(pool)
    table = torch.zeros(len(k_lens), max(per) + 1, dtype=torch.int32)
    for b, p in enumerate(per):
        table[b, :p] = torch.tensor([pool.pop() for _ in range(p)], dtype=torch.int32)
    table = table.cuda()
    cache = PagedKVCache.allocate(sum(per) + 5, page_size, hkv, d, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(spans.total_keys, hkv, d, generator=g).bfloat16().cuda() for _ in range(2))
    append(cache, k, v, table, spans.cu_seqlens_k, torch.zeros(len(k_lens), dtype=torch.int64, device="cuda"))
    q = torch.randn(spans.total_tokens, hq, d, generator=g).bfloat16().cuda()
    return q, k, v, cache, table


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("page_size", [16, 64, 128])
@pytest.mark.parametrize("family,convention,layer", [("gemma3", "official", "full"), ("gemma3", "official", "sliding"),
                                                     ("gemma4", "transformers", "sliding"),
                                                     ("paligemma", "official", "sliding"), ("gemma3", "vllm", "sliding")])
def test_paged_extend_steps_match_the_reference(page_size, family, convention, layer):
    from bidiattn.serving.kvcache import paged_attention

    rng = random.Random(page_size)
    ids, cu = random_packed_layout(rng, max_seqs=4, max_len=300, block_frac=0.4)
    whole = rules.build(family, convention, layer, block_ids=ids, window=37, cu_seqlens=cu)
    # Prefill chunks and one-row decode steps over cached keys (the last rows of each sequence,
    # with the whole prompt's spans: exact wherever a chunk starts).
    spans = tail_rows(whole, [rng.choice([1, rng.randint(1, 150)]) for _ in range(whole.num_sequences)]).to("cuda")
    q, k, v, cache, table = paged_case(spans, page_size, 8, 2, 128, seed=page_size)
    plan = plan_segments(spans, paged=True)
    out = paged_attention(q, cache, table, spans, backend="fa4", segment_plan=plan)
    ref = reference.attention(q.float(), k.float(), v.float(), spans)
    torch_err = (lowp_attention(q, k, v, spans, 128**-0.5, None).float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2 * torch_err + 1e-3
    # Without a plan it plans itself; the triton paged kernel agrees.
    torch.testing.assert_close(paged_attention(q, cache, table, spans, backend="fa4"), out, atol=0, rtol=0)
    triton_out = paged_attention(q, cache, table, spans)
    assert (triton_out.float() - out.float()).abs().max().item() <= 4 * torch_err + 2e-3


@pytest.mark.gpu
@requires_fa4
def test_paged_one_row_windows_for_runs_with_an_offset_first_key():
    from bidiattn.serving.kvcache import paged_attention

    spans = image_spans(300, [(100, 260)], family="paligemma", layer="sliding", window=40)
    spans = tail_rows(spans, [250]).to("cuda")
    plan = plan_segments(spans, paged=True)
    assert any(c.kind == "window" and c.max_q_len == 1 for c in plan.calls)
    q, k, v, cache, table = paged_case(spans, 16, 4, 2, 128, seed=1)
    out = paged_attention(q, cache, table, spans, backend="fa4", segment_plan=plan)
    ref = reference.attention(q.float(), k.float(), v.float(), spans)
    torch_err = (lowp_attention(q, k, v, spans, 128**-0.5, None).float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2 * torch_err + 1e-3


@pytest.mark.gpu
@requires_fa4
def test_paged_fa4_refuses_a_contiguous_plan():
    from bidiattn.serving.kvcache import paged_attention

    spans = tail_rows(image_spans(100, [(10, 40)]), [30]).to("cuda")
    q, _, _, cache, table = paged_case(spans, 16, 4, 2, 128, seed=2)
    with pytest.raises(ValueError, match=r"a contiguous segment plan for a paged cache; plan_segments\(spans, paged=True\)"):
        paged_attention(q, cache, table, spans, backend="fa4", segment_plan=plan_segments(spans))


def test_paged_attention_backend_errors():
    from bidiattn.serving.kvcache import PagedKVCache, paged_attention

    cache = PagedKVCache.allocate(2, 4, 1, 16, dtype=torch.float16, device="cpu")
    spans = SpanMask(torch.tensor([0]), torch.tensor([3]), cu_seqlens_k=torch.tensor([0, 4]), total_keys=4)
    q = torch.randn(1, 1, 16).half()
    table = torch.tensor([[0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="backend must be 'triton' or 'fa4', got 'flex'"):
        paged_attention(q, cache, table, spans, backend="flex")
    with pytest.raises(ValueError, match="segment_plan is for backend='fa4'"):
        paged_attention(q, cache, table, spans, segment_plan=plan_segments(spans, paged=True))
    with pytest.raises(ValueError, match="backend='fa4' takes segment_plan"):
        paged_attention(q, cache, table, spans, backend="fa4", plan=object())
    if not fa4_available():
        with pytest.raises(ValueError, match="needs FlashAttention-4"):
            paged_attention(q, cache, table, spans, backend="fa4")
