"""Triton backward (dq, dk, dv) and its operator registration against the fp32 reference.

Tolerance, per gradient: error <= 2x PyTorch's own low-precision error (autograd through the same
math in the input dtype) + 1e-3 relative to the gradient's scale. Uninitialized memory is filled
with NaN (torch's deterministic mode), so an unwritten gradient row fails.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import bidiattn  # noqa: E402
from bidiattn import rules  # noqa: E402
from bidiattn.kernels.backward import span_attention_backward  # noqa: E402
from bidiattn.launch import BackwardConfig  # noqa: E402
from bidiattn.kernels.tiles import key_tile_ranges_spec, key_tiles  # noqa: E402
from conftest import (DEVICE, assert_longest_first, check_grads, grads_of, image_spans,  # noqa: E402
                      random_packed_layout)



@pytest.fixture(autouse=True)
def nan_filled_empty():
    """torch.empty returns NaN-filled memory while deterministic algorithms are on."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("length", [1, 7, 63, 130])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_odd_lengths(length, dtype):
    blocks = [(length // 3, length // 3 + length // 2)] if length > 2 else []
    check_grads(image_spans(length, blocks), 2, 1, 64, dtype, seed=length)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 1)])
def test_gqa_and_blocks_straddling_tiles(hq, hkv):
    spans = image_spans(200, [(60, 70), (120, 190)], "gemma4", "official", "sliding", window=40)
    check_grads(spans, hq, hkv, 64, torch.bfloat16, seed=hq)


@pytest.mark.parametrize("family,convention", [(f, c) for f in rules.FAMILIES for c in rules.CONVENTIONS])
@pytest.mark.parametrize("layer", rules.LAYERS)
def test_every_rule_on_packed_sequences(family, convention, layer):
    ids, cu = random_packed_layout(random.Random(repr((family, convention, layer, "bwd"))), max_seqs=3, max_len=90)
    spans = rules.build(family, convention, layer, block_ids=ids, window=9, cu_seqlens=cu)
    check_grads(spans, 4, 2, 64, torch.bfloat16, seed=4)


@pytest.mark.parametrize("d", [96, 512])
def test_head_dims(d):
    spans = image_spans(77, [(10, 50)], "gemma4", "transformers", "sliding", window=16)
    check_grads(spans, 2, 1, d, torch.bfloat16, seed=d)


def test_softcap():
    spans = image_spans(70, [(5, 40)], "paligemma", "official", "sliding", window=8)
    check_grads(spans, 2, 2, 64, torch.float16, softcap=2.0, seed=1)


def test_gradient_through_lse():
    spans = image_spans(90, [(30, 75)], "gemma3", "official", "full")
    check_grads(spans, 4, 2, 64, torch.float16, softcap=4.0, seed=2, with_lse=True)


@pytest.mark.parametrize(
    "config", [BackwardConfig(16, 16, 4, 1), BackwardConfig(32, 16, 4, 1, dq=BackwardConfig(16, 32, 4, 1)),
               BackwardConfig(16, 32, 4, 1, separate_dk_dv=True), BackwardConfig(16, 16, 4, 1, mask_free_tiles=True),
               BackwardConfig(32, 16, 4, 1, dq=BackwardConfig(32, 16, 4, 1, mask_free_tiles=True)),
               BackwardConfig(16, 16, 4, 1, tma=True), BackwardConfig(32, 16, 4, 1, separate_dk_dv=True, tma=True),
               BackwardConfig(16, 32, 4, 1, tma=True, dq=BackwardConfig(32, 16, 4, 1, mask_free_tiles=True, tma=True))],
    ids=str,
)
def test_tile_configs(config):
    spans = image_spans(101, [(13, 80)], "gemma4", "official", "sliding", window=24)
    check_grads(spans, 4, 2, 256, torch.float16, seed=5, with_lse=True, config=config)


