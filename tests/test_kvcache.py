"""Paged K/V cache: append through shuffled page tables, then chunked prefill and decode over
the pages equal the contiguous kernel (bitwise) and the reference."""

from __future__ import annotations

import random

import pytest
import torch

import bidiattn
from bidiattn import reference, rules
from bidiattn.serving.kvcache import PagedKVCache, append, gather, paged_attention
from bidiattn.serving.prefill import RequestLayout, plan_prefill, step_spans
from bidiattn.spans import SpanMask
from conftest import lowp_attention

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, D = 4, 2, 64


def request_ids(rng, length):
    ids, pos, n = torch.zeros(length, dtype=torch.int64), 0, 1
    while pos < length:
        pos += rng.randint(1, 10)
        size = rng.choice([3, 8, 20])
        ids[pos : pos + size] = n
        n, pos = n + 1, pos + size
    return ids


def shuffled_page_table(rng, lengths, page_size, spare=3):
    """Each sequence gets enough pages, drawn at random from one pool (so pages interleave)."""
    pages_per = [-(-n // page_size) for n in lengths]
    width = max(pages_per) + spare
    pool = list(range(sum(pages_per) + spare * len(lengths)))
    rng.shuffle(pool)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    for b, p in enumerate(pages_per):
        table[b, :p] = torch.tensor([pool.pop() for _ in range(p)], dtype=torch.int32)
    return table, len(pool) + sum(pages_per)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("page_size", [16, 7])
def test_chunked_prefill_through_pages_equals_contiguous(seed, page_size):
    rng = random.Random(seed)
    ids = [request_ids(rng, rng.randint(10, 90)) for _ in range(rng.randint(1, 3))]
    lengths = [i.numel() for i in ids]
    full = [rules.build("gemma3", "official", "sliding", block_ids=i, window=9).to(DEVICE) for i in ids]
    table, num_pages = shuffled_page_table(rng, lengths, page_size)
    table = table.to(DEVICE)
    cache = PagedKVCache.allocate(num_pages, page_size, HKV, D, dtype=torch.float16, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    qs, ks, vs = ([torch.randn(n, h, D, generator=g).half().to(DEVICE) for n in lengths] for h in (HQ, HKV, HKV))
    plan = plan_prefill([RequestLayout.from_block_ids(i) for i in ids], budget=rng.choice([12, 30]))
    written = [0] * len(ids)
    for step in plan.steps:
        # Only the requests in this step: their rows of the page table, their new keys.
        reqs = [c.request for c in step.chunks]
        cu = torch.tensor([0, *[c.tokens for c in step.chunks]], device=DEVICE).cumsum(0)
        start = torch.tensor([written[r] for r in reqs], device=DEVICE)
        append(cache, torch.cat([ks[c.request][c.start : c.end] for c in step.chunks]),
               torch.cat([vs[c.request][c.start : c.end] for c in step.chunks]), table[reqs], cu, start)
        for c in step.chunks:
            written[c.request] = c.end
        spans = step_spans(step, full)
        q = torch.cat([qs[c.request][c.start : c.end] for c in step.chunks])
        got = paged_attention(q, cache, table[reqs], spans)
        k = torch.cat([ks[c.request][: c.end] for c in step.chunks])
        v = torch.cat([vs[c.request][: c.end] for c in step.chunks])
        want = bidiattn.attention(q, k, v, spans, backend="triton")
        assert torch.equal(got, want)  # same kernel, same tiles: only the key addresses differ
        torch.testing.assert_close(got.float(), reference.attention(q.float(), k.float(), v.float(), spans),
                                   atol=2e-3, rtol=0)


def test_decode_over_pages_matches_the_reference_at_every_step():
    rng = random.Random(0)
    ids = torch.zeros(48, dtype=torch.int64)
    ids[6:30] = 1
    page_size = 8
    table, num_pages = shuffled_page_table(rng, [48], page_size)
    table = table.to(DEVICE)
    cache = PagedKVCache.allocate(num_pages, page_size, HKV, D, dtype=torch.bfloat16, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(48, h, D, generator=g).bfloat16().to(DEVICE) for h in (HQ, HKV, HKV))
    one = torch.tensor([0, 32], device=DEVICE)
    append(cache, k[:32], v[:32], table, one, torch.zeros(1, dtype=torch.int64, device=DEVICE))
    for t in range(32, 48):
        append(cache, k[t : t + 1], v[t : t + 1], table, torch.tensor([0, 1], device=DEVICE),
               torch.tensor([t], device=DEVICE))
        full = rules.build("gemma3", "official", "sliding", block_ids=ids[: t + 1], window=10).to(DEVICE)
        spans = SpanMask(full.lo[t:], full.hi[t:], torch.tensor([0, 1], device=DEVICE),
                         cu_seqlens_k=torch.tensor([0, t + 1], device=DEVICE), total_keys=t + 1)
        got = paged_attention(q[t : t + 1], cache, table, spans)
        want = reference.attention(q[: t + 1].float(), k[: t + 1].float(), v[: t + 1].float(), full)[t:]
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("page_size", [16, 7])
@pytest.mark.parametrize("layout", ["contiguous", "interleaved", "heads-major"])
def test_gather_packs_each_sequences_keys_as_the_spans_index_them(page_size, layout):
    # Key n of sequence b at row cu_seqlens_k[b] + n, whatever the pages' order and strides
    # (interleaved: K and V views of one [pages, 2, page_size, Hkv, D] buffer, as vLLM's, read
    # as whole rows; heads-major: [pages, Hkv, page_size, D] transposed, element by element).
    rng = random.Random(page_size)
    lengths = [1, page_size, 3 * page_size + 2, 40]
    table, pages = shuffled_page_table(rng, lengths, page_size)
    if layout == "interleaved":
        buf = torch.zeros(pages, 2, page_size, HKV, D, dtype=torch.bfloat16, device=DEVICE)
        cache = PagedKVCache(buf[:, 0], buf[:, 1])
    elif layout == "heads-major":
        buf = torch.zeros(2, pages, HKV, page_size, D, dtype=torch.bfloat16, device=DEVICE)
        cache = PagedKVCache(buf[0].transpose(1, 2), buf[1].transpose(1, 2))
    else:
        cache = PagedKVCache.allocate(pages, page_size, HKV, D, dtype=torch.bfloat16, device=DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    k, v = (torch.randn(sum(lengths), HKV, D).bfloat16().to(DEVICE) for _ in range(2))
    table = table.to(DEVICE)
    append(cache, k, v, table, cu, torch.zeros(len(lengths), dtype=torch.int64, device=DEVICE))
    got_k, got_v = gather(cache, table, cu, sum(lengths))
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    # A capacity past the keys (a captured step's bound): the keys first, then rows no span reads.
    got_k, got_v = gather(cache, table, cu, sum(lengths) + 3 * page_size)
    assert got_k.shape[0] == sum(lengths) + 3 * page_size and torch.equal(got_k[: sum(lengths)], k)


def test_gather_names_bad_arguments():
    cache = PagedKVCache.allocate(3, 8, 1, 16, dtype=torch.bfloat16, device=DEVICE)
    table = torch.tensor([[2, 0, 1]], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 20], device=DEVICE)
    with pytest.raises(TypeError, match="cache must be a PagedKVCache, got tuple"):
        gather((cache.k_pages, cache.v_pages), table, cu, 20)
    with pytest.raises(TypeError, match="cu_seqlens_k must be an int64"):
        gather(cache, table, cu.int(), 20)
    with pytest.raises(ValueError, match="page_table has 1 rows for 2 sequences"):
        gather(cache, table, torch.tensor([0, 10, 20], device=DEVICE), 20)
    with pytest.raises(ValueError, match="total_keys must be a non-negative int, got -1"):
        gather(cache, table, cu, -1)


def test_auto_paged_gluon_falls_back_to_triton_under_softcap(monkeypatch):
    # Where auto would gather the keys for the Gluon forward (head dim 512, long chunks, Hopper),
    # a softcap call runs triton instead: the Gluon kernel has none.
    from bidiattn import launch

    monkeypatch.setattr(launch, "auto_backend", lambda *args, paged=False: "gluon" if paged else "triton")
    spans = SpanMask(torch.zeros(20, dtype=torch.int32), torch.arange(20, dtype=torch.int32), torch.tensor([0, 20]))
    spans = spans.to(DEVICE)
    cache = PagedKVCache.allocate(3, 8, 1, 512, dtype=torch.bfloat16, device=DEVICE)
    table = torch.tensor([[2, 0, 1]], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, 1, 512, generator=g).bfloat16().to(DEVICE) for _ in range(3))
    append(cache, k, v, table, spans.cu_seqlens, torch.zeros(1, dtype=torch.int64, device=DEVICE))
    got = paged_attention(q, cache, table, spans, softcap=5.0)
    assert [p.backend for p in spans._plans.values()] == ["gluon", "triton"]
    want = reference.attention(q.float(), k.float(), v.float(), spans, softcap=5.0)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)


def test_append_writes_where_the_table_says():
    cache = PagedKVCache.allocate(6, 4, 1, 16, dtype=torch.float16, device=DEVICE)
    table = torch.tensor([[5, 2, 0], [1, 4, 3]], dtype=torch.int32, device=DEVICE)
    k = torch.randn(9, 1, 16).half().to(DEVICE)
    append(cache, k, k, table, torch.tensor([0, 6, 9], device=DEVICE), torch.tensor([1, 2], device=DEVICE))
    flat = cache.k_pages.view(-1, 1, 16)
    for i, (page, slot) in enumerate([(5, 1), (5, 2), (5, 3), (2, 0), (2, 1), (2, 2), (1, 2), (1, 3), (4, 0)]):
        assert torch.equal(flat[page * 4 + slot], k[i])


@pytest.mark.parametrize(
    "table,match",
    [
        (torch.tensor([[0, 1]], dtype=torch.int32), "needs 12 keys but its page-table row holds 2 pages x 4 = 8"),
        (torch.tensor([[0, 9, 1]], dtype=torch.int32), r"page_table\[0, 1\] = 9 is not a page \(0..5\)"),
        (torch.tensor([[0, 1, 2]], dtype=torch.int64), "must be an int32 tensor"),
    ],
)
def test_bad_page_tables(table, match):
    cache = PagedKVCache.allocate(6, 4, 1, 16, dtype=torch.float16, device=DEVICE)
    spans = SpanMask(torch.tensor([0], device=DEVICE), torch.tensor([11], device=DEVICE),
                     cu_seqlens_k=torch.tensor([0, 12], device=DEVICE), total_keys=12)
    q = torch.randn(1, 1, 16).half().to(DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        paged_attention(q, cache, table.to(DEVICE), spans)


def test_append_rejects_bad_offsets():
    cache = PagedKVCache.allocate(2, 4, 1, 16, dtype=torch.float16, device=DEVICE)
    k = torch.randn(3, 1, 16).half().to(DEVICE)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE)
    start = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="cu_seqlens must be an int64 tensor"):
        append(cache, k, k, table, torch.tensor([0, 3], dtype=torch.int32, device=DEVICE), start)


