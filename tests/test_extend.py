"""Extend spans (queries are the last rows of longer key sequences): chunked prefill through the
planner equals one-shot prefill, decode equals the reference at every step, errors."""

from __future__ import annotations

import math
import random

import pytest
import torch

import bidiattn
from bidiattn import reference, rules
from bidiattn.serving.prefill import Chunk, RequestLayout, Step, plan_prefill, step_spans
from bidiattn.kernels.forward import span_attention_forward
from bidiattn.launch import TileConfig
from bidiattn.spans import SpanMask

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_request(rng: random.Random, length: int):
    ids, pos, next_id = torch.zeros(length, dtype=torch.int64), 0, 1
    while pos < length:
        pos += rng.randint(1, 12)
        n = rng.choice([2, 5, 9, 17, 30])
        if pos < length:
            ids[pos : pos + n] = next_id
            next_id += 1
        pos += n
    return ids


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("family,convention,layer", [("gemma3", "official", "sliding"), ("gemma3", "vllm", "full"),
                                                     ("gemma4", "official", "sliding"), ("paligemma", "official", "full")])
def test_chunked_prefill_equals_one_shot(seed, family, convention, layer):
    rng = random.Random(seed * 31 + len(family) * 7 + len(layer))
    window, budget = rng.choice([4, 8, 16]), rng.choice([7, 16, 24])
    ids = [random_request(rng, rng.randint(5, 70)) for _ in range(rng.randint(1, 3))]
    full = [rules.build(family, convention, layer, block_ids=i, window=window).to(DEVICE) for i in ids]
    plan = plan_prefill([RequestLayout.from_block_ids(i) for i in ids], budget)
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = 4, 2, 64
    qs, ks, vs = ([torch.randn(i.numel(), h, d, generator=g).bfloat16().to(DEVICE) for i in ids] for h in (hq, hkv, hkv))
    one_shot = [bidiattn.attention(q, k, v, s, backend="triton") for q, k, v, s in zip(qs, ks, vs, full)]
    exact = [reference.attention(q.float(), k.float(), v.float(), s) for q, k, v, s in zip(qs, ks, vs, full)]
    chunked = [torch.full_like(q, float("nan")) for q in qs]
    for step in plan.steps:
        spans = step_spans(step, full)
        assert spans.window == full[0].window  # the window hint kept (rules.build's, the same for all)
        q = torch.cat([qs[c.request][c.start : c.end] for c in step.chunks])
        k = torch.cat([ks[c.request][: c.end] for c in step.chunks])
        v = torch.cat([vs[c.request][: c.end] for c in step.chunks])
        out = bidiattn.attention(q, k, v, spans, backend="triton")
        torch.testing.assert_close(out.float(), reference.attention(q.float(), k.float(), v.float(), spans),
                                   atol=2e-2, rtol=0)
        rows = 0
        for c in step.chunks:
            chunked[c.request][c.start : c.end] = out[rows : rows + c.tokens]
            rows += c.tokens
    for a, b, ref in zip(chunked, one_shot, exact):
        # Same math over different tile boundaries: both within bf16 rounding of the exact result.
        assert not torch.isnan(a).any()
        assert (a.float() - ref).abs().max() <= (b.float() - ref).abs().max() * 2 + 1e-2


def test_decode_matches_the_reference_at_every_step():
    ids = torch.zeros(60, dtype=torch.int64)
    ids[5:25] = 1  # an image in the prompt (first 30 tokens), then 30 generated text tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(60, h, 128, generator=g).half().to(DEVICE) for h in (8, 2, 2))
    for layer, window in (("full", None), ("sliding", 8)):
        for t in range(30, 60):
            spans_full = rules.build("gemma3", "official", layer, block_ids=ids[: t + 1], window=window).to(DEVICE)
            cu = torch.tensor([0, 1], device=DEVICE)
            spans = SpanMask(spans_full.lo[t:], spans_full.hi[t:], cu, cu_seqlens_k=torch.tensor([0, t + 1], device=DEVICE),
                             total_keys=t + 1)
            out = bidiattn.attention(q[t : t + 1], k[: t + 1], v[: t + 1], spans, backend="triton")
            want = reference.attention(q[: t + 1].float(), k[: t + 1].float(), v[: t + 1].float(), spans_full)[t:]
            torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("kv_splits", [2, 7, 64])
