"""Context-parallel attention (bidiattn.distributed.context_attention) on gloo process groups of
2, 3 and 4 CPU processes: outputs, lse and gradients equal the one-process call; plus the
per-rank block spans, the one-process simulation and argument checks.

Each multi-process test spawns its ranks once and runs every case inside them (spawning costs
seconds on a 2-core machine; a case costs milliseconds): every rank builds the same inputs from
the case's seed, runs its shard and compares it with its rows of the one-shot reference.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from bidiattn import attention, rules
from bidiattn.distributed import (RankPlan, ShardPlan, context_attention, plan_rank, plan_shards,
                                  simulate_context_attention)
from bidiattn.spans import SpanMask
from conftest import cpu_interpreter_only, free_port, image_spans, random_packed_layout, run_ranks

CONVENTIONS = [(f, c) for f in rules.FAMILIES for c in rules.CONVENTIONS]


def _case_spans(case: dict) -> SpanMask:
    """The case's spans: a random packed layout (``seed``), or images at fixed places (``images``)."""
    if "images" in case:
        return image_spans(case["length"], case["images"], case["family"], case["convention"], case["layer"],
                           case.get("window"))
    rng = random.Random(case["seed"])
    ids, cu = random_packed_layout(rng, max_seqs=3, max_len=case.get("max_len", 40))
    return rules.build(case["family"], case["convention"], case["layer"], block_ids=ids, window=case.get("window"),
                       cu_seqlens=cu)


def _cases(world: int) -> list[dict]:
    """Every family/convention on full and sliding layers (random packed layouts: odd lengths,
    blocks and sequences straddling the cuts), then the special layouts."""
    cases = []
    for i, (family, convention) in enumerate(CONVENTIONS):
        for layer in ("full", "sliding"):
            cases.append(dict(family=family, convention=convention, layer=layer, window=5, seed=100 * world + i,
                              tile=4, heads=(4, 2), dtype="float64"))
    text = dict(family="gemma3", convention="official", dtype="float32")
    cases += [
        # images straddling the 8-row cuts; odd length; GQA 4:1; softcap; fp32
        dict(text, layer="full", length=37, images=[(5, 12), (14, 26), (30, 35)], tile=8, heads=(4, 1), softcap=4.0,
             strided=True),
        dict(text, layer="sliding", window=6, length=37, images=[(5, 12), (14, 26), (30, 35)], tile=8, heads=(2, 2)),
        # more ranks than tiles: some ranks own no rows (no work)
        dict(text, layer="full", length=11, images=[(3, 9)], tile=8, heads=(2, 1)),
        # the default plan (tile 128): one rank holds everything, the others nothing
        dict(text, layer="sliding", window=4, length=21, images=[(2, 8)], tile=None, heads=(2, 1)),
        # a window smaller than the shards: only the halo moves
        dict(family="causal", convention="official", layer="sliding", window=3, length=64, images=[], tile=4,
             heads=(2, 1), dtype="float64"),
    ]
    return cases


