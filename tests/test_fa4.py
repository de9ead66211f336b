"""backend="fa4" (FlashAttention-4 launches over row segments) against the fp32 reference.

CPU: the fa4 backend's own logic — segment launches, the plan's per-launch options, the
backward's copies of each segment's keys and the sums of dK/dV — runs against ``fake_fa4``
(FlashAttention's varlen semantics written in PyTorch), forward and gradients, on every rule.
GPU tests need FA4 (``pip install 'bidiattn[fa4]'``, or ``bash .fa4a/install.sh`` then
``source .fa4b/env.sh`` on the GPU machine); where it does not import they skip with that
reason. Tolerance on the GPU as for the triton backend: error <= 2x PyTorch's own low-precision
error against fp32 (+ small atol).
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from unittest import mock

import pytest
import torch

import bidiattn
import bidiattn.kernels.fa4
from bidiattn import launch, reference, rules
from bidiattn.launch import plan_segments
from bidiattn.spans import SpanMask
from conftest import cpu_interpreter_only, gpu_size_spans, image_spans, lowp_attention, random_packed_layout, tail_rows
from fake_fa4 import FakeFA4

RULES = [(f, c, layer) for f in rules.FAMILIES for c in rules.CONVENTIONS for layer in rules.LAYERS]


def fa4_available() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        return False
    return True


requires_fa4 = pytest.mark.skipif(not fa4_available(), reason="FlashAttention-4 (flash_attn.cute) is not installed")


# ----------------------------------------------------------------------------- CPU, fake FA4
@pytest.fixture
def fake_fa4(monkeypatch):
    """FA4 replaced by :class:`FakeFA4`, and taken for CPU fp32 inputs."""
    import collections

    import bidiattn.kernels.fa4_masked as masked

    fake = FakeFA4()
    monkeypatch.setattr(masked, "fa4_interface", lambda: fake)  # the segment launches call it too
    for module in (sys.modules["bidiattn.attention"], launch):
        monkeypatch.setattr(module, "fa4_unsupported", lambda *args: None)
    # the mask_mod path (fa4 plans where launch.masked_layers picks it): FA4's block-sparsity tuple as a
    # namedtuple of its fields, the CuTe mask function as a placeholder (the fake applies the
    # span bounds from the aux tensors)
    fields = collections.namedtuple("BlockSparseTensorsTorch", "mask_block_cnt mask_block_idx full_block_cnt "
                                    "full_block_idx block_size")
    monkeypatch.setattr(masked, "_sparse", lambda *args: fields(*args))
    monkeypatch.setattr(masked, "span_mask_mod", lambda: "span mask")
    return fake


def grads_of(fn, q, k, v, dout, dlse=None):
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*x)
    loss = (out.double() * dout).sum() + (0 if dlse is None else (lse.double() * dlse).sum())
    return (out, lse, *torch.autograd.grad(loss, x))


def segment_plan(spans, hq, hkv, d, training=False):
    """An fa4 plan over the segment launches, whatever ``launch.masked_layers`` picks."""
    with mock.patch.object(launch, "masked_layers", lambda *args: "none"):
        return launch.plan(spans, hq, hkv, d, backend="fa4", training=training)


def fa4_backward_plan(spans, hq, hkv, d):
    """A segment plan whose backward is FA4's whatever the plan chose (as where no key is shared)."""
    plan = segment_plan(spans, hq, hkv, d, training=True)
    return dataclasses.replace(plan, segments=dataclasses.replace(plan.segments, fa4_backward=True))


