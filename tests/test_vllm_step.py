"""The vLLM backend's step logic without vLLM: image ranges -> block lists -> spans equal to
rules.build of the same layout (every family and convention the backend serves, full and
sliding, several requests, chunks that start mid-request, decode rows), the builder's buffers
persist across steps, and attention over a KV cache laid out as vLLM lays it out equals the
reference (TRITON_INTERPRET=1 on CPU).

The cache is built by hand the way vLLM 0.26.0 builds it:

- per layer one buffer, logical shape ``get_kv_cache_shape`` = ``(num_blocks, Hkv, block_size,
  2 * D)`` viewed through the stride order ``(0, 2, 1, 3)`` (NHD): the raw allocation is viewed
  as the permuted shape and permuted back (``vllm/v1/worker/gpu/attn_utils.py``,
  ``_reshape_attention_kv_cache``, lines 200-257; called from
  ``vllm/v1/worker/gpu_model_runner.py``, ``_reshape_kv_cache_tensors``, lines 7290-7380);
- K and V are its two halves ``kv_cache.transpose(1, 2).split(D, dim=-1)``
  (``vllm/v1/attention/backends/flash_attn.py``, ``do_kv_cache_update``, lines 1071-1105);
- block tables are int32 ``[max_num_reqs, max_num_blocks_per_req]``
  (``vllm/v1/worker/block_table.py``, line 82), slot of key ``p`` =
  ``block_table[r, p // block_size] * block_size + p % block_size`` (same file,
  ``_compute_slot_mapping_kernel``, lines 347-410), ``-1`` for padding;
- ``mm_req_doc_ranges``: request index -> absolute inclusive ``(start, end)`` ranges
  (``vllm/v1/attention/backend.py``, ``CommonAttentionMetadata``, lines 470-474; built in
  ``gpu_model_runner.py`` lines 2359-2392 from ``PlaceholderRange.extract_embeds_range``).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from bidiattn import SpanMask, reference, rules
from bidiattn.integrations.vllm.config import resolve_model
from bidiattn.integrations.vllm.step import StepBuilder, attend, kv_views, step_blocks, write_kv
from conftest import lowp_attention

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WINDOW = 7
# (family, convention, model_type) the backend serves; paligemma's official/transformers prefix
# block is refused (tests/test_vllm_config.py).
SERVED = [("causal", c, "gemma3") for c in ("official", "vllm")] + [
    (f, c, mt) for f, mt in (("gemma3", "gemma3"), ("gemma4", "gemma4")) for c in rules.CONVENTIONS
] + [("paligemma", "vllm", "paligemma")]


def model_rule(family, convention, model_type):
    return resolve_model(model_type, sliding_window=WINDOW, use_bidirectional_attention="vision",
                         convention=convention, family_name=family)


def random_request(rng: random.Random, length: int) -> list[tuple[int, int]]:
    """Inclusive image ranges of one prompt: some adjacent (no separator), some long."""
    ranges, pos = [], rng.randint(0, 4)
    while pos < length - 1:
        size = rng.choice([1, 3, 5, 9, 12])
        end = min(length - 1, pos + size - 1)
        ranges.append((pos, end))
        pos = end + 1 + rng.choice([0, 0, 1, 3, 6])
    return ranges


def block_ids(length: int, ranges: list[tuple[int, int]], merge: bool) -> torch.Tensor:
    """rules.build's block ids for the ranges: runs of image tokens (merge) or one id per range."""
    if merge:
        mask = torch.zeros(length, dtype=torch.bool)
        for s, e in ranges:
            mask[s : e + 1] = True
        return rules.block_ids_from_mask(mask).long()
    ids = torch.zeros(length, dtype=torch.int64)
    for n, (s, e) in enumerate(ranges, 1):
        ids[s : e + 1] = n
    return ids


