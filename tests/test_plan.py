"""bidiattn.plan and the plan a call keeps on its spans: the backend choice table (capabilities
monkeypatched), cache reuse and invalidation, plans passed for other spans, bad arguments."""

from __future__ import annotations

import gc
import re
import sys
import weakref

import pytest
import torch

import bidiattn
from bidiattn import launch
from bidiattn.spans import SpanMask
from conftest import cpu_interpreter_only, image_spans, tail_rows

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


# ----------------------------------------------------------------------------- the auto table
def capabilities(monkeypatch, *, interpreting=False, compiling=False, capability=(9, 0), fa4=True, triton=True,
                 gluon=True):
    """Monkeypatch what auto_backend reads: Triton's interpreter flag and import, torch.compile,
    the GPU's compute capability, FA4's and the Gluon kernel's imports (an ImportError, or None)."""
    monkeypatch.setattr(launch, "interpreting", lambda: interpreting)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(launch, "fa4_import_error", lambda: None if fa4 else ImportError("No module named 'flash_attn'"))
    monkeypatch.setattr(launch, "triton_missing", lambda: None if triton else ImportError("no triton"))
    monkeypatch.setattr(launch, "gluon_import_error",
                        lambda: None if gluon else ImportError("cannot import name 'warpgroup_mma'"))


CUDA, CPU = torch.device("cuda"), torch.device("cpu")

TABLE = [
    # (device, dtype, head dim, rows per sequence, paged, capabilities) -> backend
    (CPU, BF16, 64, 100, False, {}, "reference"),
    (CPU, BF16, 64, 100, False, dict(interpreting=True), "triton"),
    (CPU, F32, 64, 100, False, dict(interpreting=True), "reference"),
    (CPU, BF16, 64, 100, False, dict(interpreting=True, triton=False), "reference"),
    (CUDA, BF16, 128, 4096, False, {}, "fa4"),
    (CUDA, F16, 256, 4096, False, {}, "fa4"),
    (CUDA, BF16, 72, 4096, False, {}, "fa4"),  # FA4 takes multiples of 8 on SM90, triton only of 16
    (CUDA, BF16, 72, 4096, False, dict(fa4=False), "reference"),
    (CUDA, BF16, 256, 4096, False, dict(capability=(10, 0)), "fa4"),
    (CUDA, BF16, 192, 4096, False, dict(capability=(10, 0)), "triton"),  # SM100 FA4: <= 128 and 256
    (CUDA, BF16, 128, 4096, False, dict(capability=(8, 0)), "triton"),
    (CUDA, BF16, 512, 4096, False, {}, "gluon"),  # hd512 on SM90: the Gluon forward
    (CUDA, F16, 512, 4096, False, {}, "gluon"),
    (CUDA, BF16, 512, 4096, False, dict(gluon=False), "triton"),
    (CUDA, BF16, 512, 4096, False, dict(capability=(10, 0)), "triton"),  # Hopper-only kernel
    (CUDA, BF16, 512, 4096, False, dict(capability=(8, 0)), "triton"),
    (CUDA, BF16, 512, 16, False, {}, "triton"),  # decode-sized
    (CUDA, BF16, 512, 256, True, {}, "gluon"),  # paged keys, prefill chunks: gathered, Gluon
    (CUDA, BF16, 512, 255, True, {}, "triton"),  # paged keys, shorter chunks
    (CUDA, BF16, 512, 4096, True, dict(gluon=False), "triton"),
    (CUDA, BF16, 512, 4096, True, dict(capability=(10, 0)), "triton"),
    (CUDA, BF16, 512, 4096, False, dict(compiling=True), "triton"),
    (CUDA, F32, 512, 4096, False, {}, "reference"),
    (CUDA, BF16, 512, 4096, False, dict(triton=False), "gluon"),
    (CUDA, BF16, 128, 4096, False, dict(fa4=False), "triton"),
    (CUDA, BF16, 128, 16, False, {}, "triton"),  # decode-sized: split-KV triton
    (CUDA, BF16, 128, 17, False, {}, "fa4"),
    (CUDA, BF16, 128, 4096, True, {}, "triton"),  # paged keys
    (CUDA, F32, 128, 4096, False, {}, "reference"),
    (CUDA, BF16, 128, 4096, False, dict(compiling=True), "triton"),
    (CUDA, F32, 128, 4096, False, dict(compiling=True), "reference"),
    (CUDA, BF16, 128, 4096, False, dict(triton=False), "fa4"),
    (CUDA, BF16, 128, 16, False, dict(triton=False), "reference"),
]


