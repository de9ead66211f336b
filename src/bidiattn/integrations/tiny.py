"""Tiny random-weight Gemma-3, Gemma-4 and PaliGemma(2) models built from local configs, and a
multimodal example input for them (no download; used by ``bidiattn verify`` and the tests)."""

from __future__ import annotations

import random

import torch

from .transformers import _transformers

__all__ = ["TINY_MODELS", "TINY_WINDOW", "build_tiny", "family_of", "token_type_key", "example_inputs", "token_types"]

TINY_MODELS = ("tiny-gemma3", "tiny-gemma4", "tiny-paligemma")
TINY_WINDOW = 6
_TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)


def _tiny_text(**extra) -> dict:
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, sliding_window=TINY_WINDOW)
    cfg.update(extra)
    return cfg


def build_tiny(name: str, seed: int = 0, attn_implementation: str = "eager", num_layers: int = 2):
    """A tiny model (``num_layers`` layers, sliding and full in turn, two by default) with
    weights drawn from ``seed``."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2 or num_layers % 2:
        raise ValueError(f"num_layers must be an even int >= 2, got {num_layers!r}")
    tf = _transformers()
    kinds = ["sliding_attention", "full_attention"] * (num_layers // 2)
    if name == "tiny-gemma3":
        cfg = tf.Gemma3Config(text_config=_tiny_text(layer_types=kinds, num_hidden_layers=num_layers),
                              vision_config=_TINY_VISION, mm_tokens_per_image=4, image_token_index=5)
        cls = tf.Gemma3ForConditionalGeneration
    elif name == "tiny-gemma4":
        cfg = tf.Gemma4Config(
            text_config=_tiny_text(layer_types=kinds, num_hidden_layers=num_layers, global_head_dim=16,
                                   use_bidirectional_attention="vision", hidden_size_per_layer_input=0,
                                   vocab_size_per_layer_input=64, num_kv_shared_layers=0),
            vision_config=None, audio_config=None)
        cls = tf.Gemma4ForConditionalGeneration
    elif name == "tiny-paligemma":
        cfg = tf.PaliGemmaConfig(text_config=_tiny_text(model_type="gemma2", num_hidden_layers=num_layers), vision_config=_TINY_VISION,
                                 image_token_index=5, projection_dim=32)
        cls = tf.PaliGemmaForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {TINY_MODELS}")
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return cls(cfg).eval()


def family_of(model) -> str:
    """Rule family of a loaded model from its top-level ``model_type``."""
    model_type = model.config.model_type
    for family in ("gemma3", "gemma4", "paligemma"):
        if model_type.startswith(family):
            return family
    raise ValueError(f"bidiattn verify supports Gemma-3, Gemma-4 and PaliGemma models, got model_type={model_type!r}")


def token_type_key(family: str) -> str:
    """The forward() argument that carries token types for a family."""
    return "mm_token_type_ids" if family == "gemma4" else "token_type_ids"


def token_types(family: str, layout: list[tuple[str, int]]) -> list[int]:
    """Token types of a layout ``[(kind, n), ...]`` as the model's processor writes them.

    Kinds: ``text``, ``image``, ``video`` and, for PaliGemma, ``prefix`` (prompt text inside the
    bidirectional prefix). Gemma-3: image 1; Gemma-4: image 1, video 2; PaliGemma: images and
    prefix 0, text (the suffix) 1, and the prefix must come first.
    """
    if family == "paligemma":
        out = []
        for kind, n in layout:
            if kind != "text" and out and out[-1] == 1:
                raise ValueError(f"PaliGemma's prefix (images and prefix text) must come before the text; got {layout}")
            out += [1 if kind == "text" else 0] * n
        return out
    values = {"image": 1, "video": 2 if family == "gemma4" else 1, "text": 0, "prefix": 0}
    return [values[kind] for kind, n in layout for _ in range(n)]


def example_inputs(model, layout: list[tuple[str, int]], batch: int = 2, seed: int = 0) -> dict:
    """input_ids (image positions hold the image placeholder id), an all-ones attention mask and
    token types for ``layout``; random text tokens from ``seed``."""
    family = family_of(model)
    types = torch.tensor(token_types(family, layout))
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    vocab = cfg.get_text_config().vocab_size
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        ids = torch.tensor([rng.randrange(10, vocab) for _ in range(len(types))])
        if image_id is not None:
            ids = torch.where(ids == image_id, ids - 1, ids)  # text tokens never hold the placeholder
        is_image = torch.tensor([kind in ("image", "video") for kind, n in layout for _ in range(n)])
        if image_id is not None:
            ids = torch.where(is_image, torch.tensor(image_id), ids)
        rows.append(ids)
    input_ids = torch.stack(rows)
    types = types.expand(batch, -1).clone()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), token_type_key(family): types}
