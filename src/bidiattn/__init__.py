"""bidiattn: exact attention with bidirectional blocks inside a causal sequence.

A mask is a :class:`SpanMask` (one key interval per query row, O(T) memory), built for a model
by :func:`bidiattn.rules.build` and consumed by :func:`bidiattn.attention`. Importing the
package touches no GPU.
"""

from . import presets, reference, rules
from .attention import attention
from .spans import SpanMask, TileSummary

__all__ = ["SpanMask", "TileSummary", "attention", "presets", "reference", "rules"]
__version__ = "0.1.0"
