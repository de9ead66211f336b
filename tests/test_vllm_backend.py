"""The vLLM backend classes against vLLM's own: registration in vLLM's registry, its
configuration checks, a KV cache made by vLLM's own view code, and the impl's KV write and
attention driven through vLLM's ``CommonAttentionMetadata`` (TRITON_INTERPRET=1 on CPU).

Skipped where vLLM is not importable: it pins its own CUDA torch build, so CI's CPU
environment never installs it (the step logic is tested without it in test_vllm_step.py). To
run these on a CPU machine, install the vllm wheel with ``--no-deps`` into a separate
environment and put its site-packages on ``PYTHONPATH`` (see the vLLM section of README.md).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
pytest.importorskip("vllm", reason="vLLM is not installed (it pins a CUDA torch build; CI runs without it)")

from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends import registry  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

import bidiattn.integrations.vllm as bidiattn_vllm  # noqa: E402
from bidiattn import SpanMask, reference, rules  # noqa: E402
from bidiattn.integrations.vllm.backend import BidiattnBackend, BidiattnImpl, BidiattnMetadataBuilder  # noqa: E402
from bidiattn.integrations.vllm.step import StepMetadata  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, D, W = 4, 2, 32, 7


def test_registered_backend_resolves_through_vllms_registry():
    name = bidiattn_vllm.register()
    assert name == ("BIDIATTN" if callable(getattr(registry.AttentionBackendEnum, "register", None)) else "CUSTOM")
    assert bidiattn_vllm.register() == name
    assert BidiattnBackend.get_name() == name == bidiattn_vllm.registered_name()
    assert registry.AttentionBackendEnum[name].get_class() is BidiattnBackend
    from vllm.config.attention import AttentionConfig

    assert AttentionConfig(backend=name).backend is registry.AttentionBackendEnum[name]  # --attention-backend


def _validate(**overrides):
    from vllm.platforms.interface import DeviceCapability

    args = dict(head_size=256, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                has_sink=False, use_sparse=False, use_mm_prefix=True, use_per_head_quant_scales=False,
                device_capability=DeviceCapability(9, 0), attn_type=AttentionType.DECODER, has_sliding_window=True)
    return BidiattnBackend.validate_configuration(**{**args, **overrides})


def test_vllm_accepts_the_backend_for_these_models_and_refuses_what_it_cannot_run():
    assert _validate() == []  # mm prefix, sliding window, hd256
    assert _validate(head_size=512, dtype=torch.float16, block_size=64) == []  # Gemma-4 full layers
    reasons = _validate(kv_cache_dtype="fp8")
    assert "kv_cache_dtype not supported" in reasons and any("'fp8'" in r for r in reasons)
    assert any("head size 72" in r for r in _validate(head_size=72))
    assert any("torch.float32" in r for r in _validate(dtype=torch.float32))
    assert _validate(attn_type=AttentionType.ENCODER_ONLY)
    assert BidiattnBackend.supports_mm_prefix() and BidiattnBackend.supports_sliding_window()
    assert BidiattnBackend.get_supported_kernel_block_sizes() == [16, 32, 64]
    spec = FullAttentionSpec(block_size=16, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
    support = BidiattnMetadataBuilder.get_cudagraph_support(None, spec)
    assert support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_impl(**kwargs):
    args = dict(num_heads=HQ, head_size=D, scale=D**-0.5, num_kv_heads=HKV, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto", logits_soft_cap=None)
    with default_dtype(torch.float16):  # vLLM builds layers under the model dtype
        return BidiattnImpl(**{**args, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_cache_dtype="fp8"), r"kv_cache_dtype 'fp8'"),
    (dict(head_size=72), r"head size 72"),
    (dict(alibi_slopes=[1.0] * HQ), r"ALiBi"),
    (dict(sinks=torch.zeros(HQ)), r"sinks"),
    (dict(attn_type=AttentionType.ENCODER_ONLY), r"attention type"),
])
def test_impl_refuses_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_impl(**kwargs)


def vllm_cache(num_blocks, block_size):
    """One layer's cache through vLLM's own view code: 0.26's ``_reshape_attention_kv_cache``
    (shape and stride order from the backend), or 0.30+'s ``create_kv_cache_views`` (the
    layout the backend declares, one layer-outermost tensor)."""
    import vllm.v1.kv_cache_interface as kvi

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
    page = spec.page_size_bytes
    raw = torch.zeros(num_blocks * page, dtype=torch.int8, device=DEVICE)
    if hasattr(kvi, "create_kv_cache_views"):
        layout = BidiattnBackend.supported_kv_cache_layouts()[0]
        tensor = kvi.KVCacheTensor(size=raw.numel(), layers=["layer"], layer_stride=raw.numel(), block_stride=page)
        return kvi.create_kv_cache_views(raw, spec, num_blocks, layout, tensor)[0]
    from vllm.v1.worker.gpu.attn_utils import _reshape_attention_kv_cache

    shape = BidiattnBackend.get_kv_cache_shape(num_blocks, block_size, HKV, D)
    return _reshape_attention_kv_cache(raw, spec, shape, BidiattnBackend.get_kv_cache_stride_order(), num_blocks,
                                       None)


def fake_vllm_config(layers, max_model_len=64):
    text = SimpleNamespace(model_type="gemma3_text", sliding_window=W)
    model = SimpleNamespace(hf_config=SimpleNamespace(model_type="gemma3", mm_tokens_per_image=5), hf_text_config=text,
                            max_model_len=max_model_len)
    return SimpleNamespace(model_config=model,
                           scheduler_config=SimpleNamespace(max_num_seqs=8, max_num_batched_tokens=128),
                           compilation_config=SimpleNamespace(static_forward_context=layers),
                           parallel_config=SimpleNamespace(decode_context_parallel_size=1), speculative_config=None)


def test_builders_of_one_engine_share_a_step_builder():
    # One builder per KV-cache group (Gemma-4-31B's 5:1 pattern: six groups), all fed the same
    # layout each step: they share one StepBuilder over the engine's layer kinds, which builds a
    # step once (tests/test_vllm_step.py); a second engine has its own; with dual-batch overlap
    # (one builder per micro-batch, different layouts) each builder keeps its own.
    def engine(dbo=False):
        impls = {f"model.layers.{i}.self_attn.attn": make_impl(sliding_window=None if i == 5 else W)
                 for i in range(6)}
        layers = {name: SimpleNamespace(impl=impl) for name, impl in impls.items()}
        config = fake_vllm_config(layers)
        config.parallel_config.enable_dbo = dbo
        spec = FullAttentionSpec(block_size=16, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
        return [BidiattnMetadataBuilder(spec, [name], config, torch.device(DEVICE)) for name in layers]

    builders = engine()
    assert all(b.step is builders[0].step for b in builders)
    assert {k.layer for k in builders[0].step.kinds} == {"full", "sliding"}
    other = engine()
    assert other[0].step is not builders[0].step
    alone = engine(dbo=True)
    assert len({id(b.step) for b in alone}) == 6 and {k.layer for k in alone[0].step.kinds} == {"sliding"}
    # vLLM's update_block_table hook (groups of one spec after the first): on, except under
    # dual-batch overlap, where vLLM's cache of built metadata mixes the micro-batches.
    assert all(b.supports_update_block_table for b in builders + other)
    assert not any(b.supports_update_block_table for b in alone)


@pytest.mark.parametrize("block_size", [16, 32])
def test_impl_writes_and_attends_through_vllm_metadata(block_size):
    impls = {"model.layers.0.self_attn.attn": make_impl(sliding_window=W),
             "model.layers.1.self_attn.attn": make_impl()}
    layers = {name: SimpleNamespace(impl=impl, _k_scale=torch.ones((), device=DEVICE),
                                    _v_scale=torch.ones((), device=DEVICE))
              for name, impl in impls.items()}
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
    builder = BidiattnMetadataBuilder(spec, list(layers), fake_vllm_config(layers), torch.device(DEVICE))
    assert {k.layer for k in builder.step.kinds} == {"full", "sliding"}
    # Two requests: a chunk from position 6 to 20 holding a 5-token image, and a decode row.
    lengths, firsts, images = [20, 13], [6, 12], {0: [(8, 12)], 1: [(2, 6)]}
    num_blocks = 8
    table = torch.tensor([[3, 5, 0], [6, 1, 0]] + [[0, 0, 0]] * 2, dtype=torch.int32, device=DEVICE)
    caches = {name: vllm_cache(num_blocks, block_size) for name in layers}
    g = torch.Generator().manual_seed(block_size)
    ks = [torch.randn(n, HKV, D, generator=g).half() for n in lengths]
    vs = [torch.randn(n, HKV, D, generator=g).half() for n in lengths]
    q = torch.randn(sum(n - f for n, f in zip(lengths, firsts)), HQ, D, generator=g).half()

    def slots(b, positions):
        return [int(table[b, p // block_size]) * block_size + p % block_size for p in positions]

    for name, impl in impls.items():  # earlier steps' keys
        for b in range(2):
            impl.do_kv_cache_update(layers[name], ks[b][: firsts[b]].to(DEVICE), vs[b][: firsts[b]].to(DEVICE),
                                    caches[name], torch.tensor(slots(b, range(firsts[b])), device=DEVICE))
    cu = torch.tensor([0, 14, 15, 15], dtype=torch.int32)  # a third, padded request (no rows, no keys)
    seq = torch.tensor([20, 13, 0], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=cu.to(DEVICE), query_start_loc_cpu=cu, seq_lens=seq.to(DEVICE), num_reqs=3,
        num_actual_tokens=15, max_query_len=14, max_seq_len=20, block_table_tensor=table[:3],
        slot_mapping=torch.tensor(slots(0, range(6, 20)) + slots(1, [12]), device=DEVICE),
        seq_lens_cpu_upper_bound=seq, mm_req_doc_ranges=images)
    meta = builder.build(0, cm)
    assert isinstance(meta, StepMetadata)
    # Another group's metadata through vLLM's hook: the step's, with that group's tables.
    other_slots = cm.slot_mapping + 1
    other = builder.update_block_table(meta, table, other_slots)
    assert other.layout is meta.layout and other._prepared is meta._prepared
    assert other.block_table.shape == (3, 3) and other.slot_mapping is other_slots
    new_k = torch.cat([ks[0][6:], ks[1][12:]]).to(DEVICE)
    new_v = torch.cat([vs[0][6:], vs[1][12:]]).to(DEVICE)
    for layer_type, (name, impl) in zip(("sliding", "full"), impls.items()):
        impl.do_kv_cache_update(layers[name], new_k, new_v, caches[name], cm.slot_mapping)
        out = torch.full((16, HQ, D), float("nan"), dtype=torch.float16, device=DEVICE)  # vLLM pads rows
        got = impl.forward(layers[name], q.to(DEVICE), new_k, new_v, caches[name], meta, output=out)
        assert got is out
        row = 0
        for b, (n, f) in enumerate(zip(lengths, firsts)):
            ids = torch.zeros(n, dtype=torch.int64)
            for s, e in images[b]:
                ids[s : e + 1] = 1
            whole = rules.build("gemma3", "official", layer_type, block_ids=ids, window=W)
            spans = SpanMask(whole.lo[f:], whole.hi[f:], cu_seqlens_k=torch.tensor([0, n]), total_keys=n)
            want = reference.attention(q[row : row + n - f].float(), ks[b].float(), vs[b].float(), spans,
                                       scale=D**-0.5)
            torch.testing.assert_close(out[row : row + n - f].float().cpu(), want, atol=2e-3, rtol=2e-3)
            row += n - f
        assert torch.isnan(out[15:]).all()
    assert torch.all(impls["model.layers.1.self_attn.attn"].forward(None, q, None, None, torch.empty(0), None,
                                                                  output=torch.ones(2)) == 0)  # profiling run