def test_decode_with_key_range_slices_matches_the_reference(kv_splits):
    # Flash-decoding: each query tile's key range cut into slices, partial results merged by
    # lse; some slices hold none of a row's keys (sliding window), which must weigh 0.
    ids = torch.zeros(300, dtype=torch.int64)
    ids[40:140] = 1
    g = torch.Generator().manual_seed(kv_splits)
    q, k, v = (torch.randn(300, h, 64, generator=g).half().to(DEVICE) for h in (4, 1, 1))
    for layer, window in (("full", None), ("sliding", 37)):
        full = rules.build("gemma3", "official", layer, block_ids=ids, window=window).to(DEVICE)
        spans = step_spans(Step((Chunk(0, 290, 300),)), [full])
        out, lse = span_attention_forward(q[290:], k, v, spans, 0.125, None,
                                          config=TileConfig(16, 16, 4, 1, kv_splits=kv_splits))
        want, want_lse = reference.attention(q[290:].float(), k.float(), v.float(), spans, scale=0.125, return_lse=True)
        torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=0)


def test_decode_key_slices_follow_the_keys_a_row_sees(monkeypatch):
    # The split-KV count from sizes (launch._auto_kv_splits, here as on a 132-SM GPU): two decode
    # rows over a bound of 9472 keys each (vLLM's max_model_len) at 16 programs per slice. A full
    # layer slices its keys 32 ways; a sliding layer's rows see at most the window (+ the tile),
    # so 4 slices of at least 4 key tiles, not 32 of one or none.
    from types import SimpleNamespace

    from bidiattn import launch

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    spans = SimpleNamespace(total_tokens=2, num_sequences=2, total_keys=2 * 9472,
                            lo=SimpleNamespace(device=torch.device("cuda")))
    assert launch._auto_kv_splits(spans, 16, 8, 64) == 32
    assert launch._auto_kv_splits(spans, 16, 8, 64, window=1024) == 4
    assert launch._auto_kv_splits(spans, 16, 8, 64, window=100_000) == 32
    assert launch._auto_kv_splits(spans, 16, 8, 64, window=100) == 1
    spans.lo = SimpleNamespace(device=torch.device("cpu"))
    assert launch._auto_kv_splits(spans, 16, 8, 64, window=1024) == 1  # off CUDA: no slices


@pytest.mark.parametrize("d", [256, 512])
def test_decode_tile_config_at_large_head_dims(d):
    ids = torch.zeros(90, dtype=torch.int64)
    ids[10:50] = 1
    full = rules.build("gemma4", "official", "sliding", block_ids=ids, window=20).to(DEVICE)
    spans = step_spans(Step((Chunk(0, 88, 90),)), [full])  # two new tokens: speculative decode
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(90, h, d, generator=g).bfloat16().to(DEVICE) for h in (4, 2, 2))
    out = bidiattn.attention(q[88:], k, v, spans, backend="triton")
    want = reference.attention(q[88:].float(), k.float(), v.float(), spans)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=0)


def test_extend_gradients_match_the_reference():
    ids = torch.zeros(50, dtype=torch.int64)
    ids[10:30] = 1
    full = rules.build("gemma4", "official", "sliding", block_ids=ids, window=6).to(DEVICE)
    spans = step_spans(Step((Chunk(0, 10, 50),)), [full])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(40, 4, 64, generator=g).half().to(DEVICE).requires_grad_()
    k, v = (torch.randn(50, 2, 64, generator=g).half().to(DEVICE).requires_grad_() for _ in range(2))
    dout = torch.randn(40, 4, 64, generator=g).to(DEVICE)
    got = torch.autograd.grad(bidiattn.attention(q, k, v, spans, backend="triton").float(), (q, k, v), dout)
    want = torch.autograd.grad(reference.attention(q.float(), k.float(), v.float(), spans), (q, k, v), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=0)


def test_extend_dense_mask_is_the_rows_of_the_full_mask():
    ids = torch.zeros(30, dtype=torch.int64)
    ids[8:20] = 3
    full = rules.build("gemma3", "official", "sliding", block_ids=ids, window=5)
    spans = step_spans(Step((Chunk(0, 8, 24),)), [full])
    assert torch.equal(spans.to_dense(), full.to_dense()[8:24, :24])
    assert spans.num_pairs() == int(full.to_dense()[8:24].sum())


def test_a_chunk_of_an_unknown_request_is_refused():
    full = rules.build("causal", "official", "full", block_ids=torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="names request 1, but 1 request spans were given"):
        step_spans(Step((Chunk(1, 0, 4),)), [full])