def check_against_reference(spans, hq, hkv, d, seed, softcap=None, with_lse=True, plan=None):
    g = torch.Generator().manual_seed(seed)
    t, tk = spans.total_tokens, spans.total_keys
    q = torch.randn(t, hq, d, generator=g)
    k, v = (torch.randn(tk, hkv, d, generator=g) for _ in range(2))
    dout = torch.randn(t, hq, d, generator=g, dtype=torch.float64)
    dlse = torch.randn(hq, t, generator=g, dtype=torch.float64) if with_lse else None
    plan = fa4_backward_plan(spans, hq, hkv, d) if plan is None else plan
    got = grads_of(lambda a, b, c: bidiattn.attention(a, b, c, spans, softcap=softcap, return_lse=True, plan=plan),
                   q, k, v, dout, dlse)
    want = grads_of(lambda a, b, c: reference.attention(a, b, c, spans, softcap=softcap, return_lse=True),
                    q, k, v, dout, dlse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("family,convention,layer", RULES)
def test_fake_fa4_forward_and_gradients_on_every_rule(fake_fa4, family, convention, layer):
    rng = random.Random(repr((family, convention, layer, "fake")))
    ids, cu = random_packed_layout(rng, max_seqs=3, max_len=60, block_frac=0.4)
    spans = rules.build(family, convention, layer, block_ids=ids, window=7, cu_seqlens=cu)
    check_against_reference(spans, 4, 2, 16, seed=1)
    check_against_reference(spans, 4, 2, 16, seed=1, plan=launch.plan(spans, 4, 2, 16, backend="fa4", training=True))
    check_against_reference(tail_rows(spans, [rng.randint(1, 30) for _ in range(spans.num_sequences)]), 4, 2, 16,
                            seed=2, with_lse=False)
    assert {c[0] for c in fake_fa4.calls} == {"fwd", "bwd"}


def test_fake_fa4_backward_in_one_chunk_per_segment_and_with_softcap(fake_fa4, monkeypatch):
    # A budget of no keys puts every segment in a chunk of its own: the same gradients.
    spans = image_spans(90, [(10, 40), (50, 70)], "gemma3", "official", "sliding", window=12)
    check_against_reference(spans, 2, 1, 16, seed=3, softcap=5.0)
    monkeypatch.setattr(launch, "_GRAD_KEYS", 0)
    plan = segment_plan(spans, 2, 1, 16, training=True)
    assert all(len(c.grad_chunks) == c.num_segments for c in plan.segments.calls) and plan.segments.num_segments > 3
    fake_fa4.calls.clear()
    spans_again = SpanMask(spans.lo, spans.hi)  # a new object plans anew, with the new budget
    check_against_reference(spans_again, 2, 1, 16, seed=3, softcap=5.0)
    assert sum(1 for c in fake_fa4.calls if c[0] == "bwd") == plan.segments.num_segments


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("layer", ["full", "sliding"])
@pytest.mark.parametrize("training", [False, True])
def test_fa4_plans_run_the_masked_launch_where_masked_layers_picks_it(fake_fa4, monkeypatch, d, layer, training):
    # The choice table of launch.masked_layers (PERF A16-A26): on SM90 every plan over
    # contiguous keys is the masked launch, forward and training, and never builds segments
    # (that is the host sync); paged keys and SM100 (measured nowhere) take the segments.
    spans = image_spans(300, [(10, 140), (200, 290)], "gemma3", "official", layer,
                        window=64 if layer == "sliding" else None)
    paged = launch.plan(spans, 4, 2, d, backend="fa4", training=training, paged=True)
    assert paged.masked is None and paged.segments.paged  # paged keys: segments
    real_plan_segments = launch.plan_segments
    monkeypatch.setattr(launch, "plan_segments", lambda *a, **k: pytest.fail("planned segments"))
    plan = launch.plan(spans, 4, 2, d, backend="fa4", training=training)
    assert plan.masked is not None and plan.segments is None and plan.backward is None
    assert (plan.masked.q_num is not None) == training
    monkeypatch.setattr(launch, "plan_segments", real_plan_segments)
    monkeypatch.setattr(sys.modules["bidiattn.kernels.fa4_masked"], "device_capability", lambda device: (10, 0))
    sm100 = launch.plan(spans, 4, 2, d, backend="fa4", training=training)
    assert sm100.masked is None and sm100.segments is not None


@cpu_interpreter_only
@pytest.mark.parametrize("layer", ["full", "sliding"])
def test_layers_up_to_hd128_train_through_one_masked_fa4_launch(fake_fa4, layer):
    # A training plan at head dim <= 128 (contiguous self-attention keys): the mask_mod path's
    # tables, one FA4 forward and one FA4 backward per call, exact; a forward plan's masked
    # launch in a call that trains builds the backward's tables itself.
    images = image_spans(300, [(10, 140), (200, 290)], "gemma3", "official", layer,
                         window=64 if layer == "sliding" else None)
    plan = launch.plan(images, 4, 2, 64, backend="fa4", training=True)
    assert plan.masked is not None and plan.backward is None and plan.masked.q_num is not None
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(300, h, 64, generator=g).half() for h in (4, 2, 2))
    dout = torch.randn(300, 4, 64, generator=g).double()
    dlse = torch.randn(4, 300, generator=g).double()
    want = grads_of(lambda a, b, c: reference.attention(a.float(), b.float(), c.float(), images, return_lse=True),
                    q, k, v, dout, dlse)
    forward_plan = launch.plan(images, 4, 2, 64, backend="fa4")
    assert forward_plan.masked.q_num is None
    for p in (plan, forward_plan):
        fake_fa4.calls.clear()
        got = grads_of(lambda a, b, c: bidiattn.attention(a, b, c, images, plan=p, return_lse=True), q, k, v, dout,
                       dlse)
        assert [c[0] for c in fake_fa4.calls] == ["fwd", "bwd"]
        for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a.float(), w.float(), atol=2e-2, rtol=2e-2, msg=name)
    # the default call (no plan) with gradients plans for training: the same single launch pair
    fake_fa4.calls.clear()
    grads_of(lambda a, b, c: bidiattn.attention(a, b, c, images, return_lse=True, backend="fa4"), q, k, v, dout, dlse)
    assert [c[0] for c in fake_fa4.calls] == ["fwd", "bwd"]


