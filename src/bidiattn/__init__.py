"""bidiattn: exact attention with bidirectional blocks inside a causal sequence.

A mask is a :class:`SpanMask` (one key interval per query row, O(T) memory), built for a model
by :func:`bidiattn.rules.build` (the rules of :mod:`bidiattn.families`) and consumed by
:func:`bidiattn.attention`; :func:`bidiattn.plan` plans the launches once for the layers that
share a mask (a call without a plan plans once per mask object: :mod:`bidiattn.launch`).
Serving pieces are in :mod:`bidiattn.serving` (paged K/V, chunked prefill, CUDA graphs, a
runner), the command-line tools in :mod:`bidiattn.tools`, the kernels in
:mod:`bidiattn.kernels`; :mod:`bidiattn.integrations.transformers` plugs into transformers.
Importing the package touches no GPU and imports no Triton.
"""

from . import families, presets, reference, rules
from .attention import attention
from .launch import Plan, plan
from .spans import SpanMask, TileSummary

__all__ = ["Plan", "SpanMask", "TileSummary", "attention", "plan", "families", "presets", "reference", "rules"]


def _installed_version() -> str:
    """The installed distribution's version; ``"0+unknown"`` for a source tree never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bidiattn")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _installed_version()
