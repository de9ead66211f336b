"""Compare the conventions of one model family on one layout (what ``bidiattn masks`` prints).

All counts come from the spans in O(T): the pairs two masks disagree on in row ``q`` are
``len(A) + len(B) - 2 * len(A ∩ B)`` for their intervals ``A`` and ``B``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import rules
from .layouts import Layout
from ..spans import SpanMask

__all__ = ["ConventionStats", "LayerComparison", "compare_layer", "family_convention", "COMPARED"]

# The family's own conventions, then "causal": the family-independent baseline that ignores
# images (what a model served without bidirectional attention computes).
COMPARED = ("official", "transformers", "vllm", "causal")


@dataclass(frozen=True)
class ConventionStats:
    """One convention's mask on one layer type, against the official rule."""

    label: str
    spans: SpanMask
    allowed_pairs: int
    differ_pairs: int
    extra_pairs: int
    missing_pairs: int
    rows_affected: int


@dataclass(frozen=True)
class LayerComparison:
    family: str
    layer: str
    window: int
    layout: Layout
    stats: tuple[ConventionStats, ...]

    @property
    def official(self) -> ConventionStats:
        return self.stats[0]


def family_convention(label: str, family: str) -> tuple[str, str]:
    """The (family, convention) a compared label stands for."""
    return ("causal", "official") if label == "causal" else (family, label)


def _spans(label: str, family: str, layer: str, layout: Layout, window: int) -> SpanMask:
    fam, conv = family_convention(label, family)
    return rules.build(fam, conv, layer, block_ids=layout.block_ids(fam, conv), window=window)


def _difference(a: SpanMask, b: SpanMask) -> tuple[int, int, int]:
    """(pairs in a not in b, pairs in b not in a, rows whose intervals differ)."""
    alo, ahi, blo, bhi = a.lo.long(), a.hi.long(), b.lo.long(), b.hi.long()
    overlap = (ahi.minimum(bhi) - alo.maximum(blo) + 1).clamp_min(0)
    extra = int((ahi - alo + 1 - overlap).sum())
    missing = int((bhi - blo + 1 - overlap).sum())
    rows = int(((alo != blo) | (ahi != bhi)).sum())
    return extra, missing, rows


def compare_layer(family: str, layer: str, layout: Layout, window: int) -> LayerComparison:
    """Masks of every convention in :data:`COMPARED` for ``family``/``layer`` on ``layout``."""
    masks = {label: _spans(label, family, layer, layout, window) for label in COMPARED}
    official = masks["official"]
    stats = []
    for label, spans in masks.items():
        extra, missing, rows = _difference(spans, official)
        stats.append(ConventionStats(label, spans, spans.num_pairs(), extra + missing, extra, missing, rows))
    return LayerComparison(family, layer, window, layout, tuple(stats))
