"""Token layouts written as text, e.g. ``"text:40,image:280,text:8,image:280,text:30"``.

Segment kinds:

- ``text``: ordinary tokens;
- ``image`` / ``video``: soft tokens of one image or video (bidirectional in every convention
  that has blocks; adjacent segments with no separator form one block, as in the models);
- ``prefix``: PaliGemma prefix text (BOS + prompt + separator), bidirectional only in the
  paligemma official/transformers conventions, ordinary text elsewhere;
- ``audio``: Gemma-4 audio soft tokens, causal like text in every convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import Family, family
from ..rules import block_ids_from_mask, rule_for

__all__ = ["Layout", "parse_layout", "SEGMENT_KINDS"]

SEGMENT_KINDS = ("text", "image", "video", "audio", "prefix")


@dataclass(frozen=True)
class Layout:
    """A single sequence as ``(kind, length)`` segments."""

    segments: tuple[tuple[str, int], ...]

    @property
    def total_tokens(self) -> int:
        return sum(n for _, n in self.segments)

    def kinds(self) -> list[str]:
        """The kind of every token."""
        return [kind for kind, n in self.segments for _ in range(n)]

    def block_ids(self, family_: str | Family, convention: str) -> torch.Tensor:
        """``block_ids`` ``[T]`` for :func:`bidiattn.rules.build` under one family/convention
        (the kinds the family's record makes blocks, :meth:`Family.block_kinds`)."""
        rule_for(family_, convention, "full")
        bidirectional = set(family(family_).block_kinds(convention))
        is_block = torch.tensor([kind in bidirectional for kind in self.kinds()], dtype=torch.bool)
        return block_ids_from_mask(is_block)

    def describe(self) -> str:
        return ",".join(f"{kind}:{n}" for kind, n in self.segments)


def parse_layout(text: str) -> Layout:
    """Parse ``"kind:count,kind:count,..."``; ``ValueError`` naming the bad segment otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("layout must be a non-empty string like 'text:40,image:280,text:30'")
    segments = []
    for part in text.split(","):
        kind, sep, count = part.strip().partition(":")
        if not sep or kind not in SEGMENT_KINDS:
            raise ValueError(f"bad layout segment {part.strip()!r}: expected kind:count with kind in {SEGMENT_KINDS}")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"bad layout segment {part.strip()!r}: count {count!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"bad layout segment {part.strip()!r}: count must be >= 1")
        segments.append((kind, n))
    return Layout(tuple(segments))
