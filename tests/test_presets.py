"""Presets are consistent with the rules they name."""

import pytest
import torch

from bidiattn import presets, rules


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_builds_masks_for_each_layer_type(name):
    p = presets.get_preset(name)
    types = p.layer_types()
    assert len(types) == p.num_layers and set(types) <= set(rules.LAYERS)
    assert p.q_heads % p.kv_heads_sliding == 0 and p.q_heads % p.kv_heads_full == 0
    assert p.bidirectional_images == (p.family != "causal")
    block_ids = torch.tensor([0] * 3 + [1] * p.tokens_per_image + [0] * 2)
    for layer in set(types):
        for convention in rules.CONVENTIONS:
            spans = rules.build(p.family, convention, layer, block_ids=block_ids, window=p.sliding_window)
            assert spans.total_tokens == block_ids.numel()


def test_gemma4_small_models_are_causal_and_large_ones_bidirectional():
    assert presets.get_preset("gemma-4-e2b").family == "causal"
    assert presets.get_preset("gemma-4-e4b").family == "causal"
    assert presets.get_preset("gemma-4-31b").family == "gemma4"
    assert presets.get_preset("gemma-4-31b").head_dim_full == 512


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gemma-2'; known: gemma-3-4b"):
        presets.get_preset("gemma-2")