def test_cache_shape_errors():
    with pytest.raises(ValueError, match="page_size must be a positive int, got 0"):
        PagedKVCache.allocate(4, 0, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k_pages and v_pages differ"):
        PagedKVCache(torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 32))
    with pytest.raises(TypeError, match="floating-point dtype .*got torch.int32"):
        PagedKVCache.allocate(4, 4, 1, 16, dtype=torch.int32, device=DEVICE)


def test_shared_launch_plan_gives_the_same_bits_for_every_layer():
    # Two layers over one step's spans (decode of 3 sequences and a prefill chunk): one plan,
    # built once, passed to both; each equals the unplanned call on a copy of the spans (which
    # plans for itself) bitwise.
    from bidiattn.blocks import BlockList

    g = torch.Generator().manual_seed(5)
    page_size, k_lens, q_lens = 8, [40, 17, 29], [1, 1, 12]
    blocks = BlockList.from_pairs([[(3, 20)], [], [(2, 9), (17, 29)]], device=DEVICE)
    cu_q = torch.tensor([0, *q_lens], device=DEVICE).cumsum(0)
    cu_k = torch.tensor([0, *k_lens], device=DEVICE).cumsum(0)
    spans = rules.build_from_blocks("gemma3", "official", "sliding", blocks=blocks, cu_seqlens=cu_q,
                                    total_tokens=sum(q_lens), window=9, cu_seqlens_k=cu_k, total_keys=sum(k_lens))
    table, num_pages = shuffled_page_table(random.Random(5), k_lens, page_size)
    table = table.to(DEVICE)
    plan = bidiattn.plan(spans, HQ, HKV, D, paged=True)
    assert plan.backend == "triton"  # auto: triton for paged keys
    copy = SpanMask(spans.lo, spans.hi, spans.cu_seqlens, cu_seqlens_k=cu_k, total_keys=sum(k_lens))
    for _layer in range(2):
        cache = PagedKVCache.allocate(num_pages, page_size, HKV, D, dtype=torch.float16, device=DEVICE)
        k, v = (torch.randn(sum(k_lens), HKV, D, generator=g).half().to(DEVICE) for _ in range(2))
        append(cache, k, v, table, cu_k, torch.zeros(3, dtype=torch.int64, device=DEVICE))
        q = torch.randn(sum(q_lens), HQ, D, generator=g).half().to(DEVICE)
        got = paged_attention(q, cache, table, spans, plan=plan)
        assert torch.equal(got, paged_attention(q, cache, table, copy))
        torch.testing.assert_close(got.float(), reference.attention(q.float(), k.float(), v.float(), spans),
                                   atol=2e-3, rtol=0)