def _inputs(case: dict, spans: SpanMask):
    g = torch.Generator().manual_seed(case.get("seed", 7) + 1)
    dtype = getattr(torch, case["dtype"])
    hq, hkv = case["heads"]
    t, d = spans.total_tokens, 8
    q = torch.randn(t, hq, d, generator=g, dtype=dtype)
    k = torch.randn(t, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(t, hkv, d, generator=g, dtype=dtype)
    go = torch.randn(t, hq, d, generator=g, dtype=dtype)
    gl = torch.randn(hq, t, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return q, k, v, go, gl


def _one_shot(case: dict, spans: SpanMask, q, k, v, go, gl):
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = attention(qq, kk, vv, spans, softcap=case.get("softcap"), return_lse=True, backend="reference")
    torch.autograd.backward((out, lse), (go, gl))
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


def _run_case(case: dict, rank: int, world: int) -> None:
    spans = _case_spans(case)
    q, k, v, go, gl = _inputs(case, spans)
    want = _one_shot(case, spans, q, k, v, go, gl)
    tile = case["tile"]
    shards = plan_shards(spans, world, num_q_heads=q.shape[1], tile=tile or 128)
    a, b = shards.starts[rank], shards.starts[rank + 1]
    # A rank plan reused for two calls; or the ShardPlan; or none (the default plan).
    plan = plan_rank(spans, shards, rank) if tile == 4 else (shards if tile else None)
    tol = dict(atol=1e-11, rtol=1e-11) if q.dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for repeat in range(2 if isinstance(plan, RankPlan) else 1):
        ql, kl, vl = (x[a:b].clone().requires_grad_() for x in (q, k, v))
        if case.get("strided"):  # k/v as views of a heads-first buffer (not contiguous)
            kl, vl = (x[a:b].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for x in (k, v))
        out, lse = context_attention(ql, kl, vl, spans, plan=plan, softcap=case.get("softcap"), return_lse=True,
                                     backend="reference")
        torch.autograd.backward((out, lse), (go[a:b], gl[:, a:b]))
        got = (out, lse, ql.grad, kl.grad, vl.grad)
        for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            y = y[:, a:b] if name == "lse" else y[a:b]
            assert x.shape == y.shape and x.dtype == y.dtype, (case, rank, name, x.shape, y.shape, x.dtype, y.dtype)
            err = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            assert torch.allclose(x, y, **tol), f"{name} differs by {err} on rank {rank}/{world}: {case}"


def _worker(rank: int, world: int, cases: list[dict]) -> None:
    for case in cases:
        _run_case(case, rank, world)
    # A subgroup: the last two ranks of the world, group ranks 0 and 1.
    if world >= 3:
        sub = dist.new_group([world - 2, world - 1])
        if rank >= world - 2:
            _run_subgroup(sub, rank - (world - 2))


def _run_subgroup(group, rank: int) -> None:
    spans = image_spans(24, [(6, 15)])
    case = dict(seed=3, dtype="float64", heads=(2, 1))
    q, k, v, go, gl = _inputs(case, spans)
    want = _one_shot(case, spans, q, k, v, go, gl)
    shards = plan_shards(spans, 2, tile=4)
    a, b = shards.starts[rank], shards.starts[rank + 1]
    ql, kl, vl = (x[a:b].clone().requires_grad_() for x in (q, k, v))
    out = context_attention(ql, kl, vl, spans, group=group, plan=shards, backend="reference")
    (out * go[a:b]).sum().backward()
    assert torch.allclose(out, want[0][a:b], atol=1e-11)
    assert torch.allclose(vl.grad, _one_shot(case, spans, q, k, v, go, torch.zeros_like(gl))[4][a:b], atol=1e-11)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_ranks_equal_the_one_process_call(world):
    run_ranks(_worker, world, _cases(world))


# ---------------------------------------------------------------------------- one process
@pytest.mark.parametrize("family,convention", CONVENTIONS)
@pytest.mark.parametrize("layer", ["full", "sliding"])
def test_rank_blocks_are_the_dense_mask_tiles(family, convention, layer):
    """Each block's spans are exactly the dense mask's (rows x fetched keys) tile, no row empty;
    the own block is valid self-attention spans; blocks cover every allowed pair once."""
    spans = _case_spans(dict(family=family, convention=convention, layer=layer, window=5, seed=11))
    dense = spans.to_dense()
    for world in (2, 3, 5):
        shards = plan_shards(spans, world, tile=4)
        covered = torch.zeros_like(dense, dtype=torch.int64)
        for r in range(world):
            rp = plan_rank(spans, shards, r)
            a = shards.starts[r]
            assert [blk.source for blk in rp.blocks] == list(shards.order[r])
            for blk in rp.blocks:
                s0 = shards.starts[blk.source]
                rows = slice(a + blk.rows[0], a + blk.rows[1])
                keys = slice(s0 + blk.keys[0], s0 + blk.keys[1])
                assert torch.equal(blk.spans.to_dense(), dense[rows, keys])
                assert bool((blk.spans.lo <= blk.spans.hi).all())
                covered[rows, keys] += blk.spans.to_dense().long()
                if blk.source == r:
                    assert blk.distance == 0 and blk.spans.is_self_attention
                    SpanMask(blk.spans.lo, blk.spans.hi)  # validates
            assert sum(blk.num_keys for blk in rp.blocks if blk.source != r) == shards.bytes_needed(r)
        assert torch.equal(covered, dense.long())  # every allowed pair in exactly one block


@pytest.mark.parametrize("world", [1, 3, 4])
def test_simulation_equals_one_shot(world):
    spans = image_spans(45, [(3, 13), (20, 31)], "gemma3", "official", "sliding", window=7)
    case = dict(seed=5, dtype="float64", heads=(4, 2), softcap=5.0)
    q, k, v, go, gl = _inputs(case, spans)
    want = _one_shot(case, spans, q, k, v, go, gl)
    plan = plan_shards(spans, world, tile=8)
    got = simulate_context_attention(q, k, v, spans, plan, softcap=5.0, backend="reference", grad_out=go, grad_lse=gl)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-11)
    out, lse = simulate_context_attention(q, k, v, spans, plan, softcap=5.0)
    assert torch.allclose(out, want[0], atol=1e-11) and torch.allclose(lse, want[1], atol=1e-11)


@cpu_interpreter_only
def test_simulation_through_the_triton_kernels_in_the_interpreter():
    """The GPU path's block calls on CPU: Triton forward on the block spans (extend spans with
    fewer keys than rows) and the Triton backward from the merged out/lse, fp16, GQA."""
    spans = image_spans(40, [(3, 13), (20, 31)], "gemma3", "official", "sliding", window=7)
    g = torch.Generator().manual_seed(0)
    q, go = (torch.randn(40, 4, 16, generator=g).half() for _ in range(2))
    k, v = (torch.randn(40, 2, 16, generator=g).half() for _ in range(2))
    plan = plan_shards(spans, 3, tile=8)
    assert any(len(plan.needs[r]) > 1 for r in range(3))
    got = simulate_context_attention(q, k, v, spans, plan, backend="triton", grad_out=go)
    qq, kk, vv = (x.float().requires_grad_() for x in (q, k, v))
    out, lse = attention(qq, kk, vv, spans, return_lse=True, backend="reference")
    out.backward(go.float())
    for x, y in zip(got, (out, lse, qq.grad, kk.grad, vv.grad)):
        assert (x.float() - y).abs().max().item() <= 2e-3 * max(1.0, y.abs().max().item())


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_needs_a_process_group():
    spans = image_spans(8, [])
    q = torch.randn(8, 2, 8)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="initialized torch.distributed"):
            context_attention(q, q, q, spans)


