"""CUDA-graph capture of a step (used by :mod:`bidiattn.serving.runner`, the tests and the benchmarks).

A step that builds its spans on the device, plans its launch and runs the kernels issues no host
sync, so it can be captured once and replayed with new inputs copied into the tensors it read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["capture"]

Outputs = TypeVar("Outputs")


def capture(step: Callable[[], Outputs], forbid_sync: bool = False) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """``step`` run once on a side stream (Triton compiles its kernels, cuBLAS makes its
    workspace: neither may happen inside a capture), then captured in a CUDA graph. Returns the
    graph and the captured call's outputs, which every ``graph.replay()`` overwrites.

    ``step`` therefore runs once for real: it must be idempotent (a K/V append that writes the
    same values to the same slots is). ``forbid_sync``: a host sync during the capture raises
    ``RuntimeError`` (``torch.cuda.set_sync_debug_mode("error")``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if forbid_sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            outs = step()
    finally:
        if forbid_sync:
            torch.cuda.set_sync_debug_mode("default")
    return graph, outs