@pytest.mark.parametrize("device,dtype,d,rows,paged,caps,want", TABLE)
def test_auto_backend_table(monkeypatch, device, dtype, d, rows, paged, caps, want):
    capabilities(monkeypatch, **caps)
    assert launch.auto_backend(device, dtype, d, rows, paged=paged) == want


def test_auto_tries_the_fa4_import_only_where_it_could_pick_fa4(monkeypatch):
    capabilities(monkeypatch)
    tried = []
    monkeypatch.setattr(launch, "fa4_import_error", lambda: tried.append(1))
    assert launch.auto_backend(CUDA, BF16, 128, 1) == "triton"
    assert launch.auto_backend(CUDA, BF16, 128, 4096, paged=True) == "triton"
    assert launch.auto_backend(CPU, BF16, 128, 4096) == "reference"
    assert tried == []
    launch.auto_backend(CUDA, BF16, 128, 4096)
    assert tried == [1]


def test_auto_tries_the_gluon_import_only_at_head_dim_512_on_sm90(monkeypatch):
    capabilities(monkeypatch)
    tried = []
    monkeypatch.setattr(launch, "gluon_import_error", lambda: tried.append(1))
    launch.auto_backend(CUDA, BF16, 128, 4096)
    launch.auto_backend(CUDA, BF16, 512, 255, paged=True)
    launch.auto_backend(CUDA, BF16, 512, 8)
    capabilities(monkeypatch, capability=(10, 0))
    monkeypatch.setattr(launch, "gluon_import_error", lambda: tried.append(1))
    launch.auto_backend(CUDA, BF16, 512, 4096)
    assert tried == []
    capabilities(monkeypatch)
    monkeypatch.setattr(launch, "gluon_import_error", lambda: tried.append(1))
    assert launch.auto_backend(CUDA, BF16, 512, 4096) == "gluon"
    assert tried == [1]


@pytest.mark.parametrize("device,dtype,d,capability,error,words", [
    (CUDA, BF16, 256, (9, 0), ValueError, "head dim 512 only, got 256"),
    (CUDA, F32, 512, (9, 0), TypeError, "float16 or bfloat16, got torch.float32"),
    (CPU, BF16, 512, (9, 0), ValueError, "needs CUDA tensors, got cpu"),
    (CUDA, BF16, 512, (10, 0), ValueError, "SM90 GPUs (H100/H200), this is sm_100"),
])
def test_gluon_unsupported_names_the_value(monkeypatch, device, dtype, d, capability, error, words):
    capabilities(monkeypatch, capability=capability)
    err = launch.gluon_unsupported(device, dtype, d)
    assert isinstance(err, error) and words in str(err)


def test_gluon_unsupported_passes_the_import_error_on(monkeypatch):
    capabilities(monkeypatch, gluon=False)
    err = launch.gluon_unsupported(CUDA, BF16, 512)
    assert isinstance(err, ValueError) and "warpgroup_mma" in str(err)
    capabilities(monkeypatch)
    assert launch.gluon_unsupported(CUDA, BF16, 512) is None


@cpu_interpreter_only
def test_a_plan_records_its_choice_and_launch_data(monkeypatch):
    spans = image_spans(300, [(40, 200)], layer="sliding", window=64)
    capabilities(monkeypatch, interpreting=True)
    p = bidiattn.plan(spans, 4, 2, 64)
    assert (p.backend, p.num_q_heads, p.num_kv_heads, p.head_dim, p.training, p.spans) == ("triton", 4, 2, 64, False,
                                                                                            spans)
    assert isinstance(p.triton, launch.LaunchPlan) and p.triton.backward is None and p.segments is None
    assert bidiattn.plan(spans, 4, 2, 64, training=True).triton.backward is not None
    # The same spans on a Hopper with FA4 (the plan is built wherever the spans are).
    monkeypatch.setattr(launch, "auto_backend", lambda *args, **kwargs: "fa4")
    p = bidiattn.plan(spans, 4, 2, 64, window=64)
    assert p.backend == "fa4" and p.triton is None and p.window == 64
    assert p.segments is None and torch.equal(p.masked.lo, spans.lo.int())  # one masked launch (masked_layers)
    monkeypatch.setattr(launch, "masked_layers", lambda *args: "none")
    p = bidiattn.plan(spans, 4, 2, 64, window=64)
    assert p.masked is None
    assert torch.equal(p.segments.to_dense(), spans.to_dense())
    assert {c.kind: c.pack_gqa for c in p.segments.calls} == {"causal": None, "window": False, "open": False}
    assert bidiattn.plan(spans, 4, 2, 64, backend="reference").backend == "reference"


