"""Triton forward kernel against the fp32 reference (interpreter on CPU, real kernel on GPU).

Tolerance: error <= 2x PyTorch's own low-precision error (same math in the input dtype) + 1e-3.
Outputs are poisoned with NaN first, so an unwritten row fails.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import bidiattn  # noqa: E402
from bidiattn import reference, rules  # noqa: E402
from bidiattn.kernels.forward import span_attention_forward  # noqa: E402
from bidiattn.launch import TileConfig  # noqa: E402
from conftest import gpu_size_spans, image_spans, lowp_attention, random_packed_layout  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(spans, hq, hkv, d, dtype, softcap=None, seed=0, config=None):
    g = torch.Generator().manual_seed(seed)
    t = spans.total_tokens
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype).to(DEVICE) for h in (hq, hkv, hkv))
    spans = spans.to(DEVICE)
    scale = 1 / math.sqrt(d)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((hq, t), float("nan"), device=DEVICE)
    span_attention_forward(q, k, v, spans, scale, softcap, config=config, out=out, lse=lse)
    want, want_lse = reference.attention(q, k, v, spans, softcap=softcap, return_lse=True)
    qf, kf, vf = q.float(), k.float(), v.float()
    ref32 = reference.attention(qf, kf, vf, spans, softcap=softcap)
    torch_err = (lowp_attention(q, k, v, spans, scale, softcap).float() - ref32).abs().max().item()
    err = (out.float() - ref32).abs().max().item()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=0)


@pytest.mark.parametrize("length", [1, 7, 63, 130])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_odd_lengths(length, dtype):
    blocks = [(length // 3, length // 3 + length // 2)] if length > 2 else []
    run_case(image_spans(length, blocks), 2, 1, 64, dtype, seed=length)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 1)])
def test_gqa_and_blocks_straddling_tiles(hq, hkv):
    # Blocks cross the 64-row tile edges and the key-tile edges.
    spans = image_spans(200, [(60, 70), (120, 190)], "gemma4", "official", "sliding", window=40)
    run_case(spans, hq, hkv, 64, torch.bfloat16, seed=hq)


@pytest.mark.parametrize("family,convention", [(f, c) for f in rules.FAMILIES for c in rules.CONVENTIONS])
@pytest.mark.parametrize("layer", rules.LAYERS)
def test_every_rule_on_packed_sequences(family, convention, layer):
    ids, cu = random_packed_layout(random.Random(repr((family, convention, layer))), max_seqs=3, max_len=90)
    spans = rules.build(family, convention, layer, block_ids=ids, window=9, cu_seqlens=cu)
    run_case(spans, 4, 2, 64, torch.bfloat16, seed=3)


@pytest.mark.parametrize("d", [96, 512])
def test_head_dims(d):
    spans = image_spans(77, [(10, 50)], "gemma4", "transformers", "sliding", window=16)
    run_case(spans, 2, 1, d, torch.bfloat16, seed=d)


@pytest.mark.parametrize(
    "config",
    [
        TileConfig(16, 16, 4, 1),
        TileConfig(32, 64, 4, 2, split_dv=2),
        TileConfig(64, 32, 8, 1, split_dv=4),
        TileConfig(32, 64, 4, 2),
        TileConfig(16, 16, 4, 1, kv_splits=3),
        TileConfig(32, 32, 4, 1, split_dv=2, kv_splits=5),
        TileConfig(32, 32, 4, 1, pack_gqa=True),
        TileConfig(16, 16, 4, 1, kv_splits=3, pack_gqa=True),
        TileConfig(16, 16, 4, 2, edge_stages=1),
        TileConfig(32, 16, 4, 3, split_dv=2, edge_stages=1),
        TileConfig(16, 16, 4, 2, edge_stages=1, tma=True),
        TileConfig(32, 16, 4, 3, split_dv=2, tma=True),
        TileConfig(16, 16, 4, 1, kv_splits=3, pack_gqa=True, tma=True),
        TileConfig(32, 16, 4, 2, column_halves=True),
        TileConfig(16, 16, 4, 2, edge_stages=1, column_halves=True, tma=True),
        TileConfig(32, 16, 4, 1, split_dv=2, kv_splits=3, column_halves=True, pack_gqa=True),
        TileConfig(32, 16, 4, 1, kv_splits=3, column_halves=True, tma=True),
    ],
    ids=str,
)
def test_tile_configs(config):
    # Every tuning knob must leave the result exact: odd length, a block straddling tile edges,
    # a window shorter than the block, hd 256 so split_dv=4 leaves 64-column slices.
    spans = image_spans(101, [(13, 80)], "gemma4", "official", "sliding", window=24)
    run_case(spans, 4, 2, 256, torch.float16, seed=5, config=config)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_m=48, block_n=32, num_warps=4, num_stages=1), "block_m must be a power of two, got 48"),
        (dict(block_m=64, block_n=8, num_warps=4, num_stages=1), "at least 16x16, got 64x8"),
        (dict(block_m=64, block_n=32, num_warps=4, num_stages=1, split_dv=3), "split_dv must be a power of two"),
        (dict(block_m=64, block_n=32, num_warps=4, num_stages=1, kv_splits=0), "kv_splits must be None .* got 0"),
        (dict(block_m=64, block_n=32, num_warps=4, num_stages=2, edge_stages=0), "edge_stages must be a positive int, got 0"),
        (dict(block_m=64, block_n=32, num_warps=4, num_stages=0), "num_stages must be a positive int, got 0"),
    ],
)
def test_tile_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TileConfig(**kwargs)


@pytest.mark.gpu
def test_a_config_that_does_not_fit_shared_memory_raises_value_error():
    # 64x64 tiles, 2 stages at hd256 ask for 294912 bytes on an H200 (limit 232448).
    spans = image_spans(101, [(13, 80)]).to(DEVICE)
    q = torch.randn(101, 2, 256, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="does not fit this GPU at head_dim=256"):
        span_attention_forward(q, q, q, spans, 0.0625, None, config=TileConfig(64, 64, 4, 2))


@pytest.mark.parametrize("group", [0, 1.5, True])
def test_pick_config_rejects_a_bad_gqa_group(group):
    from bidiattn.launch import pick_config

    with pytest.raises(ValueError, match=f"gqa_group must be a positive int, got {group!r}"):
        pick_config(128, gqa_group=group)


def test_split_dv_too_fine_for_head_dim():
    spans = image_spans(9, [])
    q, k, v = (torch.randn(9, 1, 64).half().to(DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="split_dv=8 leaves fewer than 16 of the 64"):
        span_attention_forward(q, k, v, spans.to(DEVICE), 0.125, None, config=TileConfig(64, 32, 4, 1, split_dv=8))


@pytest.mark.parametrize("d,halves", [(64, False), (512, True)])
def test_row_maxima_climbing_across_key_tiles(d, halves):
    # Keys scaled up along the sequence: each row's running max climbs tile after tile, so
    # every key tile rescales the accumulator(s).
    spans = image_spans(150, [(40, 97)], "gemma3", "official", "full")
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(150, h, d, generator=g) for h in (2, 1, 1))
    k = k * torch.linspace(0.2, 3.0, 150)[:, None, None]
    q, k, v = (x.half().to(DEVICE) for x in (q, k, v))
    spans = spans.to(DEVICE)
    cfg = TileConfig(16, 16, 4, 2, column_halves=halves)
    out, lse = span_attention_forward(q, k, v, spans, d**-0.5, None, config=cfg)
    ref32, ref_lse = reference.attention(q.float(), k.float(), v.float(), spans, return_lse=True)
    torch_err = (lowp_attention(q, k, v, spans, d**-0.5, None).float() - ref32).abs().max().item()
    assert (out.float() - ref32).abs().max().item() <= 2 * torch_err + 1e-3
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


def test_column_halves_need_32_columns_per_program():
    spans = image_spans(9, [])
    q = torch.randn(9, 1, 64).half().to(DEVICE)
    with pytest.raises(ValueError, match="column_halves needs at least 32 output columns per program; head_dim=64"):
        span_attention_forward(q, q, q, spans.to(DEVICE), 0.125, None,
                               config=TileConfig(64, 32, 4, 1, split_dv=4, column_halves=True))


def test_softcap():
    spans = image_spans(70, [(5, 40)], "paligemma", "official", "sliding", window=8)
    run_case(spans, 2, 2, 64, torch.float16, softcap=2.0, seed=1)


def test_auto_and_public_api_use_the_kernel():
    spans = image_spans(33, [(4, 20)])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(33, 2, 64, generator=g).bfloat16().to(DEVICE) for _ in range(3))
    out = bidiattn.attention(q, k, v, spans.to(DEVICE), backend="triton")
    torch.testing.assert_close(out.float(), reference.attention(q, k, v, spans.to(DEVICE)).float(), atol=2e-2, rtol=0)


def _operator_calls(monkeypatch):
    """Counts the public call's trips through the ``bidiattn::span_attention`` operator."""
    import bidiattn.ops

    calls = []
    real = bidiattn.ops.span_attention

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(bidiattn.ops, "span_attention", counted)
    return calls