@cpu_interpreter_only
def test_the_plan_takes_fa4s_backward_where_no_key_is_read_twice(fake_fa4, monkeypatch):
    # Segment plans (SM100; SM90 plans over contiguous keys take the masked launch): text-only
    # packed sequences, one causal segment each, disjoint keys: FA4's backward, whose copies then
    # move each key once. Image layouts share prefixes: the Triton backward (run here through
    # Triton's interpreter), with its tables planned for training.
    monkeypatch.setattr(launch, "masked_layers", lambda *args: "none")
    text = bidiattn.rules.build("gemma3", "official", "full", block_ids=torch.zeros(90, dtype=torch.int64),
                                cu_seqlens=torch.tensor([0, 30, 35, 90]))
    images = image_spans(90, [(10, 40), (50, 70)], "gemma3", "official", "full")
    sliding = image_spans(90, [(10, 40)], "gemma3", "official", "sliding", window=12)
    for spans, fa4_backward in ((text, True), (images, False), (sliding, False)):
        plan = launch.plan(spans, 4, 2, 160, backend="fa4", training=True)
        assert plan.segments.fa4_backward is fa4_backward and plan.masked is None
        assert (plan.backward is None) is fa4_backward
        fake_fa4.calls.clear()
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(90, h, 160, generator=g).half().requires_grad_() for h in (4, 2, 2))
        out = bidiattn.attention(q, k, v, spans, backend="fa4")
        out.float().square().sum().backward()
        assert any(c[0] == "bwd" for c in fake_fa4.calls) is fa4_backward
        want = torch.autograd.grad(reference.attention(q.float(), k.float(), v.float(), spans).square().sum(), (q, k, v))
        for got, w in zip((q.grad, k.grad, v.grad), want):
            torch.testing.assert_close(got.float(), w.float(), atol=2e-2, rtol=2e-2)


def test_fake_fa4_backward_chunks_keep_the_copies_within_the_budget():
    blocks = [(s, s + 1092) for s in range(500, 16384, 2048)]
    plan = plan_segments(image_spans(16384, blocks))
    for call in plan.calls:
        lengths = call.k_len.tolist()
        assert [c.first for c in call.grad_chunks] == sorted(c.first for c in call.grad_chunks)
        assert call.grad_chunks[0].first == 0 and call.grad_chunks[-1].end == call.num_segments
        for a, b in zip(call.grad_chunks, call.grad_chunks[1:]):
            assert a.end == b.first
        for c in call.grad_chunks:
            assert c.keys == sum(lengths[c.first : c.end])
            assert c.keys <= launch._GRAD_KEYS * 16384 or c.end == c.first + 1
            assert c.max_k_len == max(lengths[c.first : c.end]) and c.rows == sum(call.q_len.tolist()[c.first : c.end])
        assert len(call.grad_chunks) > 1  # the benchmark layout's prefixes add up past twice the keys


def test_fake_fa4_pack_gqa_per_launch_kind(fake_fa4, monkeypatch):
    # Sliding-window launches run with FA4's pack_gqa off, causal and full ones with its own choice.
    blocks = [(s, s + 300) for s in range(100, 2048, 700)]
    spans = image_spans(2048, blocks, "gemma3", "official", "sliding", window=256)
    q = torch.randn(2048, 4, 16)
    k = v = torch.randn(2048, 2, 16)
    monkeypatch.setattr(launch, "masked_layers", lambda *args: "none")  # the segment launches
    bidiattn.attention(q, k, v, spans, backend="fa4")
    plan = spans._plans[next(iter(spans._plans))]
    kinds = {c.kind: c.pack_gqa for c in plan.segments.calls}
    assert kinds["window"] is False and kinds.get("open", False) is False and kinds["causal"] is None
    assert [c[3] for c in fake_fa4.calls] == [c.pack_gqa for c in plan.segments.calls]


def test_fake_fa4_paged_forward(fake_fa4):
    from bidiattn.serving.kvcache import PagedKVCache, append, paged_attention

    spans = tail_rows(image_spans(150, [(30, 100)], "paligemma", "official", "sliding", window=20), [70])
    cache = PagedKVCache.allocate(12, 16, 2, 16, dtype=torch.float32, device="cpu")
    table = torch.tensor([[7, 2, 9, 0, 4, 11, 1, 3, 5, 6]], dtype=torch.int32)
    k, v = torch.randn(150, 2, 16), torch.randn(150, 2, 16)
    append(cache, k, v, table, spans.cu_seqlens_k, torch.zeros(1, dtype=torch.int64))
    q = torch.randn(70, 4, 16)
    out = paged_attention(q, cache, table, spans, backend="fa4")
    torch.testing.assert_close(out, reference.attention(q, k, v, spans), atol=1e-5, rtol=1e-5)
    assert spans._plans[next(iter(spans._plans))].segments.paged


def _masked(q, k, v, spans, softcap):
    from bidiattn.kernels.fa4_masked import span_attention_fa4_masked

    return span_attention_fa4_masked(q, k, v, spans, 1 / math.sqrt(q.shape[-1]), softcap)