def test_key_tile_ranges_are_exactly_the_rows_that_see_each_tile():
    rng = random.Random(11)
    for _ in range(20):
        ids, cu = random_packed_layout(rng, max_seqs=4, max_len=60)
        spans = rules.build(rng.choice(["gemma3", "gemma4"]), "official", rng.choice(rules.LAYERS), block_ids=ids,
                            window=rng.randint(1, 15), cu_seqlens=cu)
        dense = spans.to_dense()
        block_n = rng.choice([16, 32])
        kt = key_tile_ranges_spec(spans, block_n)
        fused, order = key_tiles(spans.to(DEVICE), block_n)
        for name in ("seq", "key_start", "keys", "q_first", "q_last"):
            assert torch.equal(getattr(fused, name).cpu(), getattr(kt, name)), name
        lengths = (cu[1:] - cu[:-1]).tolist()
        assert_longest_first(order.cpu(), torch.where(kt.keys > 0, kt.q_last - kt.q_first + 1, 0), max(lengths))
        for i in range(kt.keys.numel()):
            if int(kt.keys[i]) == 0:
                continue
            bos = int(cu[int(kt.seq[i])])
            k0 = bos + int(kt.key_start[i])
            sees = dense[:, k0 : k0 + int(kt.keys[i])].any(1).nonzero().flatten()
            assert (int(sees[0]) - bos, int(sees[-1]) - bos) == (int(kt.q_first[i]), int(kt.q_last[i]))
            assert len(sees) == int(kt.q_last[i]) - int(kt.q_first[i]) + 1  # contiguous


def test_backward_is_bitwise_deterministic():
    ids, cu = random_packed_layout(random.Random(5), max_seqs=3, max_len=80)
    spans = rules.build("gemma3", "official", "full", block_ids=ids, cu_seqlens=cu).to(DEVICE)
    g = torch.Generator().manual_seed(9)
    t = spans.total_tokens
    q, k, v = (torch.randn(t, h, 64, generator=g).bfloat16().to(DEVICE) for h in (8, 2, 2))
    dout = torch.randn(t, 8, 64, generator=g).to(DEVICE)
    runs = [grads_of(lambda a, b, c: (bidiattn.attention(a, b, c, spans, backend="triton"), None), q, k, v, dout, None)
            for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


@pytest.mark.parametrize("planned", [False, True])
def test_operator_registration_passes_opcheck(planned):
    from bidiattn.ops import plan_arguments

    spans = image_spans(40, [(5, 25)], "gemma3").to(DEVICE)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, h, 32, generator=g).half().to(DEVICE).requires_grad_() for h in (4, 2, 2))
    args = (q, k, v, spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k, 0.2, None)
    args += plan_arguments(bidiattn.plan(spans, 4, 2, 32, backend="triton", training=True).triton) if planned else ([], None)
    torch.library.opcheck(torch.ops.bidiattn.span_attention.default, args)


@pytest.mark.parametrize("planned", [False, True])
def test_torch_compile_fullgraph_forward_and_backward(planned):
    spans = image_spans(50, [(10, 30)], "gemma4", "official", "sliding", window=12).to(DEVICE)
    plan = bidiattn.plan(spans, 4, 2, 32, window=12, backend="triton", training=True) if planned else None

    def layer(x, wq, wk, wv):
        q, k, v = ((x @ w).view(50, -1, 32) for w in (wq, wk, wv))
        return bidiattn.attention(q, k, v, spans, backend="triton", plan=plan).reshape(50, -1).float().square().sum()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 64, generator=g).half().to(DEVICE)
    ws = [(torch.randn(64, n, generator=g) / 8).half().to(DEVICE).requires_grad_() for n in (128, 64, 64)]
    # aot_eager traces the same graph (custom ops, fake tensors, autograd) with no C++ compiler;
    # the GPU test below uses inductor.
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    want = torch.autograd.grad(layer(x, *ws), ws)
    got = torch.autograd.grad(compiled(x, *ws), ws)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_a_launch_plan_changes_nothing_in_outputs_or_gradients():
    # Packed sequences, GQA, a sliding rule: the planned call runs the same launch as the
    # unplanned one, so outputs, lse and gradients are bitwise equal.
    ids, cu = random_packed_layout(random.Random(5), max_seqs=3, max_len=90)
    spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=9, cu_seqlens=cu).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    t = spans.total_tokens
    q, k, v = (torch.randn(t, h, 64, generator=g).to(torch.bfloat16).to(DEVICE) for h in (4, 2, 2))
    dout = torch.randn(t, 4, 64, generator=g).to(DEVICE)
    dlse = torch.randn(4, t, generator=g).to(DEVICE)
    plans = [None, bidiattn.plan(spans, 4, 2, 64, window=9, backend="triton", training=True),
             bidiattn.plan(spans, 4, 2, 64, window=9, backend="triton")]
    assert plans[1].triton.backward is not None and plans[2].triton.backward is None
    runs = [grads_of(lambda q, k, v: bidiattn.attention(q, k, v, spans, return_lse=True, backend="triton", plan=p),
                     q, k, v, dout, dlse) for p in plans]
    outs = [bidiattn.attention(q, k, v, spans, return_lse=True, backend="triton", plan=p) for p in plans]
    for got_grads, got_outs in zip(runs[1:], outs[1:]):
        for a, b in zip((*runs[0], *outs[0]), (*got_grads, *got_outs)):
            assert torch.equal(a, b)


