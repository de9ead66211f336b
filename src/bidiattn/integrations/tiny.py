"""Tiny random-weight Gemma-3, Gemma-4 and PaliGemma(2) models built from local configs, with
real (tiny) vision and audio towers, and multimodal example inputs for them: token ids, token
types and, for the towers, pixel values and audio features in the processors' formats (no
download; used by ``bidiattn verify`` and the tests)."""

from __future__ import annotations

import math
import random

import torch

from .transformers import _transformers

__all__ = ["TINY_MODELS", "TINY_WINDOW", "build_tiny", "family_of", "token_type_key", "example_inputs", "token_types",
           "tokens_per_image"]

TINY_MODELS = ("tiny-gemma3", "tiny-gemma4", "tiny-gemma4-e2b", "tiny-paligemma")
TINY_WINDOW = 6
# SigLIP: 12x12 pixels in 4x4 patches = 9 soft tokens per image, longer than TINY_WINDOW.
_TINY_SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=12,
                    patch_size=4)
# Gemma-4's vision tower: 4x4-pixel patches pooled 2x2 into one soft token; any image size.
_TINY_GEMMA4_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=2,
                           position_embedding_size=128)
# Gemma-4's audio tower: 32 mel bins; two stride-2 convolutions give one soft token per 4 frames.
_TINY_GEMMA4_AUDIO = dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, output_proj_dims=16,
                          subsampling_conv_channels=[32, 4], attention_chunk_size=4, attention_context_left=5,
                          attention_context_right=0)
_AUDIO_MEL_BINS = 32
_GEMMA4_TOKEN_IDS = dict(image_token_id=5, video_token_id=6, audio_token_id=7, boi_token_id=8, eoi_token_id=9,
                         boa_token_id=3, eoa_token_index=4)


def _tiny_text(**extra) -> dict:
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, sliding_window=TINY_WINDOW)
    cfg.update(extra)
    return cfg


def build_tiny(name: str, seed: int = 0, attn_implementation: str = "eager", num_layers: int | None = None):
    """A tiny model with weights drawn from ``seed``: ``num_layers`` language-model layers,
    sliding and full in turn (default two; four for ``tiny-gemma4-e2b``, whose last two reuse
    the first two's K/V as E2B/E4B do), and one-layer vision (and, for Gemma-4, audio) towers.

    ``tiny-gemma4-e2b`` is Gemma-4 E2B/E4B-shaped: per-layer inputs, shared K/V layers, no
    bidirectional image attention (``use_bidirectional_attention`` unset: images are causal)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {TINY_MODELS}")
    if num_layers is None:
        num_layers = 4 if name == "tiny-gemma4-e2b" else 2
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2 or num_layers % 2:
        raise ValueError(f"num_layers must be an even int >= 2, got {num_layers!r}")
    tf = _transformers()
    kinds = ["sliding_attention", "full_attention"] * (num_layers // 2)
    if name == "tiny-gemma3":
        cfg = tf.Gemma3Config(text_config=_tiny_text(layer_types=kinds, num_hidden_layers=num_layers),
                              vision_config=_TINY_SIGLIP, mm_tokens_per_image=9, image_token_index=5)
        cls = tf.Gemma3ForConditionalGeneration
    elif name.startswith("tiny-gemma4"):
        text = dict(layer_types=kinds, num_hidden_layers=num_layers, global_head_dim=16, vocab_size_per_layer_input=64)
        if name == "tiny-gemma4":
            text.update(use_bidirectional_attention="vision", hidden_size_per_layer_input=0, num_kv_shared_layers=0)
        else:
            if num_layers < 4:
                raise ValueError(f"tiny-gemma4-e2b shares K/V across layers and needs num_layers >= 4, got {num_layers}")
            text.update(use_bidirectional_attention=None, hidden_size_per_layer_input=8,
                        num_kv_shared_layers=num_layers // 2)
        cfg = tf.Gemma4Config(text_config=_tiny_text(**text), vision_config=_TINY_GEMMA4_VISION,
                              audio_config=_TINY_GEMMA4_AUDIO, **_GEMMA4_TOKEN_IDS)
        cls = tf.Gemma4ForConditionalGeneration
    else:
        cfg = tf.PaliGemmaConfig(text_config=_tiny_text(model_type="gemma2", num_hidden_layers=num_layers),
                                 vision_config=_TINY_SIGLIP, image_token_index=5, projection_dim=32)
        cls = tf.PaliGemmaForConditionalGeneration
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        # The models' own init leaves some weights at zero (Gemma-3's image projection among
        # them: images would not reach the language model); every weight random instead.
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model


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

    Kinds: ``text``, ``image``, ``video``, ``audio`` (Gemma-4) and, for PaliGemma, ``prefix``
    (prompt text inside the bidirectional prefix). Gemma-3: image 1; Gemma-4: image 1, video 2,
    audio 3; PaliGemma: images and prefix 0, text (the suffix) 1, and the prefix must come first.
    """
    if family == "paligemma":
        out = []
        for kind, n in layout:
            if kind == "audio" or kind == "video":
                raise ValueError(f"PaliGemma has no {kind} input; got {layout}")
            if kind != "text" and out and out[-1] == 1:
                raise ValueError(f"PaliGemma's prefix (images and prefix text) must come before the text; got {layout}")
            out += [1 if kind == "text" else 0] * n
        return out
    values = {"image": 1, "video": 2 if family == "gemma4" else 1, "text": 0, "prefix": 0}
    if family == "gemma4":
        values["audio"] = 3
    for kind, _ in layout:
        if kind not in values:
            raise ValueError(f"{family} models have no {kind!r} input; layout kinds here: {sorted(values)}")
    return [values[kind] for kind, n in layout for _ in range(n)]