@pytest.mark.parametrize("family,convention,layer", RULES)
def test_fake_fa4_mask_mod_path_forward_and_gradients_on_every_rule(fake_fa4, family, convention, layer):
    # Packed odd lengths, blocks straddling the 128-row tiles, GQA: the block tables (forward:
    # key blocks per query block; backward: query blocks per key block) and the span bounds the
    # mask function reads must give exactly the reference's mask, lse and its gradient included.
    rng = random.Random(repr((family, convention, layer, "mask_mod")))
    ids, cu = random_packed_layout(rng, max_seqs=3, max_len=200, block_frac=0.5)
    spans = rules.build(family, convention, layer, block_ids=ids, window=37, cu_seqlens=cu)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    t = spans.total_tokens
    q = torch.randn(t, 4, 16, generator=g)
    k, v = (torch.randn(t, 2, 16, generator=g) for _ in range(2))
    dout = torch.randn(t, 4, 16, generator=g, dtype=torch.float64)
    dlse = torch.randn(4, t, generator=g, dtype=torch.float64)
    softcap = 20.0 if layer == "sliding" else None
    got = grads_of(lambda a, b, c: _masked(a, b, c, spans, softcap), q, k, v, dout, dlse)
    want = grads_of(lambda a, b, c: reference.attention(a, b, c, spans, softcap=softcap, return_lse=True),
                    q, k, v, dout, dlse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=name)
    assert [c[0] for c in fake_fa4.calls] == ["fwd", "bwd"]


@pytest.mark.parametrize("d", [192, 256])
def test_fake_fa4_mask_mod_path_above_hd128_has_backward_tables_of_their_own(fake_fa4, d):
    # Above head dim 128 the forward's and the backward's key blocks are set apart on SM90 (112/96
    # at 192; 80/64 at 256): each table has its own (the fake checks each against FA4's tiles) and
    # both give the reference's mask.
    from bidiattn.kernels.fa4_masked import mask_blocks, mask_tables

    spans = image_spans(301, [(3, 90), (150, 233)], "gemma3", "official", "full")
    assert spans.window is None
    tables = mask_tables(spans, d)
    assert (tables.block, tables.backward_block) == mask_blocks(d) == {192: ((128, 112), (128, 96)),
                                                                        256: ((128, 80), (128, 64))}[d]
    g = torch.Generator().manual_seed(d)
    q = torch.randn(301, 2, d, generator=g)
    k, v = (torch.randn(301, 1, d, generator=g) for _ in range(2))
    dout = torch.randn(301, 2, d, generator=g, dtype=torch.float64)
    dlse = torch.randn(2, 301, generator=g, dtype=torch.float64)
    got = grads_of(lambda a, b, c: _masked(a, b, c, spans, None), q, k, v, dout, dlse)
    want = grads_of(lambda a, b, c: reference.attention(a, b, c, spans, return_lse=True), q, k, v, dout, dlse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=name)
    assert [c[0] for c in fake_fa4.calls] == ["fwd", "bwd"]


def test_masked_tables_take_the_window_tile_on_windowed_spans_at_hd256(fake_fa4):
    # rules.build records the window its rule cut with (SpanMask.window); at head dim 256 the
    # masked launch's forward key tile follows it: FA4's window tile (64) on sliding spans, its
    # causal tile (80) on full ones; a plan's explicit window counts as the hint; the mask (and
    # so the result) is the spans' alone.
    from bidiattn.kernels.fa4_masked import mask_blocks

    ids = torch.zeros(301, dtype=torch.int64)
    ids[150:233] = 1
    sliding = rules.build("gemma3", "official", "sliding", block_ids=ids, window=64)
    full = rules.build("gemma3", "official", "full", block_ids=ids)
    assert (sliding.window, full.window) == (64, None)
    assert rules.build("gemma3", "official", "full", block_ids=ids, window=64).window is None  # not cut by it
    assert sliding.to("cpu").window == 64
    assert mask_blocks(256, window=64)[0] == (128, 64) and mask_blocks(128, window=64)[0] == (128, 128)
    for spans, window, block in ((sliding, None, 64), (full, None, 80), (full, 512, 64)):
        p = bidiattn.plan(spans, 2, 1, 256, backend="fa4", window=window)
        assert p.masked is not None and p.masked.block == (128, block)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(301, 2, 256, generator=g)
    k, v = (torch.randn(301, 1, 256, generator=g) for _ in range(2))
    got = bidiattn.attention(q, k, v, sliding, backend="fa4")
    torch.testing.assert_close(got, reference.attention(q, k, v, sliding), atol=1e-5, rtol=1e-5)