def test_one_rank_and_bad_arguments(one_rank_group):
    spans = image_spans(16, [(2, 9)])
    q, k = torch.randn(16, 4, 8, dtype=torch.float64), torch.randn(16, 2, 8, dtype=torch.float64)
    out, lse = context_attention(q, k, k, spans, return_lse=True, backend="reference")
    ref_out, ref_lse = attention(q, k, k, spans, return_lse=True, backend="reference")
    assert torch.allclose(out, ref_out, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
    plan = plan_shards(spans, 1, tile=4)
    with pytest.raises(TypeError, match="spans must be a bidiattn.SpanMask, got Tensor"):
        context_attention(q, k, k, spans.lo)
    with pytest.raises(TypeError, match="plan must be a ShardPlan, a RankPlan or None, got dict"):
        context_attention(q, k, k, spans, plan={})
    with pytest.raises(ValueError, match="plan is for 2 ranks but the group has 1"):
        context_attention(q, k, k, spans, plan=plan_shards(spans, 2))
    with pytest.raises(ValueError, match="plan is rank 1's but this is rank 0"):
        context_attention(q, k, k, spans, plan=RankPlan(plan, 1, (0, 16), ()))
    with pytest.raises(ValueError, match="q/k/v have 15 rows but this rank's shard has 16"):
        context_attention(q[:15], k[:15], k[:15], spans, plan=plan)
    with pytest.raises(ValueError, match="q has 16 rows but k/v 15"):
        context_attention(q, k[:15], k[:15], spans, plan=plan)
    with pytest.raises(ValueError, match="Hq=4 must be a positive multiple of key/value heads Hkv=3"):
        context_attention(q, torch.randn(16, 3, 8, dtype=torch.float64), torch.randn(16, 3, 8, dtype=torch.float64),
                          spans, plan=plan)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        context_attention(q.float(), k, k, spans, plan=plan)
    with pytest.raises(TypeError, match="q has dtype torch.int64"):
        context_attention(q.long(), k, k, spans, plan=plan)
    with pytest.raises(ValueError, match=r"q must have shape \[T, H, D\]"):
        context_attention(q[0], k, k, spans, plan=plan)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        context_attention(q, k, k, spans, plan=plan, backend="cuda")
    with pytest.raises(ValueError, match="scale must be a positive finite number, got -1"):
        context_attention(q, k, k, spans, plan=plan, scale=-1)
    with pytest.raises(TypeError, match="return_lse must be a bool, got 1"):
        context_attention(q, k, k, spans, plan=plan, return_lse=1)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup or None, got int"):
        context_attention(q, k, k, spans, group=0)
    tail = SpanMask(spans.lo[8:], spans.hi[8:], torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 16]),
                    total_keys=16)
    with pytest.raises(ValueError, match="shards self-attention spans"):
        context_attention(q[8:], k, k, tail, plan=plan)


