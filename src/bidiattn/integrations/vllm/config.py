"""Which rule the vLLM backend applies, and what it refuses at start-up. Imports no vLLM.

A served model maps to a :class:`ModelRule`: its family record (:mod:`bidiattn.families`, from
vLLM's ``hf_config.model_type``), the convention (``official`` by default, from the
``BIDIATTN_RULE`` environment variable, so every vLLM process sees the same one) and the
model's sliding window. Each attention layer then maps to a :class:`LayerKind` (full or
sliding, with the window its rule reads): which layers are bidirectional comes from the family
record and the layer kind, never from fields vLLM clears per layer (Gemma-4 clears its
``mm_prefix_range`` on full layers in Python).

Refused here, each with a ``ValueError`` naming the value: a model type no family claims (set
``BIDIATTN_FAMILY`` to serve it under a named family), Gemma-4 with
``use_bidirectional_attention='all'``, rules vLLM's metadata cannot carry (PaliGemma's
official/transformers prefix block; Gemma-3 images longer than the sliding window, which
vLLM's model runner drops from ``mm_req_doc_ranges``), and head sizes, dtypes, KV-cache dtypes
and block sizes the kernels do not take (:func:`unsupported`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...families import BUILTIN, CONVENTIONS, Family, Rule, family, family_of_model_type

__all__ = [
    "ENV_RULE", "ENV_FAMILY", "DTYPES", "KV_CACHE_DTYPES", "BLOCK_SIZES", "UNBOUNDED", "LayerKind", "ModelRule",
    "resolve_model", "model_rule_from_vllm", "unsupported", "supports_head_size",
]

ENV_RULE = "BIDIATTN_RULE"
ENV_FAMILY = "BIDIATTN_FAMILY"
DTYPES = (torch.float16, torch.bfloat16)
# vLLM's names of the cache dtypes the kernels read; "auto" is the model dtype.
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
# Kernel block sizes offered to vLLM (it splits larger KV blocks into these).
BLOCK_SIZES = (16, 32, 64)
_MAX_HEAD_DIM = 512
# The window of full layers whose rule drops long blocks, for a model without a sliding window.
UNBOUNDED = 2**30


def supports_head_size(head_size: int) -> bool:
    """Head sizes the Triton kernels take: multiples of 16 up to 512."""
    return isinstance(head_size, int) and 16 <= head_size <= _MAX_HEAD_DIM and head_size % 16 == 0


@dataclass(frozen=True)
class LayerKind:
    """One kind of attention layer of a served model: ``layer`` (``"full"`` or ``"sliding"``),
    the ``window`` its rule reads (the layer's own on sliding layers; on full layers whose rule
    drops blocks longer than the model's window, that window, or :data:`UNBOUNDED` for a model
    without one; ``None`` otherwise) and the :class:`Rule`. Layers of one kind share one span
    mask and launch plan per step."""

    layer: str
    window: int | None
    rule: Rule


@dataclass(frozen=True)
class ModelRule:
    """The rule the backend applies to one served model.

    - ``family``: the family record; ``convention``: one of ``official``, ``transformers``,
      ``vllm``.
    - ``window``: the model's sliding window (``hf_text_config.sliding_window``), read by full
      layers under rules that drop blocks longer than it (``vllm`` on Gemma-3/PaliGemma).
    - ``model_type``: vLLM's ``hf_config.model_type``, for messages.
    """

    family: Family
    convention: str
    window: int | None = None
    model_type: str = ""

    @property
    def merges_adjacent(self) -> bool:
        """Whether image ranges that touch form one block. bidiattn's blocks are maximal runs of
        image tokens (as transformers and the official code read token types); vLLM keeps each
        range on its own, which the ``vllm`` convention reproduces."""
        return self.convention != "vllm"

    def kind(self, sliding_window: int | None) -> LayerKind:
        """The :class:`LayerKind` of a layer with vLLM's ``sliding_window`` (``None``: a full layer)."""
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"bidiattn: sliding_window must be None or a positive int, got {sliding_window!r}")
        layer = "full" if sliding_window is None else "sliding"
        rule = self.family.rule(self.convention, layer)
        window = sliding_window if layer == "sliding" else None
        if layer == "full" and rule.needs_window:
            # The rule drops blocks longer than the model's window; a model without one (vLLM
            # then keeps every image) drops none.
            window = self.window if self.window is not None else UNBOUNDED
        return LayerKind(layer, window, rule)

    def describe(self) -> str:
        """One line naming the rule, for the start-up log."""
        return (f"bidiattn vLLM backend: family {self.family.name!r} (model_type {self.model_type!r}), "
                f"rule {self.convention!r}")


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value.strip() if value and value.strip() else None