def test_a_launch_plan_survives_the_operator_arguments():
    from bidiattn.launch import BackwardConfig, TileConfig, plan_backward, plan_forward
    from bidiattn.ops import _backward_plan, _plan, plan_arguments

    # A new TileConfig field must be carried by plan_arguments too.
    assert [f.name for f in dataclasses.fields(TileConfig)] == [
        "block_m", "block_n", "num_warps", "num_stages", "split_dv", "kv_splits", "pack_gqa", "edge_stages", "tma",
        "column_halves"]
    spans = image_spans(40, [(5, 25)], "gemma3").to(DEVICE)
    q, k = torch.randn(40, 4, 64).half().to(DEVICE), torch.randn(40, 2, 64).half().to(DEVICE)
    cfg = TileConfig(32, 16, 4, 3, split_dv=2, pack_gqa=True, tma=True, column_halves=True)
    plan = plan_forward(spans, 4, 2, 64, config=cfg)
    back = _plan(spans, q, k, *plan_arguments(plan))
    assert back.config == dataclasses.replace(cfg, edge_stages=3, kv_splits=plan.kv_splits)
    assert (back.pack, back.kv_splits, back.tiles.block_m) == (plan.pack, plan.kv_splits, plan.tiles.block_m)
    assert back.order is plan.order and back.tiles.hi_max is plan.tiles.hi_max
    assert _backward_plan(spans, q, *plan_arguments(plan)) is None
    # The gradient plan: its config with and without separate dQ tiles, and every tensor.
    assert [f.name for f in dataclasses.fields(BackwardConfig)] == [
        "block_m", "block_n", "num_warps", "num_stages", "dq", "separate_dk_dv", "mask_free_tiles", "tma"]
    for bcfg in (BackwardConfig(32, 16, 4, 2, tma=True),
                 BackwardConfig(16, 32, 4, 1, separate_dk_dv=True, dq=BackwardConfig(32, 16, 8, 1, mask_free_tiles=True))):
        full = dataclasses.replace(plan, backward=plan_backward(spans, 64, config=bcfg))
        bwd = _backward_plan(spans, q, *plan_arguments(full))
        assert bwd.config == bcfg and bwd.head_dim == 64 and bwd.query_tiles.block_m == bcfg.dq_pass.block_m
        assert bwd.key_order is full.backward.key_order and bwd.query_order is full.backward.query_order
        assert bwd.key_tiles.q_last is full.backward.key_tiles.q_last
        assert bwd.query_tiles.num_tiles is full.backward.query_tiles.num_tiles


