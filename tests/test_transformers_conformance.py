"""rules.build(convention="transformers") against the masks transformers' own models create.

Tiny random-weight Gemma-3, Gemma-4 and PaliGemma(2) models (bidiattn.integrations.tiny); a
forward pre-hook on every attention layer captures the mask transformers passes to it.
"""

from __future__ import annotations

import random

import pytest
import torch

from bidiattn import rules

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'bidiattn[hf]')")

from bidiattn.integrations.tiny import TINY_WINDOW as WINDOW  # noqa: E402
from bidiattn.integrations.tiny import build_tiny  # noqa: E402

T = 40
BATCH = 4
LAYOUTS_PER_FAMILY = 30


def build_model(family):
    """A tiny model of the family, its language model and its layer types."""
    model = build_tiny(f"tiny-{family}")
    text = model.model.language_model
    layer_types = [("sliding" if t == "sliding_attention" else "full") for t in text.config.layer_types]
    assert set(layer_types) == {"sliding", "full"}
    return model, text, layer_types


def random_token_types(family, rng):
    """Per family, token types as the model's processor writes them."""
    if family == "paligemma":
        prefix = rng.randint(1, T - 1)
        return [0] * prefix + [1] * (T - prefix)
    kinds = (1,) if family == "gemma3" else (1, 2)
    out = []
    while len(out) < T:
        n = rng.choice([1, 2, 3, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW + 3])
        out += [rng.choice(kinds) if rng.random() < 0.5 else 0] * n
    return out[:T]


@pytest.mark.parametrize("family", ["gemma3", "gemma4", "paligemma"])
def test_transformers_convention_matches_transformers_masks(family):
    model, text, layer_types = build_model(family)
    captured = {}
    for i, layer in enumerate(text.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: captured.__setitem__(i, kwargs["attention_mask"]), with_kwargs=True
        )
    rng = random.Random(hash(family) % 1000)
    type_key = "mm_token_type_ids" if family == "gemma4" else "token_type_ids"
    long_blocks = 0
    for _ in range(LAYOUTS_PER_FAMILY):
        tt = torch.tensor([random_token_types(family, rng) for _ in range(BATCH)])
        captured.clear()
        with torch.no_grad():
            model(input_ids=torch.randint(10, 60, (BATCH, T)), attention_mask=torch.ones(BATCH, T, dtype=torch.long),
                  **{type_key: tt})
        # Pack the batch as varlen sequences: one build covers all of them.
        cu = torch.arange(0, (BATCH + 1) * T, T)
        block_ids = rules.block_ids_from_token_types(tt.flatten(), family=family, convention="transformers", cu_seqlens=cu)
        sizes = torch.bincount(block_ids.long())[1:]
        long_blocks += int((sizes > WINDOW).sum())
        for i, layer in enumerate(layer_types):
            spans = rules.build(family, "transformers", layer, block_ids=block_ids, window=WINDOW, cu_seqlens=cu)
            dense = spans.to_dense()
            theirs = captured[i][:, 0] == 0
            for b in range(BATCH):
                mine = dense[b * T : (b + 1) * T, b * T : (b + 1) * T]
                assert torch.equal(mine, theirs[b]), (family, layer, tt[b].tolist())
    assert long_blocks > 0, "no layout had a block longer than the window"