def schedule(rng: random.Random, length: int, done: int, ranges, decode: bool) -> tuple[int, int]:
    """vLLM's next step of one request: ``(first row, key count)``. A prefill chunk starts where
    the request stands (mid-image too: prefix caching) and never ends inside an image (vLLM
    forces disable_chunked_mm_input for these models); decode is one row past the prompt."""
    if decode:
        return length, length + 1
    inside = {p for s, e in ranges for p in range(s + 1, e + 1)}
    ends = [p for p in range(done + 1, length + 1) if p not in inside]
    return done, rng.choice(ends)


def random_step(rng: random.Random, num_requests: int):
    """A mixed batch: per request its prompt ranges and the step's (first row, key count); the
    full sequences (prompt + decoded text) for the reference."""
    reqs = []
    for _ in range(num_requests):
        length = rng.randint(3, 40)
        ranges = random_request(rng, length)
        kind = rng.choice(["first", "mid", "decode"])
        if kind == "decode":
            first, keys = schedule(rng, length, 0, ranges, True)
        else:
            inside = {p for s, e in ranges for p in range(s + 1, e + 1)}
            done = 0 if kind == "first" else rng.randint(0, length - 1)
            if kind == "mid" and rng.random() < 0.5:  # a chunk on an image boundary
                done = min(done, max(0, min(inside) - 1)) if inside else done
            first, keys = schedule(rng, length, done, ranges, False)
        reqs.append((length, ranges, first, keys))
    return reqs


def step_tensors(reqs, device=DEVICE):
    q_lens = [keys - first for _, _, first, keys in reqs]
    k_lens = [keys for _, _, _, keys in reqs]
    cu_q = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    return cu_q, torch.tensor(k_lens, dtype=torch.int32), q_lens, k_lens


def expected_spans(model, layer, reqs, window):
    """rules.build over each request's whole sequence, rows of the step only."""
    los, his = [], []
    for length, ranges, first, keys in reqs:
        ids = block_ids(max(length, keys), ranges, model.merges_adjacent)
        whole = rules.build(model.family, model.convention, layer, block_ids=ids, window=window)
        los.append(whole.lo[first:keys])
        his.append(whole.hi[first:keys])
    return torch.cat(los), torch.cat(his)


def builder_for(model, max_seqs=8, max_tokens=256, max_model_len=64, kinds=None):
    kinds = kinds if kinds is not None else (model.kind(None), model.kind(WINDOW))
    return StepBuilder.allocate(model, kinds, max_seqs=max_seqs, max_tokens=max_tokens, max_model_len=max_model_len,
                                device=DEVICE)


