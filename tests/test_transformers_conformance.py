"""rules.build(convention="transformers") against the masks transformers' own models create.

Tiny random-weight Gemma-3, Gemma-4 and PaliGemma(2) models are built from local configs; a
forward pre-hook on every attention layer captures the mask transformers passes to it.
"""

from __future__ import annotations

import random

import pytest
import torch

from bidiattn import rules

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'bidiattn[hf]')")

WINDOW = 6
T = 40
BATCH = 4
LAYOUTS_PER_FAMILY = 30


def tiny_text(**extra):
    cfg = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
    )
    cfg.update(extra)
    return cfg


TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)


def build_model(family):
    if family == "gemma3":
        cfg = transformers.Gemma3Config(
            text_config=tiny_text(layer_types=["sliding_attention", "full_attention"]),
            vision_config=TINY_VISION, mm_tokens_per_image=4, image_token_index=5,
        )
        cls = transformers.Gemma3ForConditionalGeneration
    elif family == "gemma4":
        cfg = transformers.Gemma4Config(
            text_config=tiny_text(
                layer_types=["sliding_attention", "full_attention"], global_head_dim=16,
                use_bidirectional_attention="vision", hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=64, num_kv_shared_layers=0,
            ),
            vision_config=None, audio_config=None,
        )
        cls = transformers.Gemma4ForConditionalGeneration
    else:
        cfg = transformers.PaliGemmaConfig(
            text_config=tiny_text(model_type="gemma2"), vision_config=TINY_VISION, image_token_index=5, projection_dim=32,
        )
        cls = transformers.PaliGemmaForConditionalGeneration
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
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