def tokens_per_image(model) -> int | None:
    """Soft tokens of one image for a model whose vision tower gives a fixed count (SigLIP:
    Gemma-3, PaliGemma); ``None`` for Gemma-4, whose tower gives one token per pooled patch of an
    image of any size."""
    cfg = model.config
    if cfg.model_type.startswith("gemma4"):
        return None
    if cfg.model_type.startswith("gemma3"):
        return int(cfg.mm_tokens_per_image)
    vision = cfg.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def _placeholder(cfg, kind: str) -> int:
    """The token id a processor writes at each soft token of ``kind``."""
    name = {"image": "image_token_id", "video": "video_token_id", "audio": "audio_token_id"}[kind]
    value = getattr(cfg, name, None)
    if value is None and kind == "image":
        value = getattr(cfg, "image_token_index", None)
    if value is None:
        raise ValueError(f"{cfg.model_type} has no {kind} placeholder token ({name})")
    return int(value)


def _gemma4_image(n: int, cfg, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One image of ``n`` soft tokens as Gemma-4's image processor writes it: patches
    ``[P, 3 * patch**2]`` and their (x, y) positions ``[P, 2]``, the pooled grid as square as
    ``n`` allows."""
    vision = cfg.vision_config
    k = vision.pooling_kernel_size
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    h, w = rows * k, (n // rows) * k
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    patches = torch.rand(h * w, 3 * vision.patch_size**2, generator=gen)
    return patches, torch.stack([xs.flatten(), ys.flatten()], -1)


def _pixel_inputs(model, layout, batch: int, gen: torch.Generator) -> dict:
    """Random pixel values (and Gemma-4 audio features) for every image (audio) segment of every
    batch row, in the format the model's processor returns."""
    cfg = model.config
    if any(kind == "video" for kind, _ in layout) and not cfg.model_type.startswith("gemma4"):
        raise ValueError(f"{cfg.model_type}: video segments are images to this model; write them as image segments")
    images = [n for kind, n in layout if kind == "image"] * batch
    clips = [n for kind, n in layout if kind == "audio"] * batch
    out = {}
    if images and getattr(cfg, "vision_config", None) is None:
        raise ValueError(f"{cfg.model_type} has no vision tower for the layout's images")
    fixed = tokens_per_image(model)
    if images and fixed is not None:
        bad = sorted({n for n in images if n != fixed})
        if bad:
            raise ValueError(f"this model's vision tower gives {fixed} tokens per image; the layout has images of {bad}")
        size = cfg.vision_config.image_size
        out["pixel_values"] = torch.rand(len(images), 3, size, size, generator=gen) * 2 - 1
    elif images:
        parts = [_gemma4_image(n, cfg, gen) for n in images]
        longest = max(p.shape[0] for p, _ in parts)
        pixels = torch.zeros(len(parts), longest, parts[0][0].shape[1])
        positions = torch.full((len(parts), longest, 2), -1, dtype=torch.long)
        for i, (p, xy) in enumerate(parts):
            pixels[i, : p.shape[0]], positions[i, : p.shape[0]] = p, xy
        out.update(pixel_values=pixels, image_position_ids=positions)
    if clips:
        if getattr(cfg, "audio_config", None) is None:
            raise ValueError(f"{cfg.model_type} has no audio tower for the layout's audio")
        frames = 4 * max(clips)  # the tower's two stride-2 convolutions: one token per 4 frames
        features = torch.randn(len(clips), frames, _AUDIO_MEL_BINS, generator=gen)
        valid = torch.arange(frames)[None, :] < 4 * torch.tensor(clips)[:, None]
        out.update(input_features=features * valid[..., None], input_features_mask=valid)
    return out


def example_inputs(model, layout: list[tuple[str, int]], batch: int = 2, seed: int = 0, pixels: bool = False) -> dict:
    """Inputs for ``layout`` (the same in every batch row), random from ``seed``: input_ids
    (soft-token positions hold the model's placeholder ids), an all-ones attention mask and
    token types as the processor writes them.

    With ``pixels``: also random pixel values for every image segment (and, for Gemma-4, audio
    features for every audio segment) in the processor's format, so the model runs its real
    vision (audio) tower and places its outputs at the placeholders; an image segment must then
    have the tower's token count (:func:`tokens_per_image`). Video segments stay placeholders
    (embedded as the placeholder token). Without ``pixels`` every soft token is a placeholder:
    the attention mask is the same, the towers do not run."""
    family = family_of(model)
    types = torch.tensor(token_types(family, layout))
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    rng = random.Random(seed)
    soft = [kind for kind, n in layout for _ in range(n)]
    specials = {kind: _placeholder(cfg, kind if family == "gemma4" else "image")
                for kind in set(soft) if kind in ("image", "video", "audio")}
    reserved = set(specials.values()) | {v for k, v in _GEMMA4_TOKEN_IDS.items() if family == "gemma4"}
    rows = []
    for _ in range(batch):
        ids = []
        for kind in soft:
            if kind in specials:
                ids.append(specials[kind])
                continue
            token = rng.randrange(10, vocab)
            while token in reserved:  # text tokens never hold a placeholder
                token = rng.randrange(10, vocab)
            ids.append(token)
        rows.append(torch.tensor(ids))
    input_ids = torch.stack(rows)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
           token_type_key(family): types.expand(batch, -1).clone()}
    if pixels:
        out.update(_pixel_inputs(model, layout, batch, torch.Generator().manual_seed(seed)))
    return out
