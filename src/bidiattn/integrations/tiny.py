"""Tiny random-weight Gemma-3, Gemma-4 and PaliGemma(2) models built from local configs, with
real (tiny) vision and audio towers, and multimodal example inputs for them: token ids, token
types and, for the towers, pixel values and audio features in the processors' formats (no
download; used by ``bidiattn verify`` and the tests)."""

from __future__ import annotations

import math
import random

import torch

from .transformers import _transformers

from ..families import BUILTIN, Family, family_of_model_type
from ..families import family as family_record

__all__ = ["TINY_MODELS", "TINY_WINDOW", "build_tiny", "tiny_names", "family_of", "token_type_key", "example_inputs", "token_types",
           "tokens_per_image"]

def tiny_names(families: tuple[Family, ...] = BUILTIN) -> tuple[str, ...]:
    """The tiny models the family records define."""
    return tuple(name for record in families for name in record.tiny)


TINY_MODELS = tiny_names()
TINY_WINDOW = 6
_AUDIO_MEL_BINS = 32  # the tiny Gemma-4 audio tower's input features


def _recipe(name: str, families: tuple[Family, ...]):
    for record in families:
        if name in record.tiny:
            return record.tiny[name]
    raise ValueError(f"unknown tiny model {name!r}; expected one of {tiny_names(families)}")


def build_tiny(name: str, seed: int = 0, attn_implementation: str = "eager", num_layers: int | None = None,
               families: tuple[Family, ...] = BUILTIN):
    """A tiny model (a family record's :class:`~bidiattn.families.TinyRecipe`) with weights drawn
    from ``seed``: ``num_layers`` language-model layers, sliding and full in turn (default: the
    recipe's, two; four for ``tiny-gemma4-e2b``, whose last two reuse the first two's K/V as
    E2B/E4B do), and one-layer vision (and, for Gemma-4, audio) towers."""
    recipe = _recipe(name, families)
    if num_layers is None:
        num_layers = recipe.layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2 or num_layers % 2:
        raise ValueError(f"num_layers must be an even int >= 2, got {num_layers!r}")
    tf = _transformers()
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=TINY_WINDOW,
                layer_types=["sliding_attention", "full_attention"] * (num_layers // 2))
    cfg, cls = recipe.build(tf, text)
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


def family_of(model, families: tuple[Family, ...] = BUILTIN) -> Family:
    """The family record of a loaded model, from its ``model_type``."""
    record = family_of_model_type(model.config.model_type, families)
    if record is None:
        known = sorted(t for f in families for t in f.model_types)
        raise ValueError(f"bidiattn has no family for model_type={model.config.model_type!r}; known: {known}")
    return record


def token_type_key(family: str | Family) -> str:
    """The forward() argument that carries token types for a family."""
    return family_record(family).token_type_argument


def token_types(family: str | Family, layout: list[tuple[str, int]]) -> list[int]:
    """Token types of a layout ``[(kind, n), ...]`` as the model's processor writes them (the
    family's ``layout_types``; a prefix block, PaliGemma's, must come first)."""
    family = family_record(family)
    out = []
    for kind, n in layout:
        if kind not in family.layout_types:
            raise ValueError(f"{family.name} models have no {kind!r} input; layout kinds here: "
                             f"{sorted(family.layout_types)}")
        value = family.layout_types[kind]
        if family.prefix_block and value in family.block_types and out and out[-1] not in family.block_types:
            raise ValueError(f"{family.name}'s prefix (images and prefix text) must come before the text; got {layout}")
        out += [value] * n
    return out


def tokens_per_image(model) -> int | None:
    """Soft tokens of one image for a model whose vision tower gives a fixed count (SigLIP:
    Gemma-3, PaliGemma); ``None`` for Gemma-4, whose tower gives one token per pooled patch of an
    image of any size."""
    cfg = model.config
    if hasattr(cfg.vision_config, "pooling_kernel_size"):
        return None
    if hasattr(cfg, "mm_tokens_per_image"):
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
    if any(kind == "video" for kind, _ in layout) and getattr(cfg, "video_token_id", None) is None:
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


def example_inputs(model, layout: list[tuple[str, int]], batch: int = 2, seed: int = 0, pixels: bool = False,
                   families: tuple[Family, ...] = BUILTIN) -> dict:
    """Inputs for ``layout`` (the same in every batch row), random from ``seed``: input_ids
    (soft-token positions hold the model's placeholder ids), an all-ones attention mask and
    token types as the processor writes them.

    With ``pixels``: also random pixel values for every image segment (and, for Gemma-4, audio
    features for every audio segment) in the processor's format, so the model runs its real
    vision (audio) tower and places its outputs at the placeholders; an image segment must then
    have the tower's token count (:func:`tokens_per_image`). Video segments stay placeholders
    (embedded as the placeholder token). Without ``pixels`` every soft token is a placeholder:
    the attention mask is the same, the towers do not run. ``families``: the records that know
    the model (default the built-in ones)."""
    family = family_of(model, families)
    types = torch.tensor(token_types(family, layout))
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    rng = random.Random(seed)
    soft = [kind for kind, n in layout for _ in range(n)]
    video = "video" if getattr(cfg, "video_token_id", None) is not None else "image"
    specials = {kind: _placeholder(cfg, video if kind == "video" else kind)
                for kind in set(soft) if kind in ("image", "video", "audio")}
    # Text tokens never hold a special token (placeholders, begin/end of image or audio).
    reserved = set(specials.values()) | {v for k, v in vars(cfg).items()
                                         if k.endswith(("_token_id", "_token_index")) and isinstance(v, int)}
    rows = []
    for _ in range(batch):
        ids = []
        for kind in soft:
            if kind in specials:
                ids.append(specials[kind])
                continue
            token = rng.randrange(10, vocab)
            while token in reserved:
                token = rng.randrange(10, vocab)
            ids.append(token)
        rows.append(torch.tensor(ids))
    input_ids = torch.stack(rows)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
           token_type_key(family): types.expand(batch, -1).clone()}
    if pixels:
        out.update(_pixel_inputs(model, layout, batch, torch.Generator().manual_seed(seed)))
    return out
