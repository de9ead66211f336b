"""Head-dim-512 SM90 forward (bidiattn.kernels.sm90_wide, a Gluon kernel; issue 27).

CPU: the host side (configs, argument checks; no Triton import), and an offline compile for
sm_90a with the installed Triton (fits shared memory and the launch's registers; no spills with
the releases the kernels are checked with on a GPU). GPU (marked, SM90 only): output and lse
against the fp32 reference with the 2x-PyTorch error rule.
"""

from __future__ import annotations

import importlib.util
import json
import os
import math
import re
import subprocess
import sys

import pytest
import torch

from bidiattn import reference, rules
from bidiattn.kernels.sm90_wide import CONFIGS, Sm90WideConfig, check_inputs
from bidiattn.spans import SpanMask
from conftest import lowp_attention


def _causal(length: int) -> SpanMask:
    return rules.build("causal", "official", "full", block_ids=torch.zeros(length, dtype=torch.int64))


def _qkv(t: int, hq: int, hkv: int, d: int = 512, dtype=torch.bfloat16):
    return (torch.zeros(t, hq, d, dtype=dtype), torch.zeros(t, hkv, d, dtype=dtype), torch.zeros(t, hkv, d, dtype=dtype))


def test_named_configs_fit_shared_memory_and_registers():
    for config in CONFIGS.values():
        assert config.shared_bytes <= 232448
        assert config.output_regs >= 160
    assert CONFIGS["n64"] == Sm90WideConfig()


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(block_n=48), ValueError, "block_n"),
    (dict(block_n=64, k_stages=2, v_stages=1), ValueError, "shared memory"),
    (dict(softmax_regs=100), ValueError, "softmax_regs"),
    (dict(softmax_regs=200), ValueError, "output warpgroups"),
    (dict(p_stages=0), ValueError, "p_stages"),
    (dict(block_n=64.0), TypeError, "block_n"),
    (dict(k_stages=True), TypeError, "k_stages"),
    (dict(schedule="fast"), ValueError, "schedule"),
    (dict(schedule="split", softmax_regs=120), ValueError, "second warpgroup"),
    (dict(schedule="split-overlap"), ValueError, "schedule"),
    (dict(cluster=2), ValueError, "needs schedule='split'"),
    (dict(cluster=4), ValueError, "cluster must be 1 or 2"),
    (dict(cluster=True), TypeError, "cluster must be an int"),
    (dict(cluster=2.0), TypeError, "cluster must be an int"),
    (dict(fused_softmax=1), TypeError, "fused_softmax must be a bool"),
    (dict(lag="yes"), TypeError, "lag must be a bool"),
    (dict(lag=True), ValueError, "lag needs schedule='split' and cluster=1, got schedule='output'"),
    (dict(lag=True, schedule="split", softmax_regs=240, cluster=2), ValueError, "got schedule='split', cluster=2"),
])
def test_bad_config_names_the_value(kwargs, error, words):
    with pytest.raises(error, match=words):
        Sm90WideConfig(**kwargs)


def test_the_lag_config_loads_v_in_halves_into_the_same_shared_memory():
    from bidiattn.kernels.sm90_wide.host import v_box

    lag, split = CONFIGS["split-lag"], CONFIGS["split"]
    assert (v_box(lag), v_box(split)) == ([64, 256], [64, 512])
    assert lag.shared_bytes == split.shared_bytes and lag.name.endswith("-split-lag")
    assert CONFIGS["split-f-lag"].name.endswith("-split-f-lag")


def test_a_cluster_config_covers_two_ctas_of_rows():
    config = CONFIGS["split-c2"]
    assert (config.cluster, config.block_m, CONFIGS["n64"].block_m) == (2, 128, 64)
    assert config.name.endswith("-split-c2") and config.shared_bytes == CONFIGS["split"].shared_bytes


def test_tiles_of_another_block_size_are_refused():
    from bidiattn.kernels.sm90_wide.host import _tables
    from bidiattn.kernels.tiles import query_tiles

    spans = _causal(300)
    with pytest.raises(ValueError, match="block_m=128"):
        _tables(spans, query_tiles(spans, 64), 128)
    summary, _ = _tables(spans, None, 128)
    assert summary.block_m == 128


def test_check_inputs_accepts_hd512_half_gqa():
    from bidiattn.kernels.sm90_wide import default_config

    q, k, v = _qkv(70, 8, 2)
    scale, config = check_inputs(q, k, v, _causal(70), None, need_device=False)
    assert scale == pytest.approx(1 / math.sqrt(512)) and config == default_config()


