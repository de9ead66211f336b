"""bidiattn: exact attention with bidirectional blocks inside a causal sequence.

A mask is a :class:`SpanMask` (one key interval per query row, O(T) memory), built for a model
by :func:`bidiattn.rules.build` and consumed by :func:`bidiattn.attention`. Serving pieces:
:mod:`bidiattn.planner` (chunked prefill that never splits a block), :mod:`bidiattn.kvcache`
(paged K/V), :mod:`bidiattn.runner` (an end-to-end stack for tests and benchmarks);
:mod:`bidiattn.integrations.transformers` plugs into transformers. Importing the package
touches no GPU and imports no Triton.
"""

from . import planner, presets, reference, rules
from .attention import attention, plan_attention
from .spans import SpanMask, TileSummary

__all__ = ["SpanMask", "TileSummary", "attention", "plan_attention", "planner", "presets", "reference", "rules"]


def _installed_version() -> str:
    """The installed distribution's version; ``"0+unknown"`` for a source tree never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bidiattn")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _installed_version()