def test_block_tables_kernel_equals_its_spec_on_spans_with_empty_rows():
    # Spans with empty rows (lo > hi; hi far below zero before the first non-empty row): the keys
    # before each row's window of 128, and those after it (image rows), of a paligemma sliding
    # layer. The one-launch tables kernel (truncating division) equals its spec (flooring)
    # there, and no count is negative.
    from bidiattn.kernels.block_tables import block_tables
    from bidiattn.kernels.fa4_masked import SM90_BLOCKS, block_tables_spec

    ids = torch.zeros(1500, dtype=torch.int64)
    for n, (s, e) in enumerate([(5, 40), (300, 700), (900, 905), (1300, 1499)], 1):
        ids[s:e] = n
    spans = rules.build("paligemma", "official", "sliding", block_ids=ids, window=128)
    pos, lo, hi = torch.arange(1500), spans.lo.long(), spans.hi.long()
    first = (pos - 127).clamp(min=0)

    def last_upper(has, upper):  # non-decreasing, below the row's lower bound where it has none
        return torch.where(has, upper, -(1 << 30)).cummax(0).values

    parts = [(lo, last_upper(lo < first, pos - 128)), (pos + 1, last_upper(hi > pos, hi))]
    assert all(bool((h < l).any()) and bool((h >= l).any()) for l, h in parts)
    for part_lo, part_hi in parts:
        part_spans = SpanMask(part_lo, part_hi, validate=False)
        for forward, backward in {(f, b) for _, full, windowed, b in SM90_BLOCKS for f in (full, windowed)}:
            want, got = block_tables_spec(part_spans, forward, backward), block_tables(part_spans, forward, backward)
            for a, b in zip(want, got):
                assert torch.equal(a, b)
            assert all(int(x.min()) >= 0 for x in (want[2], want[4], want[6], want[8]))


def test_mask_mod_path_refuses_what_it_cannot_run(fake_fa4):
    from bidiattn.kernels.fa4_masked import mask_tables

    spans = image_spans(40, [(5, 20)])
    q = torch.randn(40, 2, 320)
    with pytest.raises(ValueError, match="head dims up to 256 on compute capability 9.0, got 320"):
        _masked(q, q[:, :1], q[:, :1], spans, None)
    with pytest.raises(ValueError, match="head dims up to 128 on compute capability 10.0, got 256"):
        mask_tables(spans, 256, capability=(10, 0))
    extend = tail_rows(spans, [10])
    with pytest.raises(ValueError, match="self-attention spans only"):
        _masked(torch.randn(10, 2, 16), torch.randn(40, 1, 16), torch.randn(40, 1, 16), extend, None)
    with pytest.raises(ValueError, match="self-attention spans only"):
        mask_tables(extend, 16)
    x = torch.randn(40, 2, 16, requires_grad=True)
    with torch.no_grad():
        out, _ = _masked(x, x[:, :1], x[:, :1], spans, None)  # forward-only tables
    assert not out.requires_grad


def test_mask_mod_forward_without_gradients_equals_the_autograd_path(fake_fa4):
    # A call that needs no gradient launches FA4 without an autograd node: the same outputs.
    spans = image_spans(300, [(5, 140), (200, 230)])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(300, h, 16, generator=g) for h in (4, 2, 2))
    with torch.no_grad():
        plain = _masked(q, k, v, spans, 5.0)
    tracked = _masked(*(t.clone().requires_grad_() for t in (q, k, v)), spans, 5.0)
    assert plain[0].grad_fn is None and tracked[0].grad_fn is not None
    for a, b in zip(plain, tracked):
        assert torch.equal(a, b.detach())


# ----------------------------------------------------------------------------- errors
def test_without_fa4_or_cuda_it_says_why():
    q = torch.randn(5, 2, 64, dtype=torch.bfloat16)
    spans = image_spans(5, [(1, 3)])
    with pytest.raises(ValueError, match="backend='fa4' needs"):
        bidiattn.attention(q, q[:, :1], q[:, :1], spans, backend="fa4")