def test_the_default_config_is_split_c2_where_gluon_multicasts_and_split_elsewhere(monkeypatch):
    from bidiattn.kernels.sm90_wide import default_config, host

    monkeypatch.setattr(host, "multicast_unavailable", lambda: None)
    assert default_config() is CONFIGS["split-c2"]
    monkeypatch.setattr(host, "multicast_unavailable", lambda: "Triton 3.6 has no multicast")
    assert default_config() is CONFIGS["split"]


@pytest.mark.parametrize("name", ["n64", "split-c2"])
def test_a_gluon_plan_keeps_the_forward_tiles_at_the_config_rows_and_dq_tiles_at_64(name):
    from bidiattn.kernels.sm90_wide import plan_gluon
    from bidiattn.kernels.tiles import key_tiles, query_tiles

    spans, config = _image_spans([3000, 77]), CONFIGS[name]
    p = plan_gluon(spans, config=config)
    assert p.config is config and p.tiles[0].block_m == config.block_m and not p.training
    assert (p.dq_tiles, p.key_tiles) == (None, None)
    for plan in (plan_gluon(spans, training=True, config=config), p):  # planned, or built in the backward
        (keys, key_order), (dq, dq_order) = plan.backward_tiles(spans)
        want, want_order = query_tiles(spans, 64)
        assert dq.block_m == 64 and torch.equal(dq.row_start, want.row_start) and torch.equal(dq_order, want_order)
        assert torch.equal(keys.key_start, key_tiles(spans, 64)[0].key_start)
        assert (dq is plan.tiles[0]) == (config.block_m == 64)
    assert int(p.tiles[0].num_tiles) == {64: 47 + 2, 128: 24 + 1}[config.block_m]  # 3000 and 77 rows
    with pytest.raises(TypeError, match="Sm90WideConfig"):
        plan_gluon(spans, config="split-c2")
    with pytest.raises(TypeError, match="spans must be a SpanMask, got Tensor"):
        plan_gluon(spans.lo)
    with pytest.raises(TypeError, match="training must be a bool, got 1"):
        plan_gluon(spans, training=1)


@pytest.mark.parametrize("change, error, words", [
    (lambda q, k, v: (q[..., :256], k[..., :256], v[..., :256]), ValueError, "head dim 512"),
    (lambda q, k, v: (q.float(), k.float(), v.float()), TypeError, "float16 or bfloat16"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "dtype"),
    (lambda q, k, v: (q[:, :7], k, v), ValueError, "multiple"),
])
def test_check_inputs_rejects(change, error, words):
    q, k, v = change(*_qkv(70, 8, 2))
    with pytest.raises(error, match=words):
        check_inputs(q, k, v, _causal(70), None, need_device=False)


def test_check_inputs_rejects_a_config_of_another_type():
    q, k, v = _qkv(70, 8, 2)
    with pytest.raises(TypeError, match="Sm90WideConfig"):
        check_inputs(q, k, v, _causal(70), None, config={"block_n": 64}, need_device=False)


def test_device_check_names_the_device():
    q, k, v = _qkv(70, 8, 2)
    with pytest.raises(ValueError, match="CUDA"):
        check_inputs(q, k, v, _causal(70), None)


