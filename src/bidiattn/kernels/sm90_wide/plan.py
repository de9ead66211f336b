"""The gluon backend's launch data over one :class:`~bidiattn.spans.SpanMask`: the forward's
config and query-tile table, and with training the backward's tables.

The forward's tiles are ``config.block_m`` rows (128 for the two-CTA cluster config, 64
otherwise); the backward's dQ pass always walks 64-row tiles, so a training plan with a cluster
config keeps both tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...spans import SpanMask, TileSummary
from ..tiles import KeyTiles
from .host import BACKWARD_PASSES, Sm90WideConfig, backward_key_tiles, default_config

__all__ = ["GluonPlan", "plan_gluon"]


@dataclass(frozen=True, eq=False)
class GluonPlan:
    """What the gluon backend launches with over one ``SpanMask`` (made by :func:`plan_gluon`).

    - ``config``: the forward's :class:`~.host.Sm90WideConfig` (:func:`~.host.default_config`
      where the plan was made without one).
    - ``tiles``: the forward's query-tile table and launch order at ``config.block_m`` rows.
    - ``dq_tiles``: with training, the dQ pass's at 64 rows (``tiles`` itself where the forward's
      are 64 rows); ``None`` otherwise.
    - ``key_tiles``: with training, the dV/dK passes' key-tile table and order at 64 keys.
    """

    config: Sm90WideConfig
    tiles: tuple[TileSummary, torch.Tensor]
    dq_tiles: tuple[TileSummary, torch.Tensor] | None = None
    key_tiles: tuple[KeyTiles, torch.Tensor] | None = None

    @property
    def training(self) -> bool:
        """Whether the plan holds the backward's tables."""
        return self.key_tiles is not None

    def backward_tiles(self, spans: SpanMask) -> tuple:
        """``(key_tiles, dq_tiles)`` of :func:`~.host.backward_sm90_hd512`: the plan's, or built now
        for a plan made without training."""
        if self.training:
            return self.key_tiles, self.dq_tiles
        return backward_key_tiles(spans), _dq_tiles(spans, self.config, self.tiles)


def _dq_tiles(spans: SpanMask, config: Sm90WideConfig, tiles):
    from ..tiles import query_tiles

    rows = BACKWARD_PASSES["dq"]["BLOCK_M"]
    return tiles if config.block_m == rows else query_tiles(spans, rows)


def plan_gluon(spans: SpanMask, *, training: bool = False, config: Sm90WideConfig | None = None) -> GluonPlan:
    """The :class:`GluonPlan` of ``spans``: the tile tables of the Gluon kernels over that mask.

    Args:
        spans: the mask: query row ``i`` (of ``spans.total_tokens``) sees keys ``[lo[i], hi[i]]`` of
            its own sequence (self-attention or extend spans); the tables are built on the spans'
            device in a few launches, with no host sync.
        training: also build the backward's tables (dQ tiles at 64 rows, dV/dK key tiles at 64 keys).
        config: the forward's :class:`~.host.Sm90WideConfig`; default :func:`~.host.default_config`.

    ``TypeError`` names a ``spans``, ``training`` or ``config`` of the wrong type.
    """
    from ..tiles import query_tiles

    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a SpanMask, got {type(spans).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    if config is None:
        config = default_config()
    elif not isinstance(config, Sm90WideConfig):
        raise TypeError(f"config must be a Sm90WideConfig, got {type(config).__name__}")
    tiles = query_tiles(spans, config.block_m)
    if not training:
        return GluonPlan(config, tiles)
    return GluonPlan(config, tiles, _dq_tiles(spans, config, tiles), backward_key_tiles(spans))