def resolve_model(model_type: str | None, text_model_type: str | None = None, *, sliding_window: int | None = None,
                  use_bidirectional_attention: Any = None, mm_tokens_per_image: int | None = None,
                  convention: str | None = None, family_name: str | Family | None = None) -> ModelRule:
    """The :class:`ModelRule` of a model described by its configs' fields.

    Args:
        model_type, text_model_type: ``hf_config.model_type`` and ``hf_text_config.model_type``.
        sliding_window: ``hf_text_config.sliding_window``.
        use_bidirectional_attention: Gemma-4's text config field: ``"vision"`` makes images
            bidirectional (26B-A4B, 31B: family ``gemma4``); ``None`` leaves them causal
            (E2B/E4B: family ``causal``); ``"all"`` is refused.
        mm_tokens_per_image: Gemma-3's ``hf_config.mm_tokens_per_image`` (image length).
        convention: default ``"official"``.
        family_name: a family (name or record) overriding the lookup by model type.

    Raises ``ValueError`` naming the value for an unknown convention or family, and for the
    models and rules listed in the module doc.
    """
    convention = "official" if convention is None else convention
    if convention not in CONVENTIONS:
        raise ValueError(f"bidiattn: unknown rule {convention!r} ({ENV_RULE}); expected one of {CONVENTIONS}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"bidiattn: the model's sliding_window must be a positive int or None, got {sliding_window!r}")
    if family_name is not None:
        record = family(family_name)
    else:
        record = family_of_model_type(model_type) or family_of_model_type(text_model_type)
        if record is None:
            known = sorted(t for f in BUILTIN for t in f.model_types)
            raise ValueError(
                f"bidiattn: unknown model family for model_type {model_type!r} (text model_type "
                f"{text_model_type!r}); bidiattn has rules for model types {known}. Set {ENV_FAMILY}=<family> "
                "(e.g. causal) to serve another model under a named family's rule")
        if record.name == "gemma4":
            if use_bidirectional_attention == "all":
                raise ValueError("bidiattn: this Gemma-4 config has use_bidirectional_attention='all' (every token "
                                 "sees every token); bidiattn's rules are for causal models with bidirectional images")
            if use_bidirectional_attention != "vision":
                record = family("causal")  # E2B/E4B: images are causal
    name = model_type or text_model_type or ""
    if record.prefix_block and convention != "vllm" and model_type == "paligemma":
        raise ValueError(
            f"bidiattn: {record.name}/{convention} makes the whole prompt (image, BOS, prompt, separator) one "
            "bidirectional block; vLLM's step metadata lists image tokens only (mm_req_doc_ranges) and its scheduler "
            f"may cut a prompt's text into chunks, so that block is unknown here. Serve with {ENV_RULE}=vllm, or use "
            "the transformers integration for the official rule")
    if (record.name == "gemma3" and convention != "vllm" and mm_tokens_per_image is not None
            and sliding_window is not None and mm_tokens_per_image > sliding_window):
        raise ValueError(
            f"bidiattn: images of {mm_tokens_per_image} tokens are longer than this Gemma-3's sliding window "
            f"({sliding_window}); vLLM's model runner drops such images from mm_req_doc_ranges, so gemma3/"
            f"{convention} would see them as text. Serve with {ENV_RULE}=vllm (which drops them too)")
    return ModelRule(record, convention, sliding_window, name)


def model_rule_from_vllm(model_config: Any, environ: Mapping[str, str] | None = None) -> ModelRule:
    """:func:`resolve_model` of a vLLM ``ModelConfig`` (read by attribute: ``hf_config``,
    ``hf_text_config``), the convention and family from the environment
    (``BIDIATTN_RULE``, ``BIDIATTN_FAMILY``)."""
    environ = os.environ if environ is None else environ
    hf = getattr(model_config, "hf_config", None)
    text = getattr(model_config, "hf_text_config", None) or hf
    return resolve_model(
        getattr(hf, "model_type", None), getattr(text, "model_type", None),
        sliding_window=getattr(text, "sliding_window", None),
        use_bidirectional_attention=getattr(text, "use_bidirectional_attention", None),
        mm_tokens_per_image=getattr(hf, "mm_tokens_per_image", None),
        convention=_env(environ, ENV_RULE), family_name=_env(environ, ENV_FAMILY))


_CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def unsupported(*, head_size: int | None = None, dtype: torch.dtype | None = None, kv_cache_dtype: str | None = None,
                block_size: int | None = None) -> str | None:
    """Why the kernels cannot serve this configuration (a reason naming the values), or None.
    Arguments left ``None`` are not checked."""
    reasons = []
    if head_size is not None and not supports_head_size(head_size):
        reasons.append(f"head size {head_size!r} (bidiattn takes multiples of 16 up to {_MAX_HEAD_DIM})")
    if dtype is not None and dtype not in DTYPES:
        reasons.append(f"dtype {dtype} (bidiattn takes float16 and bfloat16)")
    if kv_cache_dtype is not None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            reasons.append(f"kv_cache_dtype {kv_cache_dtype!r} (bidiattn reads {', '.join(KV_CACHE_DTYPES)}; no fp8 or "
                           "quantized caches)")
        elif dtype is not None and kv_cache_dtype != "auto" and _CACHE_DTYPES[kv_cache_dtype] != dtype:
            reasons.append(f"kv_cache_dtype {kv_cache_dtype!r} with model dtype {dtype} (bidiattn reads a cache of "
                           "the model's dtype)")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size % min(BLOCK_SIZES)):
        reasons.append(f"block size {block_size!r} (bidiattn's kernels take blocks of {BLOCK_SIZES} tokens; vLLM splits "
                       "multiples of 16 into them)")
    return "; ".join(f"bidiattn does not support {r}" for r in reasons) or None