@cpu_interpreter_only
def test_paged_attention_backend_and_plan_errors(monkeypatch):
    from bidiattn.serving.kvcache import PagedKVCache, paged_attention

    cache = PagedKVCache.allocate(2, 4, 1, 16, dtype=torch.float16, device="cpu")
    spans = SpanMask(torch.tensor([0]), torch.tensor([3]), cu_seqlens_k=torch.tensor([0, 4]), total_keys=4)
    q = torch.randn(1, 1, 16).half()
    table = torch.tensor([[0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton', 'fa4' or 'gluon', got 'flex'"):
        paged_attention(q, cache, table, spans, backend="flex")
    with pytest.raises(TypeError, match=r"plan must be a bidiattn.Plan from bidiattn.plan\(\), got dict"):
        paged_attention(q, cache, table, spans, plan={})
    contiguous = launch.plan(spans, 1, 1, 16, backend="fa4")
    with pytest.raises(ValueError, match=r"this fa4 plan was made with paged=False; serving.kvcache.paged_attention "
                                         r"needs bidiattn.plan\(..., paged=True\)"):
        paged_attention(q, cache, table, spans, plan=contiguous)
    with pytest.raises(ValueError, match="paged_attention runs 'triton', 'fa4' or 'gluon'; this plan runs backend='reference'"):
        paged_attention(q, cache, table, spans, plan=launch.plan(spans, 1, 1, 16, backend="reference"))
    with pytest.raises(ValueError, match="made for another SpanMask object"):
        paged_attention(q, cache, table, spans, plan=launch.plan(SpanMask(spans.lo, spans.hi, cu_seqlens_k=spans.cu_seqlens_k,
                                                                          total_keys=4), 1, 1, 16, paged=True))
    if not fa4_available():
        with pytest.raises(ValueError, match="needs FlashAttention-4"):
            paged_attention(q, cache, table, spans, backend="fa4")


# ----------------------------------------------------------------------------- GPU, real FA4
def check_forward(spans, hq, hkv, d, dtype, softcap=None, seed=0, backend="fa4", attend=None):
    """``attend(q, k, v, spans, softcap) -> (out, lse)`` replaces ``bidiattn.attention`` when given."""
    g = torch.Generator().manual_seed(seed)
    t, tk = spans.total_tokens, spans.total_keys
    q = torch.randn(t, hq, d, generator=g).to(dtype).cuda()
    k, v = (torch.randn(tk, hkv, d, generator=g).to(dtype).cuda() for _ in range(2))
    spans = spans.to("cuda")
    scale = 1 / math.sqrt(d)
    if attend is not None:
        out, lse = attend(q, k, v, spans, softcap)
    else:
        out, lse = bidiattn.attention(q, k, v, spans, softcap=softcap, return_lse=True, backend=backend)
    ref32, ref_lse = reference.attention(q.float(), k.float(), v.float(), spans, softcap=softcap, return_lse=True)
    torch_err = (lowp_attention(q, k, v, spans, scale, softcap).float() - ref32).abs().max().item()
    err = (out.float() - ref32).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


def check_gradients(spans, hq, hkv, d, seed, softcap=None, with_lse=False, backend="fa4", plan=None, attend=None):
    g = torch.Generator().manual_seed(seed)
    t = spans.total_tokens
    q, k, v = (torch.randn(t, h, d, generator=g).to(torch.bfloat16).cuda() for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, generator=g).cuda()
    dlse = torch.randn(hq, t, generator=g).cuda() if with_lse else None

    def grads(fn):
        x = [a.detach().clone().requires_grad_() for a in (q, k, v)]
        out, lse = fn(*x)
        loss = (out.float() * dout).sum() + (0 if dlse is None else (lse * dlse).sum())
        return torch.autograd.grad(loss, x)

    if attend is not None:
        got = grads(lambda a, b, c: attend(a, b, c, spans, softcap))
    else:
        got = grads(lambda a, b, c: bidiattn.attention(a, b, c, spans, softcap=softcap, return_lse=True,
                                                       **(dict(plan=plan) if plan is not None else dict(backend=backend))))
    want = grads(lambda a, b, c: reference.attention(a.float(), b.float(), c.float(), spans, softcap=softcap,
                                                     return_lse=True))
    lowp = grads(lambda a, b, c: lowp_attention(a, b, c, spans, 1 / math.sqrt(d), softcap, return_lse=True))
    for name, a, w, lo in zip("qkv", got, want, lowp):
        err = (a.float() - w).abs().max().item()
        bound = 2 * (lo.float() - w).abs().max().item() + 1e-3 * w.abs().max().item() + 1e-5
        assert err <= bound, (name, err, bound)


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("length", [1, 7, 63, 130, 333])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_odd_lengths(length, dtype):
    blocks = [(length // 3, length // 3 + length // 2)] if length > 2 else []
    check_forward(image_spans(length, blocks), 4, 2, 128, dtype, seed=length)


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("family,convention,layer", RULES)
def test_every_rule_on_packed_sequences(family, convention, layer):
    rng = random.Random(repr((family, convention, layer, "fa4")))
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


def real_size_spans(d: int, layer: str) -> SpanMask:
    """The benchmark layouts (benchmarks/cases.py) at 8K tokens: hd128 1092-token images every
    2048, hd256 256-token images every 1024; sliding window 1024."""
    size, every = (1092, 2048) if d == 128 else (256, 1024)
    blocks = [(s, s + size) for s in range(every - size, 8192, every)]
    return image_spans(8192, blocks, layer=layer, window=1024 if layer == "sliding" else None).to("cuda")


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("d,hq,hkv,layer", [(128, 16, 8, "full"), (256, 8, 4, "full"), (256, 8, 4, "sliding")])
def test_default_call_runs_fa4_at_real_sizes(d, hq, hkv, layer):
    # Hopper/Blackwell with FA4: the default call is fa4, planned once per spans object, equal to
    # the explicit plan bitwise and to the reference within the low-precision bound.
    spans = real_size_spans(d, layer)
    assert bidiattn.plan(spans, hq, hkv, d).backend == "fa4"
    check_forward(spans, hq, hkv, d, torch.bfloat16, seed=d, backend="auto")
    q, k, v = (torch.randn(spans.total_tokens, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    default = bidiattn.attention(q, k, v, spans)
    assert len(spans._plans) == 1
    assert torch.equal(default, bidiattn.attention(q, k, v, spans, plan=bidiattn.plan(spans, hq, hkv, d)))
    assert torch.equal(default, bidiattn.attention(q, k, v, spans, backend="fa4"))


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("d,hq,hkv,layer", [(128, 16, 8, "full"), (128, 16, 8, "sliding"), (256, 8, 4, "full"),
                                             (256, 8, 4, "sliding")])
def test_fa4_backward_at_real_sizes(d, hq, hkv, layer):
    # The plan's backward (Triton's: the images share prefixes) and FA4's over copied segments.
    spans = real_size_spans(d, layer)
    check_gradients(spans, hq, hkv, d, seed=d, with_lse=layer == "full")
    check_gradients(spans, hq, hkv, d, seed=d, with_lse=layer == "full", plan=fa4_backward_plan(spans, hq, hkv, d))


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("d,hq,hkv", [(128, 16, 8), (256, 8, 4)])
def test_fa4_backward_on_text_only_packed_sequences(d, hq, hkv):
    # No key read twice: the plan takes FA4's backward itself.
    cu = torch.tensor([0, 3000, 3001, 5000, 8192])
    spans = rules.build("gemma3", "official", "full", block_ids=torch.zeros(8192, dtype=torch.int64),
                        cu_seqlens=cu).to("cuda")
    plan = segment_plan(spans, hq, hkv, d, training=True)
    assert plan.segments.fa4_backward
    check_gradients(spans, hq, hkv, d, seed=d, with_lse=True, plan=plan)


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("family,convention,layer", [("gemma4", "official", "sliding"), ("paligemma", "vllm", "sliding"),
                                                     ("gemma3", "transformers", "full")])
@pytest.mark.parametrize("d", [128, 256])
def test_fa4_backward_on_packed_sequences_with_softcap(family, convention, layer, d):
    # The default plan (SM90: the masked launch and FA4's backward with the softcap as a score
    # function, also at hd256: PaliGemma 2's layers) and FA4's backward over the segments.
    rng = random.Random(repr((family, layer, "bwd")))
    ids, cu = random_packed_layout(rng, max_seqs=4, max_len=400, block_frac=0.4)
    spans = rules.build(family, convention, layer, block_ids=ids, window=64, cu_seqlens=cu).to("cuda")
    check_gradients(spans, 8, 2, d, seed=5, softcap=20.0, with_lse=True)
    check_gradients(spans, 8, 2, d, seed=5, softcap=20.0, with_lse=True, plan=fa4_backward_plan(spans, 8, 2, d))


@pytest.mark.gpu
@requires_fa4
def test_a_captured_step_with_an_explicit_plan_replays_exactly():
    # With the plan built outside, a call issues no host sync: it captures in a CUDA graph.
    from bidiattn.serving.graphs import capture

    spans = gpu_size_spans().to("cuda")
    q, k, v = (torch.randn(spans.total_tokens, h, 128, device="cuda", dtype=torch.bfloat16) for h in (16, 8, 8))
    for backend in ("fa4", "triton"):
        plan = bidiattn.plan(spans, 16, 8, 128, backend=backend)
        graph, out = capture(lambda: bidiattn.attention(q, k, v, spans, plan=plan), forbid_sync=True)
        for _ in range(2):
            for x in (q, k, v):
                x.copy_(torch.randn_like(x))
            graph.replay()
            assert torch.equal(out, bidiattn.attention(q, k, v, spans, plan=plan)), backend


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("layer", ["full", "sliding"])
@pytest.mark.parametrize("d,hq,hkv", [(128, 16, 8), (256, 8, 4)])
def test_plans_over_contiguous_keys_issue_no_host_sync(layer, d, hq, hkv):
    # launch.masked_layers: on SM90 a plan, forward or training, is the masked launch's tables
    # alone (one Triton launch), so planning (hence a first default call) never waits for the GPU.
    spans = real_size_spans(d, layer)
    for training in (False, True):
        bidiattn.plan(SpanMask(spans.lo, spans.hi, validate=False), hq, hkv, d, backend="fa4",
                      training=training)  # Triton compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            plan = bidiattn.plan(spans, hq, hkv, d, backend="fa4", training=training)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert plan.masked is not None and plan.segments is None


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
    plan = bidiattn.plan(spans, 8, 2, 128, backend="fa4", paged=True)
    out = paged_attention(q, cache, table, spans, plan=plan)
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
    plan = bidiattn.plan(spans, 4, 2, 128, backend="fa4", paged=True)
    assert any(c.kind == "window" and c.max_q_len == 1 for c in plan.segments.calls)
    q, k, v, cache, table = paged_case(spans, 16, 4, 2, 128, seed=1)
    out = paged_attention(q, cache, table, spans, plan=plan)
    ref = reference.attention(q.float(), k.float(), v.float(), spans)
    torch_err = (lowp_attention(q, k, v, spans, 128**-0.5, None).float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2 * torch_err + 1e-3


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("length", [7, 130, 333])
def test_mask_mod_path_odd_lengths_and_every_rule(length):
    # One FA4 launch with the spans' mask function (kernels/fa4_masked.py): odd lengths (a last
    # block of fewer than 128 rows), then every rule on packed sequences, forward and lse.
    blocks = [(length // 3, length // 3 + length // 2)]
    check_forward(image_spans(length, blocks), 4, 2, 128, torch.bfloat16, seed=length, attend=_masked)
    if length == 333:
        for family, convention, layer in RULES:
            rng = random.Random(repr((family, convention, layer, "fa4 mask_mod")))
            ids, cu = random_packed_layout(rng, max_seqs=4, max_len=300, block_frac=0.4)
            spans = rules.build(family, convention, layer, block_ids=ids, window=37, cu_seqlens=cu)
            check_forward(spans, 8, 2, 128, torch.bfloat16, seed=5, attend=_masked)


@pytest.mark.gpu
@requires_fa4
@pytest.mark.parametrize("d,hq,hkv,layer,softcap", [(128, 16, 8, "full", None), (128, 16, 8, "sliding", None),
                                                    (64, 8, 1, "full", 30.0), (256, 8, 4, "full", None),
                                                    (256, 8, 4, "sliding", 30.0)])
def test_mask_mod_path_gradients_at_real_sizes(d, hq, hkv, layer, softcap):
    spans = real_size_spans(128, layer)
    check_gradients(spans, hq, hkv, d, seed=d, softcap=softcap, with_lse=layer == "full", attend=_masked)


@pytest.mark.parametrize("family,convention,layer", RULES)
def test_mask_tables_classify_blocks_as_flexattentions_block_mask(family, convention, layer):
    # The closed-form tables (two runs of blocks per row) against the BlockMask built from the
    # dense membership (argsort): the same partial and full blocks per query block (forward)
    # and per key block (backward), at the blocks of every head-dim tier, packed odd lengths.
    rng = random.Random(repr((family, convention, layer, "tables")))
    ids, cu = random_packed_layout(rng, max_seqs=4, max_len=700, block_frac=0.5)
    spans = rules.build(family, convention, layer, block_ids=ids, window=rng.choice([37, 130, 300]), cu_seqlens=cu)
    check_mask_tables(spans)


def test_mask_tables_on_random_monotone_bounds():
    # Bounds of no rule: every residue of lo and hi against the block sizes occurs.
    g = torch.Generator().manual_seed(11)
    for t in (1, 127, 129, 1000, 2311):
        pos = torch.arange(t)
        lo = torch.minimum((pos - torch.randint(0, 300, (t,), generator=g)).clamp(min=0).cummax(0).values, pos)
        hi = torch.maximum((pos + torch.randint(0, 300, (t,), generator=g)).clamp(max=t - 1), pos).cummax(0).values
        check_mask_tables(SpanMask(lo, hi))


def check_mask_tables(spans):
    from bidiattn.kernels.block_tables import block_tables
    from bidiattn.kernels.fa4_masked import block_tables_spec
    from bidiattn.kernels.fa4_masked import SM90_BLOCKS
    from bidiattn.kernels.flex import block_mask_from_spans

    def rows(num, idx):
        return [sorted(r[:n]) for n, r in zip(num[0, 0].tolist(), idx[0, 0].tolist())]

    glo, ghi = spans.packed_bounds()
    for forward, backward in {(f, b) for _, full, windowed, b in SM90_BLOCKS for f in (full, windowed)}:
        fwd = block_mask_from_spans(spans, forward, for_backward=False)
        bwd = block_mask_from_spans(spans, backward)
        want = (fwd.kv_num_blocks, fwd.kv_indices, fwd.full_kv_num_blocks, fwd.full_kv_indices,
                bwd.q_num_blocks, bwd.q_indices, bwd.full_q_num_blocks, bwd.full_q_indices)
        builders = [block_tables_spec] + ([block_tables] if launch.interpreting() or spans.lo.is_cuda else [])
        for build in builders:
            got = build(spans, forward, backward)
            assert got[0].tolist() == glo.tolist() and got[1].tolist() == ghi.tolist()
            assert got[0].dtype == got[1].dtype == torch.int32
            for i in range(0, 8, 2):
                assert got[2 + i].shape == want[i].shape and got[3 + i].shape == want[i + 1].shape, build
                assert rows(got[2 + i], got[3 + i]) == rows(want[i], want[i + 1]), (build, i)
                assert got[3 + i].dtype == torch.int32 and int(got[3 + i].min()) >= 0
                assert int(got[3 + i].max()) < got[3 + i].shape[-1]
            assert build(spans, forward, None)[6:] == (None,) * 4


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["full", "sliding"])
def test_mask_tables_kernel_on_the_gpu_at_real_sizes(layer):
    check_mask_tables(real_size_spans(128, layer))
