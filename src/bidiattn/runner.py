"""A small end-to-end runner over the kernels: a stack of attention layers with random weights,
driven through chunked prefill (planner) and decode over paged K/V caches.

No model weights needed: each layer is ``h <- h + Wo · attention(Wq h, Wk h, Wv h)`` under the
rule of its layer type. :meth:`AttentionStack.one_shot` runs whole prompts at once (the
reference for the serving path); :class:`ServingSession` runs the same stack the way an engine
does — prefill chunks cut by :func:`bidiattn.planner.plan_prefill`, K/V appended to per-layer
pages, then decode steps — so the tests can check that chunking and paging change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import rules
from .attention import attention
from .kvcache import PagedKVCache, append, paged_attention
from .planner import RequestLayout, plan_prefill, step_spans
from .spans import SpanMask

__all__ = ["StackConfig", "AttentionStack", "ServingSession"]


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


class ServingSession:
    """Several requests served through paged caches: :meth:`prefill` in planned chunks, then
    :meth:`decode` one text token per request per step. Pages are handed out in order from one
    pool per layer (``pages_per_request`` each)."""

    def __init__(self, stack: AttentionStack, requests: Sequence[torch.Tensor], page_size: int = 16,
                 max_tokens_per_request: int = 256):
        self.stack = stack
        self.block_ids = [ids.to(stack.device) for ids in requests]
        c = stack.config
        pages = -(-max_tokens_per_request // page_size)
        self.page_table = torch.arange(len(requests) * pages, dtype=torch.int32, device=stack.device).view(len(requests), pages)
        self.caches = [PagedKVCache.allocate(len(requests) * pages, page_size, c.num_kv_heads, c.head_dim, c.dtype,
                                             stack.device) for _ in c.layer_types]
        self.lengths = [0] * len(requests)
        self.max_tokens = max_tokens_per_request

    def _step(self, rows: list[tuple[int, int, int]], h: torch.Tensor, spans: dict[str, SpanMask]) -> torch.Tensor:
        """Append and attend ``rows`` = (request, start, end) for every layer (``spans`` per layer
        type); returns the new ``h``."""
        dev = self.stack.device
        reqs = [r for r, _, _ in rows]
        cu = torch.tensor([0, *[e - s for _, s, e in rows]], device=dev).cumsum(0)
        start = torch.tensor([s for _, s, _ in rows], device=dev)
        for i, cache in enumerate(self.caches):
            q, k, v = self.stack.project(i, h)
            append(cache, k, v, self.page_table[reqs], cu, start)
            attn = paged_attention(q, cache, self.page_table[reqs], spans[self.stack.config.layer_types[i]])
            h = self.stack.output(i, h, attn)
        return h

    def prefill(self, xs: Sequence[torch.Tensor], budget: int) -> list[torch.Tensor]:
        """Prefill every request (``xs[r] [T_r, hidden]``) in chunks of at most ``budget`` tokens
        that never split a block; returns each request's final hidden states."""
        if any(int(x.shape[0]) > self.max_tokens for x in xs):
            raise ValueError(f"a prompt is longer than max_tokens_per_request={self.max_tokens}")
        full = [self.stack.spans(ids) for ids in self.block_ids]
        plan = plan_prefill([RequestLayout.from_block_ids(ids.cpu()) for ids in self.block_ids], budget)
        outs = [torch.empty_like(x) for x in xs]
        for step in plan.steps:
            rows = [(c.request, c.start, c.end) for c in step.chunks]
            h = torch.cat([xs[c.request][c.start : c.end] for c in step.chunks])
            spans = {layer: step_spans(step, [f[layer] for f in full]) for layer in full[0]}
            h = self._step(rows, h, spans)
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
        dev = self.stack.device
        self.block_ids = [torch.cat([ids, ids.new_zeros(1)]) for ids in self.block_ids]
        full = [self.stack.spans(ids) for ids in self.block_ids]
        cu_q = torch.arange(len(full) + 1, device=dev)
        cu_k = torch.tensor([0, *[n + 1 for n in self.lengths]], device=dev).cumsum(0)
        spans = {layer: SpanMask(torch.cat([f[layer].lo[-1:] for f in full]), torch.cat([f[layer].hi[-1:] for f in full]),
                                 cu_q, cu_seqlens_k=cu_k, total_keys=sum(self.lengths) + len(full))
                 for layer in full[0]}
        rows = [(r, n, n + 1) for r, n in enumerate(self.lengths)]
        h = self._step(rows, x, spans)
        self.lengths = [n + 1 for n in self.lengths]
        return h