@cpu_interpreter_only
def test_a_gluon_plan_holds_the_query_and_key_tile_tables(monkeypatch):
    from bidiattn.kernels.sm90_wide import default_config
    from bidiattn.kernels.tiles import key_tiles

    spans = image_spans(300, [(40, 200)])
    capabilities(monkeypatch, interpreting=True)
    p = bidiattn.plan(spans, 4, 1, 512, backend="gluon")
    assert (p.backend, p.triton, p.segments, p.backward, p.gluon.key_tiles) == ("gluon", None, None, None, None)
    summary, order = p.gluon.tiles
    assert p.gluon.config == default_config() and summary.block_m == p.gluon.config.block_m
    assert int(summary.num_tiles) == -(-300 // summary.block_m) and order.numel() >= int(summary.num_tiles)
    p = bidiattn.plan(spans, 4, 1, 512, backend="gluon", training=True)
    assert p.backward is None  # the backward is Gluon's: dK/dV over the key tiles, dQ over the query tiles
    assert p.gluon.dq_tiles[0].block_m == 64
    (table, order), (want, want_order) = p.gluon.key_tiles, key_tiles(spans, 64)
    for name in ("seq", "key_start", "keys", "q_first", "q_last"):
        assert torch.equal(getattr(table, name), getattr(want, name)), name
    assert torch.equal(order, want_order)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    capabilities(monkeypatch, interpreting=False)
    with pytest.raises(ValueError, match="gluon plan needs the spans on a CUDA device, got cpu"):
        bidiattn.plan(spans, 4, 1, 512, backend="gluon")


def test_the_gluon_backend_refuses_what_it_cannot_run():
    spans = image_spans(40, [(5, 20)])
    q, k, v = (torch.zeros(40, h, 512, dtype=BF16) for h in (2, 1, 1))
    with pytest.raises(ValueError, match="backend='gluon' needs CUDA tensors, got cpu"):
        bidiattn.attention(q, k, v, spans, backend="gluon")
    q, k, v = (torch.zeros(40, h, 256, dtype=BF16) for h in (2, 1, 1))
    with pytest.raises(ValueError, match="head dim 512 only, got 256"):
        bidiattn.attention(q, k, v, spans, backend="gluon")


@cpu_interpreter_only
def test_softcap_at_head_dim_512_on_the_gluon_path(monkeypatch):
    """The Gluon kernel has no softcap: the default call falls back to triton (exact), an explicit
    backend='gluon' refuses it by name."""
    spans = image_spans(40, [(5, 20)])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, h, 512, generator=g).to(BF16) for h in (2, 1, 1))
    monkeypatch.setattr(launch, "auto_backend", lambda *args, **kwargs: "gluon")
    monkeypatch.setattr(sys.modules["bidiattn.attention"], "gluon_unsupported", lambda *args: None)
    out = bidiattn.attention(q, k, v, spans, softcap=20.0)
    backends = {p.backend for p in spans._plans.values()}
    assert backends == {"gluon", "triton"}
    want = bidiattn.reference.attention(q.float(), k.float(), v.float(), spans, softcap=20.0)
    assert (out.float() - want).abs().max().item() < 0.03
    with pytest.raises(ValueError, match=r"backend='gluon' takes no softcap \(got softcap=20.0\)"):
        bidiattn.attention(q, k, v, spans, softcap=20.0, backend="gluon")


# ----------------------------------------------------------------------------- the cache
@pytest.fixture
def builds(monkeypatch):
    """Every plan built: (spans id, heads, backend, training)."""
    seen = []
    real = launch.plan

    def counting(spans, hq, hkv, d, **kwargs):
        seen.append((id(spans), hq, hkv, d, kwargs["backend"], kwargs["training"]))
        return real(spans, hq, hkv, d, **kwargs)

    monkeypatch.setattr(launch, "plan", counting)
    return seen


def qkv(t, hq=4, hkv=2, d=16, dtype=torch.float16, tk=None):
    g = torch.Generator().manual_seed(t)
    return (torch.randn(t, hq, d, generator=g).to(dtype), torch.randn(tk or t, hkv, d, generator=g).to(dtype),
            torch.randn(tk or t, hkv, d, generator=g).to(dtype))