@pytest.mark.parametrize("planned", [False, True])
def test_an_eager_call_needing_no_gradient_skips_the_operator_with_the_same_result(monkeypatch, planned):
    ids, cu = random_packed_layout(random.Random(3), max_seqs=3, max_len=70)
    spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=11, cu_seqlens=cu).to(DEVICE)
    g = torch.Generator().manual_seed(4)
    t = spans.total_tokens
    q, k, v = (torch.randn(t, h, 64, generator=g).half().to(DEVICE) for h in (4, 2, 2))
    plan = bidiattn.plan(spans, 4, 2, 64, window=11, backend="triton") if planned else None
    calls = _operator_calls(monkeypatch)
    out, lse = bidiattn.attention(q, k, v, spans, backend="triton", return_lse=True, plan=plan)
    with torch.no_grad():
        out_ng = bidiattn.attention(q.requires_grad_(), k, v, spans, backend="triton", plan=plan)
    assert calls == []
    from bidiattn.ops import plan_arguments

    args = plan_arguments(plan.triton) if planned else ([], None)
    want, want_lse = torch.ops.bidiattn.span_attention(q.detach(), k, v, spans.lo, spans.hi, spans.cu_seqlens,
                                                       spans.cu_seqlens_k, 64**-0.5, None, *args)
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and torch.equal(out_ng, want)