def test_plan_rank_bad_arguments():
    spans = image_spans(16, [(2, 9)])
    shards = plan_shards(spans, 2, tile=4)
    with pytest.raises(TypeError, match="shards must be a ShardPlan"):
        plan_rank(spans, {}, 0)
    with pytest.raises(TypeError, match="spans must be a SpanMask"):
        plan_rank(None, shards, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        plan_rank(spans, shards, 2)
    with pytest.raises(TypeError, match="rank must be an int"):
        plan_rank(spans, shards, 1.0)
    with pytest.raises(ValueError, match="the plan covers 16 rows but spans have 12"):
        plan_rank(image_spans(12, []), shards, 0)
    assert isinstance(shards, ShardPlan)
    with pytest.raises(TypeError, match="plan must be a ShardPlan"):
        simulate_context_attention(torch.randn(16, 2, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8), spans, None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("layer", ["full", "sliding"])
def test_gpu_simulated_ranks_equal_one_shot_at_real_size(backend, layer):
    """One GPU, ranks simulated in turn: 32K tokens, 1092-token images every 2048, hd256 8q/4kv,
    bf16; the sharded forward (block kernels + lse merge) and backward equal the one-shot call."""
    t, world = 32768, 4
    spans = image_spans(t, [(s, s + 1092) for s in range(500, t - 1092, 2048)], "gemma3", "official", layer,
                        window=1024).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(t, 8, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(t, 4, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(t, 4, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    go = torch.randn(t, 8, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    plan = plan_shards(spans, world, num_q_heads=8)
    assert all(plan.needs[r] for r in range(world))
    out, lse, dq, dk, dv = simulate_context_attention(q, k, v, spans, plan, backend=backend, grad_out=go)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = attention(qq, kk, vv, spans, return_lse=True, backend=backend)
    ref_out.backward(go)
    assert torch.allclose(lse, ref_lse.float(), atol=1e-3, rtol=0)
    # bf16: each block's output is rounded before the merge; gradients summed over blocks.
    for x, y in ((out, ref_out), (dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        err = (x.float() - y.float()).abs().max().item()
        scale = y.float().abs().max().item()
        assert err <= 2e-2 * scale, (err, scale)


def _nccl_worker(rank: int, world: int, t: int) -> None:
    device = torch.device("cuda", rank)
    dist.barrier()
    for layer in ("full", "sliding"):
        host = image_spans(t, [(s, s + 1092) for s in range(956, t - 1092, 2048)], "gemma3", "official", layer,
                           window=1024)
        spans = host.to(device)
        g = torch.Generator(device=device).manual_seed(0)  # the same sequence on every rank
        q, go = (torch.randn(t, 8, 256, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
        k, v = (torch.randn(t, 4, 256, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
        shards = plan_shards(host, world, num_q_heads=8)
        a, b = shards.starts[rank], shards.starts[rank + 1]
        ql, kl, vl = (x[a:b].clone().requires_grad_() for x in (q, k, v))
        out, lse = context_attention(ql, kl, vl, spans, plan=plan_rank(host, shards, rank, device=device),
                                     return_lse=True)
        out.backward(go[a:b])
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        ref_out, ref_lse = attention(qq, kk, vv, spans, return_lse=True)
        ref_out.backward(go)
        assert torch.allclose(lse, ref_lse[:, a:b].float(), atol=1e-3, rtol=0), layer
        for x, y in ((out, ref_out), (ql.grad, qq.grad), (kl.grad, kk.grad), (vl.grad, vv.grad)):
            y = y[a:b].float()
            err = (x.float() - y).abs().max().item()
            assert err <= 2e-2 * y.abs().max().item(), (layer, rank, err)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs (the multi-GPU machine)")
def test_nccl_ranks_equal_one_gpu_at_128k():
    """Several GPUs, NCCL: 128K tokens, hd256 8q/4kv bf16, images of 1092 every 2048, full and
    sliding (W=1024) layers, default backend; each rank's output, lse and gradients equal its
    rows of the one-GPU call."""
    world = min(4, torch.cuda.device_count())
    run_ranks(_nccl_worker, world, 131072, backend="nccl", timeout_s=300)