def test_package_import_does_not_import_the_kernel():
    code = ("import sys, bidiattn, bidiattn.kernels.sm90_wide; "
            "assert 'bidiattn.kernels.sm90_wide.kernel' not in sys.modules; "
            "assert not any(m.startswith('triton.experimental.gluon') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def _gluon_hopper() -> str | None:
    """Why Triton's Gluon for Hopper cannot be imported here (no offline compile then), or None."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is None:
        return "this Triton has no Gluon for Hopper"
    return None


def _triton_release() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def _compile_offline(call: str) -> dict:
    """``bidiattn.kernels.sm90_wide.offline.<call>``'s result (the PTX left out), run in a fresh
    process with ``TRITON_INTERPRET=0``: Triton's real compile path (conftest turns its interpreter
    on for machines without CUDA, and Gluon does not run there)."""
    code = ("import json; from bidiattn.kernels.sm90_wide import offline; from bidiattn.kernels.sm90_wide.host import "
            f"CONFIGS; r = offline.{call}; r.pop('ptx'); print(json.dumps(r))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _check_compiled(r: dict) -> None:
    """Fits SM90 (shared memory, the launch's 168 registers a thread); no spills where the
    kernels are checked on a GPU (the Triton releases the gluon backend runs on); wgmmas in the
    SASS, and with Triton 3.6 their descriptors on the uniform datapath (at most a third of them
    right after an ``R2UR``, 3-28% in every kernel; Triton 3.9's PTX puts 75-95% there, NOTES.md)."""
    from bidiattn.kernels.sm90_wide.host import GPU_CHECKED_TRITON

    assert r["shared"] <= 232448 and r["registers"] <= 168, r
    if _triton_release() in GPU_CHECKED_TRITON:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert r["sass"]["hgmma"] >= 32 and 0 <= r["sass"]["hgmma_after_r2ur"] <= r["sass"]["hgmma"], r
    if _triton_release() == "3.6":
        assert r["sass"]["hgmma_after_r2ur"] <= r["sass"]["hgmma"] // 3, r


offline_compile = pytest.mark.skipif(_gluon_hopper() is not None, reason=str(_gluon_hopper()))


@offline_compile
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_forward_compiles_for_sm90(name):
    # With every Triton the package takes that has Gluon for Hopper (CI: the one torch installs,
    # and 3.6 in .ci/run's second environment; cluster configs where its Gluon multicasts).
    from bidiattn.kernels.sm90_wide.host import multicast_unavailable

    if CONFIGS[name].cluster > 1 and multicast_unavailable():
        pytest.skip(multicast_unavailable())
    _check_compiled(_compile_offline(f"compile_offline(CONFIGS[{name!r}])"))


@offline_compile
def test_a_cluster_config_needs_a_multicast_tma_load(monkeypatch):
    from triton.experimental.gluon.language.nvidia.hopper import tma

    def load_without_multicast(tensor_desc, coord, barrier, result, pred=True):
        raise AssertionError("not called")

    monkeypatch.setattr(tma, "async_load", load_without_multicast, raising=False)
    with pytest.raises(ValueError, match="cluster=2 needs Gluon's multicast TMA load.*this is Triton"):
        from bidiattn.kernels.sm90_wide.host import _check_multicast

        _check_multicast(CONFIGS["split-c2"])


def _sm90_ready() -> str | None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return "needs an SM90 GPU"
    from bidiattn.kernels.sm90_wide import gluon_unavailable

    err = gluon_unavailable()
    return None if err is None else f"Gluon kernel unavailable: {err}"


def _packed_causal() -> SpanMask:
    """Causal, five packed sequences of odd lengths (1, 63, 130, 777, 1093 tokens)."""
    return rules.build("causal", "official", "full", block_ids=torch.zeros(2064, dtype=torch.int64),
                       cu_seqlens=torch.tensor([0, 1, 64, 194, 971, 2064]))


def _image_spans(lengths: list[int], window: int | None = None) -> SpanMask:
    ids, n = [], 0
    for length in lengths:
        seq = torch.zeros(length, dtype=torch.int64)
        for s in range(2048 - 1092, length, 2048):
            n += 1
            seq[s : s + 1092] = n
        ids.append(seq)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return rules.build("gemma3", "official", "sliding" if window else "full", block_ids=torch.cat(ids),
                       window=window, cu_seqlens=cu)


@pytest.mark.gpu
@pytest.mark.parametrize("spans_fn, hq, hkv", [
    (_packed_causal, 8, 2),
    (lambda: _image_spans([3000]), 16, 2),
    (lambda: _image_spans([2500, 1601]), 8, 2),
    (lambda: _image_spans([3001], window=1024), 4, 1),
])
@pytest.mark.parametrize("name", ["n64", "n32", "split", "split-c2"])
def test_forward_matches_reference_on_sm90(spans_fn, hq, hkv, name):
    from bidiattn.kernels.sm90_wide.host import multicast_unavailable

    why = _sm90_ready() or (CONFIGS[name].cluster > 1 and multicast_unavailable())
    if why:
        pytest.skip(why)
    from bidiattn.kernels.sm90_wide import forward_sm90_hd512

    spans = spans_fn().to("cuda")
    t = spans.total_tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, h, 512, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((hq, t), float("nan"), device="cuda")
    forward_sm90_hd512(q, k, v, spans, config=CONFIGS[name], out=out, lse=lse)
    ref, ref_lse = reference.attention(q.float(), k.float(), v.float(), spans, return_lse=True)
    low, low_lse = lowp_attention(q, k, v, spans, 512**-0.5, None, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch_err = (low.float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2 * torch_err + 1e-3
    torch_lse_err = (low_lse - ref_lse).abs().max().item()
    assert (lse - ref_lse).abs().max().item() <= 2 * torch_lse_err + 1e-3


# ----------------------------------------------------------------------------- the gluon backend (GPU)
@pytest.mark.gpu
def test_the_default_call_runs_gluon_at_hd512_on_sm90():
    why = _sm90_ready()
    if why:
        pytest.skip(why)
    import bidiattn

    spans = _image_spans([3000]).to("cuda")
    assert bidiattn.plan(spans, 8, 2, 512).backend == "gluon"
    assert bidiattn.plan(spans, 8, 2, 512, paged=True).backend == "gluon"  # >= 256 rows: keys gathered
    assert bidiattn.plan(_image_spans([200]).to("cuda"), 8, 2, 512, paged=True).backend == "triton"
    assert bidiattn.plan(spans, 8, 2, 256, backend="triton").backend == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("spans_fn, hq, hkv, dtype, with_lse", [
    (_packed_causal, 8, 2, torch.bfloat16, False),
    (lambda: _image_spans([2500, 1601]), 16, 2, torch.bfloat16, True),
    (lambda: _image_spans([3001], window=1024), 4, 1, torch.float16, False),
])
def test_gluon_backend_gradients_match_reference(spans_fn, hq, hkv, dtype, with_lse):
    """Forward and backward through the Gluon kernels (the backward fed Gluon's out and lse)."""
    why = _sm90_ready()
    if why:
        pytest.skip(why)
    from conftest import check_grads

    check_grads(spans_fn(), hq, hkv, 512, dtype, seed=hq, with_lse=with_lse, backend="gluon")


@pytest.mark.gpu
def test_gluon_backend_gradients_on_strided_views_over_more_keys_deterministic():
    """300 rows over 1000 keys (a prefill chunk over a cache; a window of 400 and a 200-token
    image), q/k/v as [H, T, D] tensors transposed to [T, H, D] (not contiguous), an explicit
    training plan and one made without training: gradients against fp32 (2x PyTorch's error),
    two backward runs bitwise equal."""
    why = _sm90_ready()
    if why:
        pytest.skip(why)
    import bidiattn
    from conftest import grads_of

    rows, keys, hq, hkv = 300, 1000, 8, 2
    i = torch.arange(keys - rows, keys, device="cuda", dtype=torch.int32)
    lo, hi = (i - 399).clamp(min=0), i.clone()
    image = (i >= 650) & (i < 850)
    lo[image], hi[image] = 650 - 399, 849
    spans = SpanMask(lo.contiguous(), hi.contiguous(), torch.tensor([0, rows], device="cuda"),
                     cu_seqlens_k=torch.tensor([0, keys], device="cuda"), total_keys=keys)
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(hq, rows, 512, device="cuda", dtype=torch.bfloat16, generator=g).transpose(0, 1)
    k, v = (torch.randn(hkv, keys, 512, device="cuda", dtype=torch.bfloat16, generator=g).transpose(0, 1)
            for _ in range(2))
    dout = torch.randn(rows, hq, 512, device="cuda", generator=g)
    dlse = torch.randn(hq, rows, device="cuda", generator=g)
    want = grads_of(lambda a, b, c: reference.attention(a.float(), b.float(), c.float(), spans, return_lse=True),
                    q, k, v, dout, dlse)
    low = grads_of(lambda a, b, c: lowp_attention(a, b, c, spans, 512**-0.5, None, return_lse=True),
                   q, k, v, dout, dlse)
    runs = []
    for training in (True, False, True):
        p = bidiattn.plan(spans, hq, hkv, 512, training=training)
        assert p.backend == "gluon" and p.gluon.training == training
        runs.append(grads_of(lambda a, b, c: bidiattn.attention(a, b, c, spans, plan=p, return_lse=True),
                             q, k, v, dout, dlse))
    for name, a, w, lp in zip("qkv", runs[0], want, low):
        assert a.dtype == torch.bfloat16 and not torch.isnan(a).any(), name
        bound = 2 * (lp.float() - w).abs().max().item() + 1e-3 * w.abs().max().item() + 1e-5
        assert (a.float() - w).abs().max().item() <= bound, name
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))  # deterministic, plan or no key tiles


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 64])
def test_gluon_over_pages_equals_the_reference_and_captures(page_size):
    """A prefill chunk (two sequences: 700 and 130 new rows over 2000 and 1093 keys, an image
    across the chunk edge) read from shuffled pages of a vLLM-like interleaved buffer: gluon
    (keys gathered, then the Gluon forward) against fp32 (2x PyTorch's error), equal to the
    same forward on the contiguous keys, and replayed from a CUDA graph with an explicit plan."""
    why = _sm90_ready()
    if why:
        pytest.skip(why)
    import bidiattn
    from bidiattn.serving.graphs import capture
    from bidiattn.serving.kvcache import PagedKVCache, append, gather, paged_attention
    from bidiattn.kernels.sm90_wide import forward_sm90_hd512

    hq, hkv, k_lens, q_lens = 8, 2, [2000, 1093], [700, 130]
    los, his = [], []
    for k_len, q_len in zip(k_lens, q_lens):
        i = torch.arange(k_len - q_len, k_len, dtype=torch.int32)
        lo, hi = torch.zeros_like(i), i.clone()
        image = (i >= k_len - q_len - 50) & (i < k_len - q_len + 250)
        hi[image] = min(k_len - q_len + 249, k_len - 1)
        los.append(lo), his.append(hi)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()])
    spans = SpanMask(torch.cat(los), torch.cat(his), torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()]),
                     cu_seqlens_k=cu_k, total_keys=sum(k_lens)).to("cuda")
    per = [-(-n // page_size) for n in k_lens]
    pool = torch.randperm(sum(per) + 3, generator=torch.Generator().manual_seed(page_size)).tolist()
    table = torch.zeros(2, max(per), dtype=torch.int32)
    for b, p in enumerate(per):
        table[b, :p] = torch.tensor(pool[sum(per[:b]):sum(per[:b]) + p], dtype=torch.int32)
    table = table.cuda()
    buf = torch.zeros(sum(per) + 3, 2, page_size, hkv, 512, device="cuda", dtype=torch.bfloat16)
    cache = PagedKVCache(buf[:, 0], buf[:, 1])
    g = torch.Generator(device="cuda").manual_seed(page_size)
    k, v = (torch.randn(sum(k_lens), hkv, 512, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    append(cache, k, v, table, cu_k.cuda(), torch.zeros(2, dtype=torch.int64, device="cuda"))
    q = torch.randn(spans.total_tokens, hq, 512, device="cuda", dtype=torch.bfloat16, generator=g)

    out, lse = paged_attention(q, cache, table, spans, backend="gluon", return_lse=True)
    ref, ref_lse = reference.attention(q.float(), k.float(), v.float(), spans, return_lse=True)
    low, low_lse = lowp_attention(q, k, v, spans, 512**-0.5, None, return_lse=True)
    assert (out.float() - ref).abs().max().item() <= 2 * (low.float() - ref).abs().max().item() + 1e-3
    assert (lse - ref_lse).abs().max().item() <= 2 * (low_lse - ref_lse).abs().max().item() + 1e-3
    assert torch.equal(out, forward_sm90_hd512(q, k, v, spans)[0])
    assert all(torch.equal(a, b) for a, b in zip(gather(cache, table, spans.cu_seqlens_k, spans.total_keys), (k, v)))

    plan = bidiattn.plan(spans, hq, hkv, 512, backend="gluon", paged=True)
    graph, got = capture(lambda: paged_attention(q, cache, table, spans, plan=plan, validate=False),
                         forbid_sync=True)
    q.copy_(torch.randn_like(q))
    graph.replay()
    assert torch.equal(got, paged_attention(q, cache, table, spans, plan=plan))


@pytest.mark.gpu
def test_gluon_plan_under_cuda_graph_capture_and_softcap_fallback():
    why = _sm90_ready()
    if why:
        pytest.skip(why)
    import bidiattn

    spans = _image_spans([3000]).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(3000, h, 512, device="cuda", dtype=torch.bfloat16, generator=g) for h in (8, 2, 2))
    p = bidiattn.plan(spans, 8, 2, 512)
    assert p.backend == "gluon"
    eager = bidiattn.attention(q, k, v, spans, plan=p)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        bidiattn.attention(q, k, v, spans, plan=p)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = bidiattn.attention(q, k, v, spans, plan=p)
    q.copy_(torch.randn(q.shape, device="cuda", generator=g).to(q.dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, bidiattn.attention(q, k, v, spans, plan=p))
    assert not torch.equal(captured, eager)
    # softcap: the default call runs triton (exact), the Gluon kernel refuses it
    out = bidiattn.attention(q, k, v, spans, softcap=30.0)
    ref = reference.attention(q.float(), k.float(), v.float(), spans, softcap=30.0)
    low = lowp_attention(q, k, v, spans, 512**-0.5, 30.0)
    assert (out.float() - ref).abs().max().item() <= 2 * (low.float() - ref).abs().max().item() + 1e-3
    with pytest.raises(ValueError, match="takes no softcap"):
        bidiattn.attention(q, k, v, spans, softcap=30.0, backend="gluon")


def test_gluon_is_unavailable_under_a_triton_release_not_checked_on_a_gpu(monkeypatch):
    """Gluon is experimental: a release the kernels are not checked with on a GPU is refused by
    name (auto then runs triton), not run and wrong."""
    triton = pytest.importorskip("triton")
    from bidiattn.kernels.sm90_wide import gluon_unavailable

    monkeypatch.setattr(triton, "__version__", "3.7.1")
    err = gluon_unavailable()
    assert isinstance(err, ImportError) and "checked on a GPU with Triton 3.6, 3.9 only" in str(err)
    assert "this is Triton 3.7.1" in str(err)


# ----------------------------------------------------------------------------- the backward's passes
@offline_compile
@pytest.mark.parametrize("name", ["dv", "dk", "dq"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_backward_passes_compile_for_sm90(name, dtype):
    _check_compiled(_compile_offline(f"compile_backward_offline({name!r}, {dtype!r})"))


@pytest.mark.parametrize("change, words", [
    (lambda a: dict(a, do=a["do"][:-1]), "do must be a torch.bfloat16 tensor of q's shape [70, 8, 512]"),
    (lambda a: dict(a, out=a["out"].half()), "out must be a torch.bfloat16 tensor"),
    (lambda a: dict(a, lse=a["lse"].t()), "lse must be a float32 tensor of shape [8, 70]"),
    (lambda a: dict(a, dlse=a["lse"].double()), "dlse must be a float32 tensor"),
    (lambda a: a, "need CUDA tensors, got cpu"),
])
def test_backward_checks_name_the_value(change, words):
    from bidiattn.kernels.sm90_wide import backward_sm90_hd512

    q, k, v = _qkv(70, 8, 2)
    args = dict(do=torch.zeros_like(q), q=q, k=k, v=v, out=torch.zeros_like(q), lse=torch.zeros(8, 70),
                spans=_causal(70))
    with pytest.raises(ValueError, match=re.escape(words)):
        backward_sm90_hd512(**change(args))


@pytest.mark.gpu
@pytest.mark.parametrize("spans_fn, hq, hkv, dtype, with_lse", [
    (_packed_causal, 8, 2, torch.bfloat16, False),
    (lambda: _image_spans([3000]), 16, 2, torch.bfloat16, True),
    (lambda: _image_spans([2500, 1601]), 8, 2, torch.float16, False),
    (lambda: _image_spans([3001], window=1024), 4, 1, torch.bfloat16, False),
    (lambda: _image_spans([1093]), 32, 4, torch.bfloat16, True),  # GQA 8, one partial image
])
def test_backward_passes_match_reference_on_sm90(spans_fn, hq, hkv, dtype, with_lse):
    why = _sm90_ready()
    if why:
        pytest.skip(why)
    from bidiattn.kernels.sm90_wide import backward_sm90_hd512
    from conftest import grads_of

    spans = spans_fn().to("cuda")
    t = spans.total_tokens
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(t, h, 512, device="cuda", dtype=dtype, generator=g) for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, 512, device="cuda", generator=g)
    dlse = torch.randn(hq, t, device="cuda", generator=g) if with_lse else None
    out, lse = reference.attention(q.float(), k.float(), v.float(), spans, return_lse=True)
    got = backward_sm90_hd512(dout.to(dtype), q, k, v, out.to(dtype), lse, spans, dlse=dlse)
    want = grads_of(lambda a, b, c: reference.attention(a.float(), b.float(), c.float(), spans, return_lse=True),
                    q, k, v, dout, dlse)
    low = grads_of(lambda a, b, c: lowp_attention(a, b, c, spans, 512**-0.5, None, return_lse=True),
                   q, k, v, dout, dlse)
    for name, a, w, lp in zip("qkv", got, want, low):
        assert a.dtype == dtype and not torch.isnan(a).any(), name
        bound = 2 * (lp.float() - w).abs().max().item() + 1e-3 * w.abs().max().item() + 1e-5
        assert (a.float() - w).abs().max().item() <= bound, name