def test_launch_plan_refuses_other_spans_and_shapes():
    from bidiattn.kernels.forward import span_attention_forward
    from bidiattn.launch import TileConfig, plan_forward

    spans = rules.build("gemma3", "official", "full", block_ids=torch.tensor([0, 1, 1, 0, 0]).to(DEVICE))
    q = torch.randn(5, HQ, D).half().to(DEVICE)
    k = torch.randn(5, HKV, D).half().to(DEVICE)
    plan = plan_forward(spans, HQ, HKV, D)
    same = SpanMask(spans.lo, spans.hi, spans.cu_seqlens)
    with pytest.raises(ValueError, match="made for another SpanMask object"):
        span_attention_forward(q, k, k, same, 0.1, None, plan=plan)
    with pytest.raises(ValueError, match=r"\(Hq, Hkv, D\) = \(4, 2, 64\), the call has \(4, 4, 64\)"):
        span_attention_forward(q, q, q, spans, 0.1, None, plan=plan)
    with pytest.raises(ValueError, match="either config or plan"):
        span_attention_forward(q, k, k, spans, 0.1, None, config=TileConfig(64, 64, 4, 1), plan=plan)
    with pytest.raises(ValueError, match="num_q_heads=3 must be a multiple of num_kv_heads=2"):
        plan_forward(spans, 3, 2, D)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        plan_forward(spans, HQ, HKV, 0)
    with pytest.raises(ValueError, match="window must be None or a positive int, got 0"):
        plan_forward(spans, HQ, HKV, D, window=0)
    with pytest.raises(TypeError, match="spans must be a bidiattn.SpanMask, got tuple"):
        plan_forward((spans.lo, spans.hi), HQ, HKV, D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_append_matches_a_row_by_row_copy(dtype):
    # Non-contiguous k/v (every other head of a wider projection), pages drawn from a shuffled
    # pool, three sequences with different cached lengths, page size 5 (rows straddle pages).
    rng = random.Random(2)
    page_size, hkv, d = 5, 3, 48
    start_lens, new_lens = [7, 0, 13], [6, 11, 1]
    table, num_pages = shuffled_page_table(rng, [a + b for a, b in zip(start_lens, new_lens)], page_size)
    table = table.to(DEVICE)
    cache = PagedKVCache.allocate(num_pages, page_size, hkv, d, dtype=dtype, device=DEVICE)
    cache.k_pages.normal_()
    before = cache.k_pages.clone()
    wide = torch.randn(sum(new_lens), 2 * hkv, d).to(dtype).to(DEVICE)
    k, v = wide[:, ::2], wide[:, 1::2]
    assert not k.is_contiguous()
    cu = torch.tensor([0, *new_lens], device=DEVICE).cumsum(0)
    append(cache, k, v, table, cu, torch.tensor(start_lens, device=DEVICE))
    want_k = before.clone()
    row = 0
    for b, (s0, n) in enumerate(zip(start_lens, new_lens)):
        for i in range(n):
            pos = s0 + i
            want_k[int(table[b, pos // page_size]), pos % page_size] = k[row]
            assert torch.equal(cache.v_pages[int(table[b, pos // page_size]), pos % page_size], v[row])
            row += 1
    assert torch.equal(cache.k_pages, want_k)  # every other slot untouched


def test_append_rejects_tensors_on_another_device():
    cache = PagedKVCache.allocate(2, 4, 1, 16, dtype=torch.float16, device="cpu")
    k = torch.randn(3, 1, 16).half()
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="start is on meta, the cache on cpu"):
        append(cache, k, k, table, torch.tensor([0, 3]), torch.zeros(1, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("tokens,hq,hkv,want", [
    (32768, 16, 8, (2, 1)),   # group 2: 64 rows x 2 heads, 1-stage edge loops
    (2048, 16, 8, (2, 1)),    # the same tile at a 2K step
    (2048, 16, 4, (4, None)),  # group 4: 32 rows x 4 heads
    (2048, 8, 8, (1, None)),   # no GQA: 128 rows of one head
    (2048, 12, 4, (1, None)),  # group 3 does not divide 128 rows: one head per tile
])
def test_tiles_by_gqa_group_for_sliding_and_full_layers(tokens, hq, hkv, want):
    from bidiattn.launch import plan_forward

    ids = torch.zeros(tokens, dtype=torch.int64)
    for layer, window in (("sliding", 1024), ("full", None)):
        spans = rules.build("gemma3", "official", layer, block_ids=ids, window=window).to(DEVICE)
        plan = plan_forward(spans, hq, hkv, 128, window=window)
        assert (plan.config.block_m, plan.config.tma, plan.pack, plan.config.edge_stages) == (128, True, *want), layer


def test_packed_sliding_step_tiles_match_the_reference():
    from bidiattn.kernels.forward import span_attention_forward
    from bidiattn.launch import TileConfig

    ids = torch.zeros(300, dtype=torch.int64)
    ids[40:170] = 1
    spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=37).to(DEVICE)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(300, 4, 64, generator=g).half().to(DEVICE)
    k, v = (torch.randn(300, 2, 64, generator=g).half().to(DEVICE) for _ in range(2))
    want = reference.attention(q.float(), k.float(), v.float(), spans)
    # Tolerance: twice PyTorch's own fp16 error against the fp32 reference, plus a small atol.
    bound = 2 * (lowp_attention(q, k, v, spans, 64**-0.5, None).float() - want).abs().max().item() + 1e-4
    for cfg in (TileConfig(32, 16, 4, 3, edge_stages=1, pack_gqa=True), TileConfig(64, 16, 4, 3, edge_stages=1, pack_gqa=True)):
        got, _ = span_attention_forward(q, k, v, spans, 64**-0.5, None, config=cfg)
        assert (got.float() - want).abs().max().item() <= bound, cfg


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("page_size", [16, 32])
def test_tma_loads_through_pages_equal_contiguous_and_ignore_unwritten_slots(seed, page_size):
    """Pages of a multiple of block_n keys take the TMA path (one page-table read per key tile).
    Unwritten slots and spare pages hold inf/nan: the last key tile of a sequence reads past its
    keys inside its last page, which must not reach any output."""
    import dataclasses

    from bidiattn.launch import TileConfig, plan_forward

    rng = random.Random(seed)
    ids = [request_ids(rng, rng.randint(20, 90)) for _ in range(rng.randint(1, 3))]
    lengths = [i.numel() for i in ids]
    packed = torch.cat([torch.where(i > 0, i + 1000 * r, 0) for r, i in enumerate(ids)])  # an id per block
    spans = rules.build("gemma3", "official", "full", block_ids=packed,
                        cu_seqlens=torch.tensor([0, *lengths]).cumsum(0)).to(DEVICE)
    table, num_pages = shuffled_page_table(rng, lengths, page_size)
    table = table.to(DEVICE)
    cache = PagedKVCache.allocate(num_pages, page_size, HKV, D, dtype=torch.float16, device=DEVICE)
    cache.k_pages.fill_(float("inf"))
    cache.v_pages.fill_(float("nan"))
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, HQ, D, generator=g).half().to(DEVICE)
    k, v = (torch.randn(t, HKV, D, generator=g).half().to(DEVICE) for _ in range(2))
    append(cache, k, v, table, spans.cu_seqlens, torch.zeros(len(lengths), dtype=torch.int64, device=DEVICE))
    extend = SpanMask(spans.lo, spans.hi, spans.cu_seqlens, cu_seqlens_k=spans.cu_seqlens, total_keys=t)
    want = reference.attention(q.float(), k.float(), v.float(), spans)
    for cfg in (TileConfig(32, 16, 4, 2, tma=True), TileConfig(32, 16, 4, 3, edge_stages=1, pack_gqa=True, tma=True),
                TileConfig(32, 16, 4, 3, edge_stages=1, pack_gqa=True, tma=True, column_halves=True),
                TileConfig(32, 16, 4, 2, column_halves=True)):
        tiles = plan_forward(extend, HQ, HKV, D, config=cfg)
        got = paged_attention(q, cache, table, extend,
                              plan=dataclasses.replace(bidiattn.plan(extend, HQ, HKV, D, backend="triton"), triton=tiles))
        contiguous = span_attention_forward_with(q, k, v, spans, cfg)
        assert torch.equal(got, contiguous), cfg  # the same tiles and loads; only the rows' addresses differ
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=0)


def span_attention_forward_with(q, k, v, spans, cfg):
    from bidiattn.kernels.forward import span_attention_forward

    return span_attention_forward(q, k, v, spans, D**-0.5, None, config=cfg)[0]


@pytest.mark.parametrize("page_size,want", [(0, True), (16, False), (64, True), (128, True), (96, False)])
def test_tma_is_used_exactly_when_pages_hold_whole_key_tiles(page_size, want):
    from bidiattn.kernels.forward import _descriptors
    from bidiattn.launch import TileConfig

    k, v = (torch.randn(256, 2, 64).half() for _ in range(2))
    *_, tma = _descriptors(k, v, TileConfig(128, 64, 8, 3, tma=True), 64, page_size)
    assert tma is want
    *_, tma = _descriptors(k, v, TileConfig(128, 64, 8, 3), 64, page_size)
    assert tma is False


@pytest.mark.parametrize("halves", [False, True])
def test_tma_at_head_dim_512_needs_column_halves(halves):
    # A TMA box holds at most 256 columns: a 512-column K row fits only as two halves.
    from bidiattn.kernels.forward import _descriptors
    from bidiattn.launch import TileConfig

    k, v = (torch.randn(256, 2, 512).half() for _ in range(2))
    k_desc, v_desc, tma = _descriptors(k, v, TileConfig(64, 64, 8, 1, tma=True, column_halves=halves), 512, 0)
    assert tma is halves
    if halves:
        assert list(k_desc.block_shape) == [64, 256] and list(v_desc.block_shape) == [64, 256]