def build(builder, reqs, pad_requests=0, block_table=None):
    cu_q, seq_lens, _, _ = step_tensors(reqs)
    num = len(reqs) + pad_requests
    # vLLM pads a batch with empty requests (query length 0, sequence length 0).
    cu_q = torch.cat([cu_q, cu_q[-1:].repeat(pad_requests)])
    seq_lens = torch.cat([seq_lens, torch.zeros(pad_requests, dtype=torch.int32)])
    ranges = {b: list(r) for b, (_, r, _, _) in enumerate(reqs)}
    if block_table is None:
        block_table = torch.zeros(builder.max_seqs, 4, dtype=torch.int32, device=DEVICE)
    return builder.build(num_reqs=num, num_tokens=int(cu_q[-1]), query_start_loc=cu_q.to(DEVICE),
                         seq_lens=seq_lens.to(DEVICE), query_start_loc_cpu=cu_q, seq_lens_cpu=seq_lens,
                         ranges=ranges, block_table=block_table, slot_mapping=torch.zeros(0, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- step_blocks
def test_step_blocks_keeps_blocks_holding_the_steps_rows():
    ranges = {0: [(9, 12), (2, 4)], 1: [(0, 3)], 2: [(5, 6), (7, 8)]}
    # request 0: rows 3..11 (chunk ends at an image end is not required here: keys 12)
    starts, ends, counts = step_blocks(ranges, [9, 1, 4], [12, 20, 9], merge=True)
    assert counts == [2, 0, 1]  # request 1 decodes past its image; request 2's touching images merge
    assert list(zip(starts, ends)) == [(2, 5), (9, 13), (5, 9)]
    starts, ends, counts = step_blocks(ranges, [9, 1, 4], [12, 20, 9], merge=False)
    assert counts == [2, 0, 2] and list(zip(starts, ends))[2:] == [(5, 7), (7, 9)]
    # a block wholly before the step's first row or past its keys is dropped
    assert step_blocks({0: [(0, 1), (5, 6)]}, [2], [4], merge=True)[2] == [0]
    assert step_blocks({0: [(0, 1)]}, [1], None, merge=True)[2] == [1]  # unknown lengths keep all
    assert step_blocks(None, [1, 2], [3, 4], merge=True) == ([], [], [0, 0])


@pytest.mark.parametrize("ranges, match", [
    ({0: [(3, 2)]}, r"image range \(3, 2\)"),
    ({0: [(1, 2.0)]}, r"image range"),
    ({5: [(0, 1)]}, r"names request 5"),
    ({0: [(0, 4), (3, 6)]}, r"overlapping image ranges"),
])
def test_step_blocks_bad_ranges(ranges, match):
    with pytest.raises(ValueError, match=match):
        step_blocks(ranges, [3], [8], merge=False)


def test_step_blocks_never_exceed_the_rows():
    rng = random.Random(0)
    for _ in range(200):
        reqs = random_step(rng, rng.randint(1, 5))
        for merge in (True, False):
            _, _, q_lens, k_lens = step_tensors(reqs)
            _, _, counts = step_blocks({b: r for b, (_, r, _, _) in enumerate(reqs)}, q_lens, k_lens, merge=merge)
            assert all(c <= q for c, q in zip(counts, q_lens))


# ---------------------------------------------------------------------------------------------- spans
@pytest.mark.parametrize("family, convention, model_type", SERVED)
def test_step_spans_equal_build_of_the_same_layout(family, convention, model_type):
    model = model_rule(family, convention, model_type)
    builder = builder_for(model)
    rng = random.Random(repr((family, convention)))
    for trial in range(12):
        reqs = random_step(rng, rng.randint(1, 5))
        meta = build(builder, reqs, pad_requests=trial % 3)
        for kind in builder.kinds:
            got = meta.spans(kind)
            lo, hi = expected_spans(model, kind.layer, reqs, kind.window if kind.window else WINDOW)
            assert torch.equal(got.lo.cpu(), lo) and torch.equal(got.hi.cpu(), hi), (kind, reqs)
            assert meta.spans(kind) is got  # made once per step and kind


def test_full_layers_of_a_model_without_a_window_keep_every_image():
    """vLLM's rule drops images longer than the model's sliding window; PaliGemma-1's Gemma has
    none, so vLLM keeps them all: its full layers then see every image block (``c ∨ blk``)."""
    model = resolve_model("paligemma", "gemma", convention="vllm")
    builder = builder_for(model, kinds=(model.kind(None),))
    reqs = [(60, [(0, 39)], 0, 50), (30, [(2, 20)], 10, 30)]
    got = build(builder, reqs).spans(builder.kinds[0])
    lo, hi = [], []
    for length, ranges, first, keys in reqs:
        whole = rules.build("paligemma", "official", "full", block_ids=block_ids(length, ranges, True))
        lo.append(whole.lo[first:keys])
        hi.append(whole.hi[first:keys])
    assert torch.equal(got.lo.cpu(), torch.cat(lo)) and torch.equal(got.hi.cpu(), torch.cat(hi))


def test_builder_buffers_persist_and_decode_steps_have_no_blocks():
    model = model_rule("gemma3", "official", "gemma3")
    builder = builder_for(model)
    first = build(builder, [(20, [(2, 9)], 0, 12), (8, [(0, 3)], 0, 8)])
    assert first.layout.blocks.cu_blocks.tolist() == [0, 1, 2]
    decode = build(builder, [(20, [(2, 9)], 20, 21), (8, [(0, 3)], 8, 9)])
    for a, b in ((first.layout.blocks.starts, decode.layout.blocks.starts), (first.layout.cu_q, decode.layout.cu_q),
                 (first.layout.cu_k, decode.layout.cu_k), (first.layout.blocks.cu_blocks, decode.layout.blocks.cu_blocks)):
        assert a.data_ptr() == b.data_ptr()  # the same buffers, rewritten
    assert decode.layout.blocks.cu_blocks.tolist() == [0, 0, 0]
    assert decode.layout.cu_k.tolist() == [0, 21, 30] and decode.layout.cu_q.tolist() == [0, 1, 2]
    assert decode.layout.total_keys == 2 * builder.max_model_len


def test_kv_cache_groups_of_one_step_share_its_build():
    # vLLM builds a step's metadata once per KV-cache group from the same objects (Gemma-4-31B:
    # six groups); the groups' builders share one StepBuilder, which builds the step once: the
    # later groups get the first's layout and prepared spans and plans, with their own block
    # table, and attend correctly through it; so does a group that takes the first's metadata
    # through StepMetadata.for_group (vLLM's update_block_table). A new step (other objects or
    # host values, even in the same objects) builds anew.
    model = model_rule("gemma3", "official", "gemma3")
    hq, hkv, d, block_size = 4, 2, 32, 16
    reqs = [(30, [(4, 11)], 0, 15), (25, [(1, 9)], 25, 26)]
    builder = builder_for(model)
    cu_q, seq_lens, _, _ = step_tensors(reqs)
    g = torch.Generator().manual_seed(5)
    ks = [torch.randn(k, hkv, d, generator=g).half() for *_, k in reqs]
    vs = [torch.randn(k, hkv, d, generator=g).half() for *_, k in reqs]
    q = torch.randn(sum(k - f for *_, f, k in reqs), hq, d, generator=g).half()
    step = dict(num_reqs=2, num_tokens=int(cu_q[-1]), query_start_loc=cu_q.to(DEVICE), seq_lens=seq_lens.to(DEVICE),
                query_start_loc_cpu=cu_q, seq_lens_cpu=seq_lens, ranges={b: list(r) for b, (_, r, _, _) in enumerate(reqs)},
                slot_mapping=torch.zeros(0, dtype=torch.int64))
    metas, outs = [], []
    for group, pages in enumerate(([0, 1, 2, 3], [5, 7, 4, 6], [3, 6, 1, 0])):  # each group's own pages
        table = torch.tensor([pages[:2], pages[2:]], dtype=torch.int32, device=DEVICE)
        cache = vllm_kv_cache(8, block_size, hkv, d, torch.float16)
        for b in range(2):
            write_kv(ks[b].to(DEVICE), vs[b].to(DEVICE), cache,
                     torch.tensor(slots(table[b].tolist(), range(ks[b].shape[0]), block_size), device=DEVICE))
        padded = torch.cat([table, torch.zeros_like(table)])  # vLLM's table has rows for padded requests
        metas.append(builder.build(**step, block_table=padded) if group < 2 else
                     metas[0].for_group(padded, step["slot_mapping"]))
        kind = model.kind(WINDOW)
        outs.append(attend(q.to(DEVICE), cache, metas[-1], kind, scale=d**-0.5, softcap=None,
                           out=torch.empty(q.shape, dtype=torch.float16, device=DEVICE)))
        assert metas[-1].block_table.data_ptr() == padded.data_ptr()
    for meta, out in zip(metas[1:], outs[1:]):
        assert meta.layout is metas[0].layout and meta._prepared is metas[0]._prepared
        assert meta.block_table.shape == (2, 2)
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)
    assert len(metas[0]._prepared) == 2  # the sliding kind's spans and plan, made once for all groups
    with pytest.raises(ValueError, match="int32"):
        metas[0].for_group(padded.long(), step["slot_mapping"])
    with pytest.raises(ValueError, match="1 rows, the step 2 requests"):
        metas[0].for_group(padded[:1], step["slot_mapping"])
    lo, hi = expected_spans(model, "sliding", reqs, WINDOW)
    row = 0
    for b, (_, _, first, keys) in enumerate(reqs):
        n = keys - first
        spans = SpanMask(lo[row : row + n], hi[row : row + n], cu_seqlens_k=torch.tensor([0, keys]), total_keys=keys)
        want = reference.attention(q[row : row + n].float(), ks[b].float(), vs[b].float(), spans, scale=d**-0.5)
        torch.testing.assert_close(outs[1][row : row + n].float().cpu(), want, atol=2e-3, rtol=2e-3)
        row += n
    # The next step in the same objects (vLLM's persistent buffers, rewritten): built anew.
    seq_lens += torch.tensor([0, 1], dtype=torch.int32)
    step["seq_lens"].copy_(seq_lens)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    again = builder.build(**step, block_table=table)
    assert again.layout is not metas[0].layout and again._prepared is not metas[0]._prepared
    assert again.layout.cu_k.tolist() == [0, 15, 42]
    # A new step's objects with equal values: built anew too.
    fresh = dict(step, query_start_loc_cpu=cu_q.clone())
    assert builder.build(**fresh, block_table=table).layout is not again.layout


def test_builder_refuses_more_requests_than_it_holds():
    builder = builder_for(model_rule("gemma3", "official", "gemma3"), max_seqs=2)
    with pytest.raises(ValueError, match="3 requests exceeds the builder's 2"):
        build(builder, [(4, [], 0, 4)] * 3)


# ---------------------------------------------------------------------------------------------- vLLM's cache
def vllm_kv_cache(num_blocks: int, block_size: int, hkv: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """One layer's cache as vLLM 0.26 makes it (module doc): raw bytes viewed as the permuted
    shape, permuted back to the logical ``(num_blocks, Hkv, block_size, 2 * D)``."""
    shape = (num_blocks, hkv, block_size, 2 * d)
    order = (0, 2, 1, 3)
    inv = [order.index(i) for i in range(4)]
    raw = torch.zeros(num_blocks * hkv * block_size * 2 * d * torch.finfo(dtype).bits // 8, dtype=torch.int8,
                      device=DEVICE)
    return raw.view(dtype).view(tuple(shape[i] for i in order)).permute(*inv)


def test_kv_views_are_strided_views_of_the_buffer():
    cache = vllm_kv_cache(3, 16, 2, 32, torch.float16)
    k, v, bs = kv_views(cache, 32)
    assert bs == 16 and k.shape == v.shape == (48, 2, 32)
    assert k.stride() == v.stride() == (128, 64, 1)
    assert v.data_ptr() - k.data_ptr() == 32 * 2  # V is the second half of each token-head row
    k_vllm, v_vllm = cache.transpose(1, 2).split(32, dim=-1)  # vLLM's own views
    k[5, 1].fill_(1.5)
    v[37, 0].fill_(-2.0)
    assert (k_vllm[0, 5, 1] == 1.5).all() and (v_vllm[2, 5, 0] == -2.0).all()
    with pytest.raises(ValueError, match="dense NHD pages"):
        kv_views(cache.contiguous(), 32)  # HND memory order
    with pytest.raises(ValueError, match=r"2 \* 16"):
        kv_views(cache, 16)


def test_write_kv_follows_the_slot_mapping():
    cache = vllm_kv_cache(4, 16, 2, 16, torch.float16)
    key, value = torch.randn(3, 2, 16).half().to(DEVICE), torch.randn(3, 2, 16).half().to(DEVICE)
    write_kv(key, value, cache, torch.tensor([50, -1, 3], device=DEVICE))
    k, v = cache.transpose(1, 2).split(16, dim=-1)
    assert torch.equal(k[3, 2], key[0]) and torch.equal(v[3, 2], value[0])
    assert torch.equal(k[0, 3], key[2]) and torch.equal(v[0, 3], value[2])
    assert int((cache != 0).sum()) == 2 * 2 * 2 * 16


def slots(table_row: list[int], positions, block_size: int) -> list[int]:
    return [table_row[p // block_size] * block_size + p % block_size for p in positions]


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("family, convention, softcap", [("gemma3", "official", None), ("gemma4", "official", None),
                                                         ("gemma3", "vllm", 5.0)])
def test_attention_over_vllm_cache_equals_reference(block_size, family, convention, softcap):
    """A mixed prefill + decode batch, GQA, shuffled blocks, full and sliding layers (and a
    logit softcap, as Gemma-2's)."""
    rng = random.Random(block_size)
    model = model_rule(family, convention, family)
    hq, hkv, d = 4, 2, 32
    # (length, ranges, first row, keys): a first chunk, a chunk starting mid-request that ends
    # at an image end, a decode row.
    reqs = [(30, [(4, 11), (12, 14)], 0, 15), (40, [(3, 5), (20, 31)], 9, 32), (25, [(1, 9)], 25, 26)]
    per_req = -(-max(k for *_, k in reqs) // block_size)
    pool = list(range(len(reqs) * per_req + 3))
    rng.shuffle(pool)
    table = torch.zeros(8, per_req + 1, dtype=torch.int32)
    for b in range(len(reqs)):
        table[b, :per_req] = torch.tensor([pool.pop() for _ in range(per_req)], dtype=torch.int32)
    table = table.to(DEVICE)
    cache = vllm_kv_cache(len(reqs) * per_req + 3, block_size, hkv, d, torch.float16)
    g = torch.Generator().manual_seed(block_size)
    ks = [torch.randn(k, hkv, d, generator=g).half() for *_, k in reqs]
    vs = [torch.randn(k, hkv, d, generator=g).half() for *_, k in reqs]
    q = torch.randn(sum(k - f for *_, f, k in reqs), hq, d, generator=g).half()
    # Keys of earlier steps are in the cache; this step's keys go in through the slot mapping.
    for b, (*_, first, keys) in enumerate(reqs):
        write_kv(ks[b][:first].to(DEVICE), vs[b][:first].to(DEVICE), cache,
                 torch.tensor(slots(table[b].tolist(), range(first), block_size), device=DEVICE))
    new_k = torch.cat([ks[b][f:k] for b, (*_, f, k) in enumerate(reqs)]).to(DEVICE)
    new_v = torch.cat([vs[b][f:k] for b, (*_, f, k) in enumerate(reqs)]).to(DEVICE)
    mapping = [s for b, (*_, f, k) in enumerate(reqs) for s in slots(table[b].tolist(), range(f, k), block_size)]
    write_kv(new_k, new_v, cache, torch.tensor(mapping + [-1, -1], device=DEVICE)[: len(mapping)])
    builder = builder_for(model)
    meta = build(builder, reqs, pad_requests=1, block_table=table)
    scale = d**-0.5
    for kind in builder.kinds:
        out = torch.full((q.shape[0] + 2, hq, d), float("nan"), dtype=torch.float16, device=DEVICE)
        got = attend(q.to(DEVICE), cache, meta, kind, scale=scale, softcap=softcap, out=out[: q.shape[0]])
        assert got.data_ptr() == out.data_ptr()  # written into the caller's buffer
        lo, hi = expected_spans(model, kind.layer, reqs, kind.window if kind.window else WINDOW)
        row = 0
        for b, (length, ranges, first, keys) in enumerate(reqs):
            n = keys - first
            spans = SpanMask(lo[row : row + n], hi[row : row + n], cu_seqlens_k=torch.tensor([0, keys]),
                             total_keys=keys)
            want = reference.attention(q[row : row + n].float(), ks[b].float(), vs[b].float(), spans, scale=scale,
                                       softcap=softcap)
            torch.testing.assert_close(out[row : row + n].float().cpu(), want, atol=2e-3, rtol=2e-3)
            row += n
        assert torch.isnan(out[q.shape[0] :]).all()  # rows past the step untouched


def test_attention_refuses_a_cache_of_another_dtype():
    model = model_rule("gemma3", "official", "gemma3")
    builder = builder_for(model)
    meta = build(builder, [(4, [], 0, 4)])
    cache = vllm_kv_cache(2, 16, 1, 16, torch.float16)
    q = torch.zeros(4, 2, 16, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(TypeError, match="queries are torch.bfloat16, the KV cache torch.float16"):
        attend(q, cache, meta, builder.kinds[0], scale=0.25, softcap=None, out=torch.empty_like(q))


# ---------------------------------------------------------------------------------------------- hd512 prefill
def prefill_step_hd512(dtype=torch.bfloat16, block_size=16, decode=False):
    """A Gemma-4 step at head dim 512 over a vLLM cache: request 0 continues a prompt (40 cached
    keys, 300 new rows, an image across the chunk's start), request 1 starts one (260 rows, an
    image straddling a 64-row tile); with ``decode``, a third request decodes one row.
    Returns (model, builder, metadata, q, cache, reqs, ks, vs)."""
    model = model_rule("gemma4", "official", "gemma4")
    hq, hkv, d = 4, 2, 512
    reqs = [(400, [(30, 69), (200, 215)], 40, 340), (300, [(60, 140)], 0, 260)]
    if decode:
        reqs.append((50, [(3, 9)], 49, 50))
    per_req = -(-max(k for *_, k in reqs) // block_size)
    table = torch.arange(len(reqs) * per_req, dtype=torch.int32).flip(0).view(len(reqs), per_req)
    table = torch.cat([table, torch.zeros(8 - len(reqs), per_req, dtype=torch.int32)]).to(DEVICE)
    cache = vllm_kv_cache(len(reqs) * per_req, block_size, hkv, d, dtype)
    g = torch.Generator().manual_seed(7)
    ks = [torch.randn(k, hkv, d, generator=g).to(dtype) for *_, k in reqs]
    vs = [torch.randn(k, hkv, d, generator=g).to(dtype) for *_, k in reqs]
    q = torch.randn(sum(k - f for *_, f, k in reqs), hq, d, generator=g).to(dtype)
    for b, (*_, keys) in enumerate(reqs):
        write_kv(ks[b].to(DEVICE), vs[b].to(DEVICE), cache,
                 torch.tensor(slots(table[b].tolist(), range(keys), block_size), device=DEVICE))
    builder = builder_for(model, max_tokens=1024, max_model_len=512, kinds=(model.kind(None), model.kind(128)))
    return model, builder, build(builder, reqs, block_table=table), q, cache, reqs, ks, vs


def check_step_outputs(model, kind, q, out, reqs, ks, vs, scale, gpu):
    lo, hi = expected_spans(model, kind.layer, reqs, kind.window)
    row = 0
    for b, (_, _, first, keys) in enumerate(reqs):
        n = keys - first
        spans = SpanMask(lo[row : row + n], hi[row : row + n], cu_seqlens_k=torch.tensor([0, keys]), total_keys=keys)
        qb, kb, vb = q[row : row + n], ks[b], vs[b]
        want = reference.attention(qb.float(), kb.float(), vb.float(), spans, scale=scale)
        got = out[row : row + n].float().cpu()
        if gpu:  # 2x PyTorch's own low-precision error
            torch_err = (lowp_attention(qb.cuda(), kb.cuda(), vb.cuda(), spans.to("cuda"), scale, None).float().cpu()
                         - want).abs().max().item()
            assert (got - want).abs().max().item() <= 2 * torch_err + 1e-3
        else:
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        row += n


def test_hd512_prefill_steps_gather_the_keys_and_run_gluon(monkeypatch):
    """The Gluon path's host side on CPU: which steps take it, the copy's size, and attention
    over the gathered keys (a fake Gluon forward that checks its inputs and runs the reference)."""
    import bidiattn.kernels.sm90_wide as sm90
    from bidiattn import launch
    from bidiattn.integrations.vllm import step as step_mod

    calls = []

    def fake_forward(q, k, v, spans, scale, *, config=None, tiles=None, out=None):
        assert k.shape[0] == v.shape[0] == spans.total_keys and tiles[0].block_m == config.block_m
        calls.append(spans.total_keys)
        got = reference.attention(q.float(), k.float(), v.float(), spans, scale=scale).to(q.dtype)
        return (out.copy_(got) if out is not None else got), None

    monkeypatch.setattr(launch, "gluon_unsupported", lambda *args: None)
    monkeypatch.setattr(sm90, "forward_sm90_hd512", fake_forward)
    model, builder, meta, q, cache, reqs, ks, vs = prefill_step_hd512()
    assert meta.layout.min_rows == 260 and meta.layout.host_keys == 340 + 260
    for kind in builder.kinds:
        out = torch.full((q.shape[0] + 2, 4, 512), float("nan"), dtype=q.dtype, device=DEVICE)
        attend(q.to(DEVICE), cache, meta, kind, scale=0.05, softcap=None, out=out[: q.shape[0]])
        assert meta.plan(kind, 4, 2, 512, q.dtype).backend == "gluon"
        check_step_outputs(model, kind, q, out, reqs, ks, vs, 0.05, gpu=False)
        assert torch.isnan(out[q.shape[0] :]).all()
    assert calls == [600, 600]
    # Softcap, another head dim, a decode row in the step, unknown key lengths, more keys than
    # GATHER_KEYS_PER_ROW rows' worth: the paged Triton kernel.
    kind = builder.kinds[0]
    assert meta.plan(kind, 4, 2, 512, q.dtype, softcap=True).backend == "triton"
    assert meta.plan(kind, 4, 2, 256, q.dtype).backend == "triton"
    _, _, mixed, *_ = prefill_step_hd512(decode=True)
    assert mixed.layout.min_rows == 1 and mixed.plan(kind, 4, 2, 512, q.dtype).backend == "triton"
    monkeypatch.setattr(step_mod, "GATHER_KEYS_PER_ROW", 0)
    assert not meta.gathers(512, q.dtype, False, torch.device(DEVICE))
    monkeypatch.setattr(step_mod, "GATHER_KEYS_PER_ROW", 4)
    unknown = step_mod.StepMetadata(dataclasses.replace(meta.layout, host_keys=None), meta.model, meta.block_table,
                                    meta.slot_mapping, meta.num_actual_tokens)
    assert not unknown.gathers(512, q.dtype, False, torch.device(DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 64])
def test_hd512_prefill_steps_through_gluon_on_sm90(block_size):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 GPU")
    from bidiattn.kernels.sm90_wide import gluon_unavailable

    if gluon_unavailable() is not None:
        pytest.skip(f"Gluon kernel unavailable: {gluon_unavailable()}")
    model, builder, meta, q, cache, reqs, ks, vs = prefill_step_hd512(block_size=block_size)
    for kind in builder.kinds:
        out = torch.full((q.shape[0], 4, 512), float("nan"), dtype=q.dtype, device="cuda")
        attend(q.cuda(), cache, meta, kind, scale=512**-0.5, softcap=None, out=out)
        assert meta.plan(kind, 4, 2, 512, q.dtype).backend == "gluon"
        check_step_outputs(model, kind, q, out, reqs, ks, vs, 512**-0.5, gpu=True)
