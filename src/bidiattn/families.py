"""Model families: everything bidiattn knows about one family, in one record.

A :class:`Family` holds the family's rule rows (one :class:`Rule` per convention and layer
kind), the token types its processor writes and which of them form bidirectional blocks, and
how transformers names it (text model types, the forward argument carrying token types, its
vision/audio encoders and the attention they keep). :mod:`bidiattn.rules`, the transformers
integration, :mod:`bidiattn.integrations.tiny`, ``bidiattn verify`` and the CLI all read these
records; adding an integrated model is one record here plus its conformance test.

Functions that take a family accept its name (one of :data:`FAMILIES`) or a record, so a
family that is not built in (a new model, a test's made-up one) works without registering it
anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = ["CONVENTIONS", "LAYERS", "Rule", "Family", "TinyRecipe", "BUILTIN", "FAMILIES", "family",
           "family_of_model_type", "as_families"]

CONVENTIONS = ("official", "transformers", "vllm")
LAYERS = ("full", "sliding")


@dataclass(frozen=True)
class Rule:
    """One row of the rule table, in a form both the span builder and the dense spec read.

    - ``blocks``: ``"none"`` (blocks ignored), ``"all"`` (``blk``), ``"short"`` (``blk'``: only
      blocks of at most ``W`` tokens).
    - ``window``: ``"none"``, ``"left"`` (``win_left``) or ``"sym"`` (``win_sym``).
    - ``window_scope``: ``"all"`` applies the window after the OR, ``(c ∨ blk) ∧ win``;
      ``"causal"`` applies it to the causal part only, ``(c ∧ win) ∨ blk``.
    """

    blocks: Literal["none", "all", "short"]
    window: Literal["none", "left", "sym"]
    window_scope: Literal["all", "causal"] = "all"

    @property
    def needs_window(self) -> bool:
        return self.window != "none" or self.blocks == "short"

    def without_window(self) -> Rule:
        """The same blocks with no window: ``c ∨ blk`` (or ``c`` when blocks are ignored)."""
        return Rule(self.blocks, "none")


CAUSAL = Rule("none", "none")
CAUSAL_WINDOW = Rule("none", "left")


@dataclass(frozen=True)
class TinyRecipe:
    """A tiny random-weight model of a family (:func:`bidiattn.integrations.tiny.build_tiny`):
    ``build(transformers, text_config)`` adds the towers to the tiny language model's config
    (a dict with ``layers`` layers by default) and returns ``(config, model class)``."""

    build: Callable[[Any, dict], tuple[Any, type]]
    layers: int = 2


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, eq=False)
class Family:
    """One model family (see the module docstring). Records compare and hash by identity.

    - ``rules``: ``(convention, layer) -> Rule`` for every convention in :data:`CONVENTIONS` and
      layer in :data:`LAYERS` (checked when the record is made).
    - ``token_types``: token type -> its name, as the family's processor writes them; empty when
      the family reads no token types. ``block_types``: the types whose runs are blocks.
    - ``layout_types``: layout kind (``text``, ``image``, ``video``, ``audio``, ``prefix``, see
      :mod:`bidiattn.tools.layouts`) -> the token type written for it.
    - ``prefix_block``: the block is one run at each sequence's start (PaliGemma's prefix:
      image, BOS, prompt, separator); under ``vllm`` only image tokens are blocks there, which
      token types cannot tell.
    - ``model_types``: transformers ``model_type`` of the language model (text config) and of
      the whole model; ``token_type_argument``: the ``forward()`` argument carrying token types.
    - ``encoders``: the vision/audio encoders' ``model_type`` -> the attention implementation
      they keep when the language model runs bidiattn.
    - ``tiny``: tiny model name -> :class:`TinyRecipe`; ``verify_layout``: ``bidiattn verify``'s
      default layout, with ``{image}`` (tokens of a short image), ``{long}`` (an image longer
      than the window where the vision tower allows) and ``{audio}`` (an audio segment and a
      separator, empty without an audio tower).
    - ``source``: where the official rule comes from.
    """

    name: str
    rules: Mapping[tuple[str, str], Rule]
    token_types: Mapping[int, str] = field(default_factory=dict)
    block_types: tuple[int, ...] = ()
    layout_types: Mapping[str, int] = field(default_factory=dict)
    prefix_block: bool = False
    model_types: tuple[str, ...] = ()
    token_type_argument: str = "token_type_ids"
    encoders: Mapping[str, str] = field(default_factory=dict)
    tiny: Mapping[str, TinyRecipe] = field(default_factory=dict)
    verify_layout: str = ""
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a family needs a name, got {self.name!r}")
        missing = [(c, layer) for c in CONVENTIONS for layer in LAYERS if (c, layer) not in self.rules]
        if missing:
            raise ValueError(f"family {self.name!r} has no rule for (convention, layer) {missing}")
        bad = [key for key, rule in self.rules.items() if not isinstance(rule, Rule)]
        if bad:
            raise TypeError(f"family {self.name!r}: rules must map to Rule, not for {bad}")
        unknown = sorted((set(self.block_types) | set(self.layout_types.values())) - set(self.token_types))
        if unknown:
            raise ValueError(f"family {self.name!r}: types {unknown} are not among its token types")
        for name in ("rules", "token_types", "layout_types", "encoders", "tiny"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def rule(self, convention: str, layer: str) -> Rule:
        """The :class:`Rule` of a convention and layer kind; ``ValueError`` for unknown names."""
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}; expected one of {LAYERS}")
        return self.rules[convention, layer]

    def block_kinds(self, convention: str) -> tuple[str, ...]:
        """The layout kinds whose runs are bidirectional blocks under ``convention``."""
        if self.prefix_block and convention == "vllm":
            return tuple(k for k in ("image", "video") if k in self.layout_types)
        return tuple(k for k, v in self.layout_types.items() if v in self.block_types)


def _table(official_full: Rule, official_sliding: Rule, tf_full: Rule, tf_sliding: Rule, vllm_full: Rule,
           vllm_sliding: Rule) -> dict[tuple[str, str], Rule]:
    return {("official", "full"): official_full, ("official", "sliding"): official_sliding,
            ("transformers", "full"): tf_full, ("transformers", "sliding"): tf_sliding,
            ("vllm", "full"): vllm_full, ("vllm", "sliding"): vllm_sliding}


_SIGLIP = {"siglip_vision_model": "sdpa"}
# Tiny towers. SigLIP: 12x12 pixels in 4x4 patches = 9 soft tokens per image (longer than the
# tiny models' window, 6). Gemma-4 vision: 4x4-pixel patches pooled 2x2 into one soft token, any
# image size. Gemma-4 audio: 32 mel bins, one soft token per 4 frames.
_TINY_SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=12,
                    patch_size=4)
_TINY_GEMMA4_TOWERS = dict(
    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=2,
                       position_embedding_size=128),
    audio_config=dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, output_proj_dims=16,
                      subsampling_conv_channels=[32, 4], attention_chunk_size=4, attention_context_left=5,
                      attention_context_right=0),
    image_token_id=5, video_token_id=6, audio_token_id=7, boi_token_id=8, eoi_token_id=9, boa_token_id=3,
    eoa_token_index=4)
_IMAGES_LAYOUT = "text:5,image:{image},text:3,image:{long},text:4,{audio}image:{image},text:6"


def _tiny_gemma4(tf, text: dict, e2b: bool = False):
    """Gemma-4 with vision and audio towers; ``e2b``: E2B/E4B-shaped (per-layer inputs, the
    second half of the layers reusing the first half's K/V, images causal)."""
    n = text["num_hidden_layers"]
    if e2b and n < 4:
        raise ValueError(f"an E2B-shaped model shares K/V across layers and needs num_layers >= 4, got {n}")
    text = dict(text, global_head_dim=16, vocab_size_per_layer_input=64,
                use_bidirectional_attention=None if e2b else "vision", hidden_size_per_layer_input=8 if e2b else 0,
                num_kv_shared_layers=n // 2 if e2b else 0)
    return tf.Gemma4Config(text_config=text, **_TINY_GEMMA4_TOWERS), tf.Gemma4ForConditionalGeneration


CAUSAL_FAMILY = Family(
    "causal", _table(CAUSAL, CAUSAL_WINDOW, CAUSAL, CAUSAL_WINDOW, CAUSAL, CAUSAL_WINDOW),
    source="plain causal attention; Gemma-4 E2B/E4B images (no bidirectional attention)")
GEMMA3 = Family(
    "gemma3",
    _table(Rule("all", "none"), Rule("all", "sym"), Rule("all", "none"), Rule("all", "left"),
           Rule("short", "none"), Rule("short", "left", "causal")),
    token_types={0: "text", 1: "image"}, block_types=(1,),
    layout_types={"text": 0, "prefix": 0, "image": 1, "video": 1},
    model_types=("gemma3", "gemma3_text"), encoders=_SIGLIP, source="google-deepmind/gemma",
    tiny={"tiny-gemma3": TinyRecipe(lambda tf, text: (
        tf.Gemma3Config(text_config=text, vision_config=_TINY_SIGLIP, mm_tokens_per_image=9, image_token_index=5),
        tf.Gemma3ForConditionalGeneration))},
    verify_layout=_IMAGES_LAYOUT)
# Gemma-4 26B-A4B and 31B. Audio soft tokens (type 3) are causal, like text.
GEMMA4 = Family(
    "gemma4",
    _table(CAUSAL, Rule("all", "sym"), CAUSAL, Rule("all", "left"), CAUSAL, Rule("all", "left")),
    token_types={0: "text", 1: "image", 2: "video", 3: "audio"}, block_types=(1, 2),
    layout_types={"text": 0, "prefix": 0, "image": 1, "video": 2, "audio": 3},
    model_types=("gemma4", "gemma4_text"), token_type_argument="mm_token_type_ids",
    # The audio tower's chunked attention reads eager's additive mask.
    encoders={"gemma4_vision": "sdpa", "gemma4_audio": "eager"}, source="google-deepmind/gemma",
    tiny={"tiny-gemma4": TinyRecipe(_tiny_gemma4),
          "tiny-gemma4-e2b": TinyRecipe(lambda tf, text: _tiny_gemma4(tf, text, e2b=True), layers=4)},
    verify_layout=_IMAGES_LAYOUT)
# PaliGemma(2): its language model is a Gemma(-2) text model; without a prefix block the rules
# reduce to plain causal (sliding) attention, so plain Gemma(-2) text models are covered too.
PALIGEMMA = Family(
    "paligemma",
    _table(Rule("all", "none"), Rule("all", "left", "causal"), Rule("all", "none"), Rule("all", "left", "causal"),
           Rule("short", "none"), Rule("short", "left", "causal")),
    token_types={0: "prefix", 1: "suffix"}, block_types=(0,), prefix_block=True,
    layout_types={"image": 0, "prefix": 0, "text": 1},
    model_types=("paligemma", "gemma", "gemma2"), encoders=_SIGLIP, source="google-research/big_vision",
    tiny={"tiny-paligemma": TinyRecipe(lambda tf, text: (
        tf.PaliGemmaConfig(text_config=dict(text, model_type="gemma2"), vision_config=_TINY_SIGLIP,
                           image_token_index=5, projection_dim=32),
        tf.PaliGemmaForConditionalGeneration))},
    verify_layout="image:{image},image:{long},prefix:5,text:16")

BUILTIN: tuple[Family, ...] = (CAUSAL_FAMILY, GEMMA3, GEMMA4, PALIGEMMA)
FAMILIES = tuple(f.name for f in BUILTIN)


def family(which: str | Family) -> Family:
    """The record of a family given by name (one of :data:`FAMILIES`) or as a record."""
    if isinstance(which, Family):
        return which
    for record in BUILTIN:
        if record.name == which:
            return record
    raise ValueError(f"unknown family {which!r}; expected one of {FAMILIES} or a bidiattn.families.Family")


def as_families(families) -> tuple[Family, ...]:
    """``families`` as a tuple of :class:`Family` records (``TypeError`` naming anything else)."""
    if isinstance(families, Family):
        raise TypeError("families must be a sequence of Family records, got one record: pass (record,)")
    out = tuple(families)
    bad = [type(f).__name__ for f in out if not isinstance(f, Family)]
    if bad or not out:
        raise TypeError(f"families must be a non-empty sequence of bidiattn.families.Family records, got {bad or 'none'}")
    return out


def family_of_model_type(model_type: str | None, families: tuple[Family, ...] = BUILTIN) -> Family | None:
    """The family whose language model (or whole model) has this transformers ``model_type``."""
    for record in families:
        if model_type in record.model_types:
            return record
    return None