def test_calls_that_need_the_operator_still_go_through_it(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    spans = image_spans(33, [(4, 20)]).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(33, 2, 64, generator=g).half().to(DEVICE) for _ in range(3))
    calls = _operator_calls(monkeypatch)
    bidiattn.attention(q, k, v.requires_grad_(), spans, backend="triton").sum().backward()
    assert len(calls) == 1 and v.grad is not None

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen():
        bidiattn.attention(q, k, v, spans, backend="triton")
    assert len(calls) == 2 and "bidiattn.span_attention.default" in Seen.ops


@pytest.mark.parametrize(
    "dtype,d,exc,match",
    [
        (torch.float32, 64, TypeError, "float16 or bfloat16, got torch.float32"),
        (torch.bfloat16, 72, ValueError, "multiples of 16 up to 512, got 72"),
        (torch.bfloat16, 576, ValueError, "got 576"),
    ],
)
def test_triton_rejects_what_it_cannot_do(dtype, d, exc, match):
    spans = image_spans(5, [])
    q, k, v = (torch.randn(5, 1, d).to(dtype).to(DEVICE) for _ in range(3))
    with pytest.raises(exc, match=match):
        bidiattn.attention(q, k, v, spans.to(DEVICE), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv", [(128, 16, 8), (256, 8, 4), (512, 16, 4)])
def test_real_sizes_on_gpu(d, hq, hkv):
    spans = gpu_size_spans()
    run_case(spans, hq, hkv, d, torch.bfloat16, seed=d)
