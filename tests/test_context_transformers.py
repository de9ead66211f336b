"""Context parallelism through the transformers drop-in: a tiny Gemma-3 language model run on 2
gloo ranks (each its rows, ``model(..., bidiattn_context=shards)``) gives every rank's logits and,
summed over the ranks, the parameter gradients of the one-process model run with the rule's dense
masks (eager attention, fp32).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from bidiattn import rules
from conftest import run_ranks

pytest.importorskip("transformers", reason="transformers is not installed")

T, WINDOW = 37, 6


def _model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                           layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, T), generator=g)
    block_ids = torch.zeros(T, dtype=torch.int64)
    block_ids[8:22] = 1  # longer than the window: the official and transformers rules differ here
    block_ids[26:31] = 2
    weights = torch.randn(1, T, 64, generator=g)
    return ids, block_ids, weights


def _reference(convention: str):
    """Logits and parameter gradients of the one-process model with the rule's dense masks."""
    model = _model()
    model.set_attn_implementation("eager")
    ids, block_ids, weights = _inputs()
    masks = {}
    for kind, layer, window in (("full_attention", "full", None), ("sliding_attention", "sliding", WINDOW)):
        dense = rules.dense("gemma3", convention, layer, block_ids=block_ids, window=window)
        masks[kind] = torch.zeros(1, 1, T, T).masked_fill(~dense, torch.finfo(torch.float32).min)
    logits = model(input_ids=ids, attention_mask=masks).logits
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int) -> None:
    import bidiattn.integrations.transformers as bt
    from bidiattn.integrations.context_parallel import ContextShards

    bt.register()
    ids, block_ids, weights = _inputs()
    for convention in ("official", "transformers"):
        want_logits, want_grads = _reference(convention)
        model = _model()
        model.set_attn_implementation(f"bidiattn-{convention}")
        shards = ContextShards.build(block_ids, "gemma3", num_q_heads=4, convention=convention, tile=4)
        rows = shards.rows
        assert rows.stop > rows.start, shards.starts
        logits = model(input_ids=ids[:, rows], position_ids=torch.arange(T)[None, rows],
                       bidiattn_context=shards).logits
        torch.testing.assert_close(logits, want_logits[:, rows], rtol=1e-4, atol=1e-4)
        (logits * weights[:, rows]).sum().backward()
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-4, msg=f"{convention} {name}")
        assert {key[2] for key in shards.layer_plans} == {"full", "sliding"}


def test_two_ranks_equal_the_one_process_model():
    run_ranks(_worker, 2)


def test_shards_need_a_process_group_and_a_1d_sequence():
    from bidiattn.integrations.context_parallel import ContextShards

    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="initialized torch.distributed"):
            ContextShards.build(torch.zeros(10, dtype=torch.int64), "gemma3", num_q_heads=2)


def test_a_layer_call_outside_the_shard_is_refused():
    from bidiattn.integrations.context_parallel import ContextShards, context_layer

    shards = ContextShards(group=None, block_ids=torch.zeros(10, dtype=torch.int64), cu_seqlens=None,
                           starts=(0, 4, 10), rank=1)
    assert shards.rows == slice(4, 10)
    q, k = torch.zeros(2, 2, 6, 16), torch.zeros(2, 1, 6, 16)
    with pytest.raises(ValueError, match="batch size 1; got 2"):
        context_layer(shards, q, k, k, "gemma3", "official", "full", None, "reference", 0.25, None)
    with pytest.raises(ValueError, match=r"rows 4:10 \(6\); the layer got 5 queries"):
        context_layer(shards, q[:1, :, :5], k[:1], k[:1], "gemma3", "official", "full", None, "reference", 0.25, None)
    with pytest.raises(TypeError, match="bidiattn_context must be a ContextShards, got str"):
        context_layer("x", q, k, k, "gemma3", "official", "full", None, "reference", 0.25, None)