@cpu_interpreter_only
def test_the_same_spans_and_heads_reuse_one_plan(builds):
    spans = image_spans(40, [(5, 25)])
    q, k, v = qkv(40)
    first = bidiattn.attention(q, k, v, spans)
    assert torch.equal(first, bidiattn.attention(q, k, v, spans))
    assert len(builds) == 1 and len(spans._plans) == 1
    kept = next(iter(spans._plans.values()))
    assert kept.backend == "triton"  # CPU under TRITON_INTERPRET=1 (conftest)
    assert launch.planned(spans, 4, 2, 16, backend="auto", training=False, dtype=torch.float16, paged=False) is kept
    # The kept plan is the one an explicit plan would be: same results, bitwise.
    assert torch.equal(first, bidiattn.attention(q, k, v, spans, plan=bidiattn.plan(spans, 4, 2, 16)))


def test_other_spans_other_heads_backends_and_gradients_plan_anew(builds):
    spans = image_spans(40, [(5, 25)])
    q, k, v = qkv(40)
    bidiattn.attention(q, k, v, spans)
    equal = SpanMask(spans.lo, spans.hi)  # equal values, another object
    bidiattn.attention(q, k, v, equal)
    assert builds[1][0] == id(equal) and len(equal._plans) == 1
    q8, k8, v8 = qkv(40, hq=8, hkv=2)
    bidiattn.attention(q8, k8, v8, spans)
    bidiattn.attention(q, k, v, spans, backend="reference")
    assert [b[1:] for b in builds[2:]] == [(8, 2, 16, "auto", False), (4, 2, 16, "reference", False)]
    assert len(spans._plans) == 3
    # A call that needs gradients plans the backward too; inference then reuses that plan.
    qg = q.clone().requires_grad_()
    bidiattn.attention(qg, k, v, spans).float().sum().backward()
    assert builds[-1][1:] == (4, 2, 16, "auto", True)
    n = len(builds)
    bidiattn.attention(q, k, v, spans)
    with torch.no_grad():
        bidiattn.attention(qg, k, v, spans)
    assert len(builds) == n


@cpu_interpreter_only
def test_a_kept_plan_never_outlives_its_spans():
    spans = image_spans(40, [(5, 25)])
    q, k, v = qkv(40)
    bidiattn.attention(q, k, v, spans)
    kept = weakref.ref(next(iter(spans._plans.values())))
    tables = weakref.ref(kept().triton.order)
    gc.disable()  # freed by reference counting alone: no cycle through the plan
    try:
        del spans
        assert kept() is None and tables() is None
    finally:
        gc.enable()


@cpu_interpreter_only
def test_plans_for_other_spans_or_heads_are_refused():
    spans = image_spans(40, [(5, 25)])
    q, k, v = qkv(40)
    p = bidiattn.plan(spans, 4, 2, 16)
    with pytest.raises(ValueError, match=r"this plan was made for another SpanMask object .* bidiattn.plan\(spans, ...\)"):
        bidiattn.attention(q, k, v, SpanMask(spans.lo, spans.hi), plan=p)
    with pytest.raises(ValueError, match=re.escape("this plan is for (Hq, Hkv, D) = (4, 2, 16), the call has (4, 1, 16)")):
        bidiattn.attention(q, k[:, :1], v[:, :1], spans, plan=p)
    with pytest.raises(TypeError, match=r"plan must be a bidiattn.Plan from bidiattn.plan\(\), got LaunchPlan"):
        bidiattn.attention(q, k, v, spans, plan=p.triton)
    with pytest.raises(ValueError, match="this plan runs backend='triton'; the call asks for backend='flex'"):
        bidiattn.attention(q, k, v, spans, plan=p, backend="flex")
    fa4 = bidiattn.plan(spans, 4, 2, 16, backend="fa4", paged=True)
    with pytest.raises(ValueError, match=re.escape("this fa4 plan was made with paged=True; bidiattn.attention needs "
                                                   "bidiattn.plan(..., paged=False)")):
        bidiattn.attention(q, k, v, spans, plan=fa4)
    # A plan passed for the right spans runs its own backend, whatever the defaults.
    ref = bidiattn.plan(spans, 4, 2, 16, backend="reference")
    torch.testing.assert_close(bidiattn.attention(q, k, v, spans, plan=ref),
                               bidiattn.reference.attention(q, k, v, spans))


