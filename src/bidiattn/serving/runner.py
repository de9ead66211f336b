"""A small end-to-end runner over the kernels: a stack of attention layers with random weights,
driven through chunked prefill (:mod:`.prefill`) and decode over paged K/V caches.

No model weights needed: each layer is ``h <- h + Wo · attention(Wq h, Wk h, Wv h)`` under the
rule of its layer type. :meth:`AttentionStack.one_shot` runs whole prompts at once (the
reference for the serving path); :class:`ServingSession` runs the same stack the way an engine
does — prefill chunks cut by :func:`bidiattn.serving.prefill.plan_prefill`, K/V appended to per-layer
pages, then decode steps — so the tests can check that chunking and paging change nothing.

Like an engine, the session checks what it is given once, on the host (prompt lengths against
the capacity it allocated; the planner never splits a block), so its steps run the kernels with
``validate=False`` and move each step's few offsets to the GPU through pinned memory: a step
issues no host sync, and the host queues the next step's work while the GPU runs this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from dataclasses import dataclass

import torch

from .. import rules
from ..attention import attention
from .kvcache import PagedKVCache, append, paged_attention
from ..blocks import BlockList
from .graphs import capture
from .prefill import RequestLayout, plan_prefill
from ..spans import SpanMask, host_to_device

__all__ = ["StackConfig", "AttentionStack", "ServingSession", "StepGraph"]


@dataclass(frozen=True)
class StackConfig:
    """Shape and rules of the stack. ``layer_types``: ``"full"``/``"sliding"`` per layer."""

    hidden: int = 64
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    layer_types: tuple[str, ...] = ("sliding", "full")
    window: int = 8
    family: str = "gemma3"
    convention: str = "official"
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for layer in self.layer_types:
            rules.rule_for(self.family, self.convention, layer)
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads={self.num_q_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")


class AttentionStack:
    """Random weights for :class:`StackConfig` (seeded), and the one-shot forward."""

    def __init__(self, config: StackConfig, seed: int = 0, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        c = config
        out_q, out_kv = c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim

        def weight(rows, cols):
            return (torch.randn(rows, cols, generator=g) / rows**0.5).to(self.device, c.dtype)

        self.layers = [(weight(c.hidden, out_q), weight(c.hidden, out_kv), weight(c.hidden, out_kv), weight(out_q, c.hidden))
                       for _ in c.layer_types]

    def project(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` of hidden states ``h [T, hidden]``."""
        wq, wk, wv, _ = self.layers[layer]
        c = self.config
        return ((h @ wq).view(-1, c.num_q_heads, c.head_dim), (h @ wk).view(-1, c.num_kv_heads, c.head_dim),
                (h @ wv).view(-1, c.num_kv_heads, c.head_dim))

    def output(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return h + attn.reshape(h.shape[0], -1) @ self.layers[layer][3]

    def spans(self, block_ids: torch.Tensor) -> dict[str, SpanMask]:
        """One sequence's spans per layer type (layers of a type share them)."""
        c = self.config
        return {layer: rules.build(c.family, c.convention, layer, block_ids=block_ids.to(self.device), window=c.window)
                for layer in set(c.layer_types)}

    def one_shot(self, x: torch.Tensor, block_ids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """The whole prompt (``x [T, hidden]``, one sequence) through every layer at once."""
        spans = self.spans(block_ids)
        h = x
        for i, layer in enumerate(self.config.layer_types):
            q, k, v = self.project(i, h)
            h = self.output(i, h, attention(q, k, v, spans[layer], backend=backend))
        return h


@dataclass(frozen=True)
class StepGraph:
    """One captured step: replayed after its inputs are copied into ``h`` (hidden states) and
    ``offsets`` (int64: cu_seqlens, cu_seqlens_k, starts, request indices); ``out`` receives
    the new hidden states. ``blocks`` (the step's requests' blocks, fixed for its key) is read
    by the capture and must outlive it."""

    graph: torch.cuda.CUDAGraph
    h: torch.Tensor
    offsets: torch.Tensor
    blocks: BlockList
    out: torch.Tensor


class ServingSession:
    """Several requests served through paged caches: :meth:`prefill` in planned chunks, then
    :meth:`decode` one text token per request per step. Pages are handed out in order from one
    pool per layer (``pages_per_request`` each).

    ``cuda_graphs=True`` (CUDA only): each step is captured once per shape — the requests it
    serves and its token count — and replayed after its hidden states and offsets are copied
    into the captured tensors, so a step costs one graph launch of host time instead of the
    eager Python of every layer. Decode steps all share one graph; a prefill chunk of a new
    shape pays one capture (its graph and memory pool are kept for the session's lifetime).
    The spans of a captured step are built for a key capacity of ``max_tokens_per_request``
    per request (the split-KV count of decode follows from it).
    """

    def __init__(self, stack: AttentionStack, requests: Sequence[torch.Tensor], page_size: int = 16,
                 max_tokens_per_request: int = 256, cuda_graphs: bool = False):
        if cuda_graphs and stack.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the stack on a CUDA device, it is on {stack.device}")
        self.stack = stack
        # The prompts' blocks; decoded tokens are text, so the layouts never change after this.
        self.layouts = [RequestLayout.from_block_ids(ids.cpu()) for ids in requests]
        c = stack.config
        pages = -(-max_tokens_per_request // page_size)
        self.page_table = torch.arange(len(requests) * pages, dtype=torch.int32, device=stack.device).view(len(requests), pages)
        self.caches = [PagedKVCache.allocate(len(requests) * pages, page_size, c.num_kv_heads, c.head_dim, c.dtype,
                                             stack.device) for _ in c.layer_types]
        self.lengths = [0] * len(requests)
        self.max_tokens = max_tokens_per_request
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple[tuple[int, ...], int], StepGraph] = {}

    def _step(self, rows: list[tuple[int, int, int]], h: torch.Tensor) -> torch.Tensor:
        """Append and attend ``rows`` = (request, start, end) for every layer; returns the new
        ``h`` (with CUDA graphs: the captured output, overwritten by the next replay)."""
        reqs = tuple(r for r, _, _ in rows)
        # One host tensor (offsets, starts, request indices), one copy, no host sync.
        cu_q_host = [0, *accumulate(e - s for _, s, e in rows)]
        cu_k_host = [0, *accumulate(e for _, _, e in rows)]
        offsets = torch.tensor([*cu_q_host, *cu_k_host, *(s for _, s, _ in rows), *reqs], dtype=torch.int64)
        dev = self.stack.device
        if not self.cuda_graphs:
            blocks = BlockList.from_pairs([self.layouts[r].blocks for r in reqs], device=dev)
            return self._layers(h, host_to_device(offsets, dev), blocks, cu_k_host[-1])
        key = (reqs, h.shape[0])
        step = self.graphs.get(key)
        if step is None:
            # Everything the capture reads from the host is copied before it: a copy captured
            # from pinned memory would re-read that buffer, reused by then, at every replay.
            static_h, static_offsets = h.clone(), host_to_device(offsets, dev)
            blocks = BlockList.from_pairs([self.layouts[r].blocks for r in reqs], device=dev)
            # Key counts change between replays; the spans carry the capacity as their bound.
            capacity = len(rows) * self.max_tokens
            graph, out = capture(lambda: self._layers(static_h, static_offsets, blocks, capacity))
            step = self.graphs[key] = StepGraph(graph, static_h, static_offsets, blocks, out)
        step.h.copy_(h)
        step.offsets.copy_(offsets.pin_memory(), non_blocking=True)
        step.graph.replay()
        return step.out

    def _layers(self, h: torch.Tensor, offsets: torch.Tensor, blocks: BlockList, total_keys: int) -> torch.Tensor:
        """Every layer of one step on the device. The step's spans come from the requests' block
        lists (one builder launch per layer type on CUDA); the layers of a type share the spans,
        so the first of them plans the launch and the others reuse the plan kept on the spans:
        the per-step metadata work of a serving engine."""
        c = self.stack.config
        n = (offsets.numel() - 2) // 4
        cu_q, cu_k, start, req_index = offsets.split([n + 1, n + 1, n, n])
        page_table = self.page_table[req_index]
        spans = {layer: rules.build_from_blocks(c.family, c.convention, layer, blocks=blocks, cu_seqlens=cu_q,
                                                total_tokens=h.shape[0], window=c.window, cu_seqlens_k=cu_k,
                                                total_keys=total_keys, validate=False)
                 for layer in set(c.layer_types)}
        for i, cache in enumerate(self.caches):
            q, k, v = self.stack.project(i, h)
            append(cache, k, v, page_table, cu_q, start, validate=False)
            attn = paged_attention(q, cache, page_table, spans[c.layer_types[i]], validate=False)
            h = self.stack.output(i, h, attn)
        return h

    def prefill(self, xs: Sequence[torch.Tensor], budget: int) -> list[torch.Tensor]:
        """Prefill every request (``xs[r] [T_r, hidden]``) in chunks of at most ``budget`` tokens
        that never split a block; returns each request's final hidden states."""
        hidden = self.stack.config.hidden
        if len(xs) != len(self.layouts):
            raise ValueError(f"prefill got {len(xs)} prompts for {len(self.layouts)} requests")
        for r, (x, layout) in enumerate(zip(xs, self.layouts)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (layout.length, hidden):
                raise ValueError(f"request {r}: x must be [T={layout.length}, hidden={hidden}] (the length of its "
                                 f"block ids), got {tuple(getattr(x, 'shape', ()))}")
        if any(layout.length > self.max_tokens for layout in self.layouts):
            raise ValueError(f"a prompt is longer than max_tokens_per_request={self.max_tokens}")
        plan = plan_prefill(self.layouts, budget)
        outs = [torch.empty_like(x) for x in xs]
        for step in plan.steps:
            rows = [(c.request, c.start, c.end) for c in step.chunks]
            h = torch.cat([xs[c.request][c.start : c.end] for c in step.chunks])
            h = self._step(rows, h)
            offset = 0
            for c in step.chunks:
                outs[c.request][c.start : c.end] = h[offset : offset + c.tokens]
                offset += c.tokens
        self.lengths = [int(x.shape[0]) for x in xs]
        return outs

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """One new text token per request (``x [B, hidden]``); returns their hidden states."""
        if any(n + 1 > self.max_tokens for n in self.lengths):
            raise ValueError(f"a request would exceed max_tokens_per_request={self.max_tokens}")
        if x.shape != (len(self.lengths), self.stack.config.hidden):
            raise ValueError(f"x must be [B={len(self.lengths)}, hidden={self.stack.config.hidden}], got {tuple(x.shape)}")
        rows = [(r, n, n + 1) for r, n in enumerate(self.lengths)]
        h = self._step(rows, x)
        self.lengths = [n + 1 for n in self.lengths]
        # A captured step's output is overwritten by the next replay; prefill copies its slices
        # out at once, decode hands its output to the caller.
        return h.clone() if self.cuda_graphs else h