def test_a_chunk_that_splits_a_block_is_refused():
    ids = torch.zeros(30, dtype=torch.int64)
    ids[8:20] = 3
    full = rules.build("gemma3", "official", "full", block_ids=ids)
    with pytest.raises(ValueError, match="hi must be inside the sequence"):
        step_spans(Step((Chunk(0, 0, 12),)), [full])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cu_seqlens_k=torch.tensor([0, 2]), total_keys=2), "sequence 0 has 3 query rows but only 2 keys"),
        (dict(cu_seqlens_k=torch.tensor([0, 5]), total_keys=None), "total_keys must be a positive int"),
        (dict(total_keys=5), "needs cu_seqlens_k"),
        (dict(cu_seqlens_k=torch.tensor([0, 5]), total_keys=6), "cu_seqlens_k must start at 0 and end at total_keys=6"),
    ],
)
def test_bad_extend_spans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpanMask(torch.tensor([0, 0, 0]), torch.tensor([2, 3, 4]), **kwargs)


def test_extend_row_before_its_position_is_refused():
    # 3 rows over 5 keys sit at positions 2, 3, 4; row 0 ending at key 1 misses itself.
    with pytest.raises(ValueError, match="row 0 .*position 2.*hi must be >= the row's own position"):
        SpanMask(torch.tensor([0, 0, 0]), torch.tensor([1, 3, 4]), cu_seqlens_k=torch.tensor([0, 5]), total_keys=5)


def test_flex_refuses_extend_spans():
    spans = SpanMask(torch.tensor([0, 0]), torch.tensor([3, 4]), cu_seqlens_k=torch.tensor([0, 5]), total_keys=5)
    q = torch.randn(2, 1, 16)
    with pytest.raises(ValueError, match="self-attention spans only"):
        bidiattn.attention(q, torch.randn(5, 1, 16), torch.randn(5, 1, 16), spans, backend="flex")
    assert math.isfinite(float(bidiattn.attention(q, torch.randn(5, 1, 16), torch.randn(5, 1, 16), spans).sum()))


@pytest.mark.parametrize("config", [TileConfig(16, 16, 4, 2), TileConfig(16, 16, 4, 2, tma=True)], ids=str)
def test_keys_past_a_sequence_never_reach_its_rows(config):
    # Two requests' keys packed back to back: request 0's last key tile runs into request 1's
    # first keys, which request 1's rows (window 6) never see. Made inf there, they must not
    # reach request 0's output through the pointer loads or the TMA loads (0 * inf = NaN).
    full = rules.build("gemma3", "official", "sliding", block_ids=torch.zeros(40, dtype=torch.int64), window=6)
    spans = step_spans(Step((Chunk(0, 36, 37), Chunk(1, 36, 40))), [full, full])
    g = torch.Generator().manual_seed(11)
    q = torch.randn(5, 2, 64, generator=g).half()
    k, v = (torch.randn(77, 1, 64, generator=g).half() for _ in range(2))
    want = reference.attention(q.float(), k.float(), v.float(), spans, scale=0.125)
    k[37:48], v[37:48] = float("inf"), float("inf")
    out, _ = span_attention_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), spans.to(DEVICE), 0.125, None,
                                    config=config)
    torch.testing.assert_close(out.float().cpu(), want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_gradients_of_a_sequence_ignore_the_next_ones_rows_and_keys(tma):
    # The backward's tiles run past a sequence: a dQ-pass key tile into the next request's keys
    # (never seen by its rows: window 6), a dK/dV-pass query range into the next request's
    # rows. Both made inf there; request 0's gradients must stay those of the clean inputs.
    from bidiattn.kernels.backward import span_attention_backward
    from bidiattn.launch import BackwardConfig

    full = rules.build("gemma3", "official", "sliding", block_ids=torch.zeros(40, dtype=torch.int64), window=6)
    spans = step_spans(Step((Chunk(0, 30, 37), Chunk(1, 36, 40))), [full, full])
    g = torch.Generator().manual_seed(12)
    q, dout = (torch.randn(11, 2, 64, generator=g) for _ in range(2))
    k, v = (torch.randn(77, 1, 64, generator=g) for _ in range(2))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = reference.attention(*leaves, spans, scale=0.125, return_lse=True)
    want = torch.autograd.grad((out * dout).sum(), leaves)
    q, k, v, dout = (x.half() for x in (q, k, v, dout))
    q[7:], dout[7:], k[37:48], v[37:48] = float("inf"), float("inf"), float("inf"), float("inf")
    got = span_attention_backward(*(x.to(DEVICE) for x in (dout, q, k, v, out.half(), lse)), spans.to(DEVICE), 0.125,
                                  None, config=BackwardConfig(16, 16, 4, 1, tma=tma))
    for name, a, w, rows in zip("qkv", got, want, (7, 37, 37)):
        torch.testing.assert_close(a[:rows].float().cpu(), w[:rows], atol=3e-3, rtol=0, msg=f"d{name}")