@cpu_interpreter_only
def test_extend_spans_and_paged_calls_keep_their_own_plans(builds):
    from bidiattn.serving.kvcache import PagedKVCache, append, paged_attention

    spans = tail_rows(image_spans(48, [(5, 25)]), [3])
    q, k, v = qkv(3, tk=48)
    cache = PagedKVCache.allocate(4, 16, 2, 16, dtype=torch.float16, device="cpu")
    table = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    append(cache, k, v, table, spans.cu_seqlens_k, torch.zeros(1, dtype=torch.int64))
    want = bidiattn.attention(q, k, v, spans)
    got = paged_attention(q, cache, table, spans)
    assert torch.equal(got, paged_attention(q, cache, table, spans))
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert [b[4:] for b in builds] == [("auto", False), ("auto", False)] and len(spans._plans) == 2
    assert {p.paged for p in spans._plans.values()} == {True, False}


def test_compiled_calls_plan_inside_the_operator():
    spans = image_spans(40, [(5, 25)])
    q, k, v = qkv(40)

    def layer(a, b, c):
        return bidiattn.attention(a, b, c, spans)

    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, v)
    assert spans._plans == {}  # traced: nothing planned outside the operator, nothing kept
    assert torch.equal(got, layer(q, k, v))


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((0, 1, 16), {}, ValueError, "num_q_heads must be a positive int, got 0"),
    ((4, 3, 16), {}, ValueError, "num_q_heads=4 must be a multiple of num_kv_heads=3"),
    ((4, 2, -16), {}, ValueError, "head_dim must be a positive int, got -16"),
    ((4, 2, True), {}, TypeError, "head_dim must be an int, got True"),
    ((4, 2.0, 16), {}, TypeError, "num_kv_heads must be an int, got 2.0"),
    ((4, 2, 16), dict(window=0), ValueError, "window must be None or a positive int, got 0"),
    ((4, 2, 16), dict(window="8"), TypeError, "window must be an int, got '8'"),
    ((4, 2, 16), dict(backend="cuda"), ValueError, r"unknown backend 'cuda'; available: \('auto', "),
    ((4, 2, 16), dict(training="yes"), TypeError, r"training must be a bool, got 'yes' \(str\)"),
    ((4, 2, 16), dict(paged=1), TypeError, r"paged must be a bool, got 1 \(int\)"),
    ((4, 2, 16), dict(dtype="bfloat16"), TypeError, r"dtype must be a torch.dtype, got 'bfloat16' \(str\)"),
    ((4, 2, 16), dict(paged=True, backend="flex"), ValueError, "paged keys run on backend 'triton', 'fa4' or 'gluon', got "
                                                                "backend='flex'"),
])
def test_bad_arguments_name_the_value(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bidiattn.plan(image_spans(8, [(2, 5)]), *args, **kwargs)


def test_bad_spans_and_a_triton_plan_off_cuda(monkeypatch):
    with pytest.raises(TypeError, match="spans must be a bidiattn.SpanMask, got tuple"):
        bidiattn.plan((torch.zeros(3), torch.zeros(3)), 4, 2, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="a triton plan needs the spans on a CUDA device"):
        bidiattn.plan(image_spans(8, [(2, 5)]), 4, 2, 16, backend="triton")
    assert bidiattn.plan(image_spans(8, [(2, 5)]), 4, 2, 16).backend == "reference"


def test_the_public_names():
    import importlib.util
    import inspect

    assert bidiattn.plan is launch.plan and bidiattn.Plan is launch.Plan
    assert not hasattr(bidiattn, "plan_attention")
    assert importlib.util.find_spec("bidiattn.segments") is None
    assert importlib.util.find_spec("bidiattn.serving.planner") is None
    assert importlib.util.find_spec("bidiattn.serving.prefill") is not None
    from bidiattn.serving.kvcache import paged_attention

    for fn in (bidiattn.attention, paged_attention):
        params = inspect.signature(fn).parameters
        assert "plan" in params and "segment_plan" not in params and "fa4_strategy" not in params


@cpu_interpreter_only
@pytest.mark.parametrize("backend, head_dim, dtype, error, words", [
    ("triton", 7, torch.bfloat16, ValueError, "multiples of 16 up to 512, got 7"),
    ("triton", 1024, torch.bfloat16, ValueError, "multiples of 16 up to 512, got 1024"),
    ("triton", 64, torch.float32, TypeError, "float16 or bfloat16, got torch.float32"),
    ("gluon", 256, torch.bfloat16, ValueError, "head dim 512 only, got 256"),
    ("gluon", 512, torch.float32, TypeError, "float16 or bfloat16, got torch.float32"),
])
def test_an_explicit_backend_refuses_head_dims_and_dtypes_it_cannot_run(backend, head_dim, dtype, error, words):
    with pytest.raises(error, match=re.escape(words)):
        bidiattn.plan(image_spans(8, [(2, 5)]), 4, 2, head_dim, backend=backend, dtype=dtype)