def test_a_triton_plan_needs_spans_the_kernels_can_read(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spans = image_spans(40, [(5, 25)], "gemma3")
    with pytest.raises(ValueError, match="a triton plan needs the spans on a CUDA device .or TRITON_INTERPRET=1., got cpu"):
        bidiattn.plan(spans, 4, 2, 32, backend="triton")
    with pytest.raises(TypeError, match="spans must be a bidiattn.SpanMask, got dict"):
        bidiattn.plan({}, 4, 2, 32)


def test_a_launch_plan_is_checked_against_the_call():
    spans = image_spans(40, [(5, 25)], "gemma3").to(DEVICE)
    q, k, v = (torch.randn(40, h, 32).half().to(DEVICE) for h in (4, 2, 2))
    plan = bidiattn.plan(spans, 4, 2, 32, backend="triton", training=True)
    with pytest.raises(TypeError, match=r"plan must be a bidiattn.Plan from bidiattn.plan\(\), got dict"):
        bidiattn.attention(q, k, v, spans, backend="triton", plan={})
    with pytest.raises(TypeError, match=r"plan must be a bidiattn.Plan from bidiattn.plan\(\), got LaunchPlan"):
        bidiattn.attention(q, k, v, spans, backend="triton", plan=plan.triton)
    with pytest.raises(ValueError, match="this plan runs backend='triton'; the call asks for backend='reference'"):
        bidiattn.attention(q, k, v, spans, backend="reference", plan=plan)
    with pytest.raises(ValueError, match="made for another SpanMask object"):
        bidiattn.attention(q, k, v, image_spans(40, [(5, 25)], "gemma3").to(DEVICE), backend="triton", plan=plan)
    with pytest.raises(ValueError, match=r"for \(Hq, Hkv, D\) = \(4, 2, 32\), the call has \(4, 4, 32\)"):
        bidiattn.attention(q, q, q, spans, backend="triton", plan=plan)
    with pytest.raises(TypeError, match=r"training must be a bool, got 1 \(int\)"):
        bidiattn.plan(spans, 4, 2, 32, training=1)
    from bidiattn.launch import plan_backward

    other = image_spans(40, [(5, 25)], "gemma3").to(DEVICE)
    wrong = dataclasses.replace(plan, triton=dataclasses.replace(plan.triton, backward=plan_backward(other, 32)))
    with pytest.raises(ValueError, match="this BackwardPlan was made for another SpanMask object"):
        bidiattn.attention(q, k, v, spans, backend="triton", plan=wrong)
    with pytest.raises(ValueError, match="pass either config or plan"):
        span_attention_backward(q, q, k, v, q, torch.zeros(4, 40, device=DEVICE), spans, 0.2, None,
                                config=BackwardConfig(64, 64, 4, 1), plan=plan.triton.backward)


@pytest.mark.parametrize(
    "args,match",
    [((48, 32, 4, 1), "block_m must be a power of two, got 48"), ((64, 8, 4, 1), "at least 16x16, got 64x8"),
     ((64, 32, 4, 1, (64, 32)), "BackwardConfig.dq must be None or a BackwardConfig"),
     ((64, 32, 4, 1, BackwardConfig(16, 16, 4, 1, dq=BackwardConfig(16, 16, 4, 1))), "without its own dq")],
)
def test_backward_config_rejects_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        BackwardConfig(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv", [(128, 16, 8), (256, 8, 4), (512, 16, 4)])
def test_real_sizes_on_gpu(d, hq, hkv):
    ids = torch.zeros(2048, dtype=torch.int64)
    ids[300:1392] = 1
    spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=512)
    check_grads(spans, hq, hkv, d, torch.bfloat16, seed=d)


@pytest.mark.gpu
def test_training_loss_curves_agree_with_the_reference():
    """A tiny two-layer attention model trained 30 steps with each backend: same loss curve."""
    ids = torch.zeros(512, dtype=torch.int64)
    ids[100:300] = 1
    spans = rules.build("gemma3", "official", "full", block_ids=ids).to("cuda")
    curves = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        x = torch.randn(512, 128, device="cuda")
        target = torch.randn(512, 128, device="cuda")
        layers = torch.nn.ModuleList(torch.nn.Linear(128, 3 * 128) for _ in range(2)).cuda()
        opt = torch.optim.SGD(layers.parameters(), lr=0.05)
        losses = []
        for _ in range(30):
            h = x
            for lin in layers:
                q, k, v = lin(h).bfloat16().view(512, 3, 2, 64).unbind(1)
                h = h + bidiattn.attention(q, k, v, spans, backend=backend).reshape(512, 128).float()
            loss = (h - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    assert curves["triton"][-1] < curves["triton"][0]
    torch.testing.assert_close(curves["triton"], curves["reference"], rtol=2e-2, atol=0)
