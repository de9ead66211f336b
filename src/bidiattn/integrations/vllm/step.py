"""A vLLM step's spans and attention over vLLM's own KV cache. Imports no vLLM.

What the backend's metadata builder and impl do, written against plain tensors so that it
runs (and is tested) without vLLM:

* :func:`step_blocks` (host): the step's ``mm_req_doc_ranges`` (per request, absolute
  inclusive ``(start, end)`` image ranges) become each request's blocks, kept only where the
  step's rows can be in them: a block must hold one of the request's new rows. Decode rows
  (generated text) are in none, so a decode step has no blocks, and a step never has more
  blocks than query rows, so the buffers below have a fixed size.
* :class:`StepBuilder` owns persistent device buffers (a :class:`~bidiattn.blocks.BlockList`
  and int64 query/key offsets) and writes each step into them: one pinned host-to-device copy
  of the blocks, and device copies of vLLM's offsets, no host sync. Its :meth:`StepBuilder.build`
  returns a :class:`StepMetadata`.
* :meth:`StepMetadata.spans` and :meth:`StepMetadata.plan` run in the forward pass, in the first
  layer of each kind: :func:`bidiattn.rules.build_from_blocks` (one launch) and the launch plan,
  kept on the metadata for the other layers of that kind. Being device work inside the forward,
  they are captured in a full CUDA graph with the layers and replayed over the buffers the
  builder rewrote for the new step.
* :func:`attend`: the span kernel over vLLM's cache as it is: per layer one buffer of logical
  shape ``[num_blocks, Hkv, block_size, 2 * D]`` in NHD order, K and V its two interleaved
  halves (strided views, never copied), int32 block tables, output written into vLLM's buffer.
  Head-dim-512 layers of prefill steps (:meth:`StepMetadata.gathers`) copy the step's keys out of
  the pages and run the Gluon forward instead, as ``serving.kvcache.paged_attention`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field

import torch

from ... import rules
from ...blocks import BlockList
from ...spans import SpanMask
from .config import LayerKind, ModelRule

__all__ = ["step_blocks", "StepLayout", "StepMetadata", "StepBuilder", "kv_views", "attend", "write_kv"]


def _check_range(b: int, pair: object) -> tuple[int, int]:
    # Exact type checks (bools and other int subclasses refused): this runs per image range
    # and step on the host, ahead of every decode step.
    if type(pair) in (tuple, list) and len(pair) == 2:
        start, end = pair
        if type(start) is int and type(end) is int and 0 <= start <= end:
            return start, end
    raise ValueError(f"bidiattn: request {b} has image range {pair!r}; expected an inclusive (start, end) pair of "
                     "ints with 0 <= start <= end")


def step_blocks(ranges: Mapping[int, Sequence[tuple[int, int]]] | None, query_lens: Sequence[int],
                key_lens: Sequence[int] | None, *, merge: bool) -> tuple[list[int], list[int], list[int]]:
    """The step's blocks, packed per request: ``(starts, ends, counts)`` with ``[start, end)``
    local key positions and ``counts[b]`` blocks of request ``b`` (host lists, no tensors).

    Args:
        ranges: vLLM's ``mm_req_doc_ranges``: request index -> inclusive ``(start, end)``
            ranges (any order); ``None`` or a missing request: no blocks.
        query_lens: the step's query rows per request (``B`` entries).
        key_lens: keys per request after the step (cached plus new), or upper bounds where
            they are not exact; ``None``: unknown, every block is kept.
        merge: ranges that touch or overlap form one block (bidiattn's blocks are maximal runs
            of image tokens); without it (the ``vllm`` rule) each range is a block and ranges
            of one request must not overlap.

    A block is kept where it holds one of the request's new rows, positions ``key_len -
    query_len`` to ``key_len - 1``: the only blocks the span builder can find for a row.
    """
    num = len(query_lens)
    if key_lens is not None and len(key_lens) != num:
        raise ValueError(f"bidiattn: {len(key_lens)} key lengths for {num} requests")
    starts: list[int] = []
    ends: list[int] = []
    counts = [0] * num
    if not ranges:
        return starts, ends, counts
    for b, pairs in ranges.items():
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < num:
            raise ValueError(f"bidiattn: mm_req_doc_ranges names request {b!r}; the step has {num} requests")
        if not pairs:
            continue
        blocks = sorted(_check_range(b, p) for p in pairs)
        joined: list[list[int]] = []
        for s, e in blocks:
            if joined and s <= joined[-1][1] + (1 if merge else 0):
                if not merge:
                    raise ValueError(f"bidiattn: request {b} has overlapping image ranges {tuple(joined[-1])} and "
                                     f"{(s, e)}")
                joined[-1][1] = max(joined[-1][1], e)
            else:
                joined.append([s, e])
        if key_lens is None:
            first, last = 0, None
        else:
            last = int(key_lens[b]) - 1
            first = last + 1 - int(query_lens[b])
        for s, e in joined:
            if e >= first and (last is None or s <= last):
                starts.append(s)
                ends.append(e + 1)
                counts[b] += 1
    return starts, ends, counts


@dataclass(frozen=True)
class StepLayout:
    """The device side of one step: its blocks and int64 offsets (views of the builder's
    persistent buffers), the row count ``total_tokens`` (vLLM's ``num_actual_tokens``, padding
    included) and a bound on the key count ``total_keys``; from the host, the fewest new rows of
    a request with any (``min_rows``) and the step's key count where vLLM gave it (``host_keys``,
    exact or an upper bound; ``None`` otherwise)."""

    blocks: BlockList
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    total_tokens: int
    total_keys: int
    min_rows: int = 0
    host_keys: int | None = None


@dataclass(frozen=True)
class StepMetadata:
    """What the impl reads in one forward pass: the step's :class:`StepLayout`, the served
    :class:`~bidiattn.integrations.vllm.config.ModelRule`, vLLM's block table (int32 ``[B, P]``)
    and slot mapping, and the number of rows. The spans and plans of each layer kind are made
    by the first layer that needs them and kept in ``_prepared`` for the others, which the
    metadata of the step's other KV-cache groups share (none of it depends on the block table)."""

    layout: StepLayout
    model: ModelRule
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_actual_tokens: int
    _prepared: dict = field(default_factory=dict, repr=False, compare=False)

    def spans(self, kind: LayerKind, *, gathered: bool = False) -> SpanMask:
        """The extend spans of layers of ``kind`` (one span-builder launch, then kept); with
        ``gathered``, counting the step's ``host_keys`` keys (the rows of the gathered copy)
        instead of the bound ``total_keys``."""
        key = (kind, gathered)
        found = self._prepared.get(key)
        if found is None:
            lay, m = self.layout, self.model
            found = self._prepared[key] = rules.build_from_blocks(
                m.family, m.convention, kind.layer, blocks=lay.blocks, cu_seqlens=lay.cu_q,
                total_tokens=lay.total_tokens, window=kind.window, cu_seqlens_k=lay.cu_k,
                total_keys=lay.host_keys if gathered else lay.total_keys, validate=False)
        return found

    def gathers(self, head_dim: int, dtype: torch.dtype, softcap: bool, device: torch.device) -> bool:
        """Whether layers of this head dim copy the step's keys out of the pages and run the Gluon
        forward (:func:`bidiattn.launch.auto_backend`'s paged rule, per request, not on average):
        head dim 512 on SM90 with Gluon, no softcap, every request with new rows has at least
        ``launch.GLUON_PAGED_ROWS`` of them (prefill chunks, where it is the faster: PERF.md G8;
        decode and mixed steps keep the paged kernel), and the host knows the key
        count, at most ``GATHER_KEYS_PER_ROW`` keys per row the step may hold (the copy, K and V
        of every key, stays a few times the step's own activations)."""
        from ...launch import GLUON_PAGED_ROWS, gluon_unsupported

        lay = self.layout
        if head_dim != 512 or softcap or lay.host_keys is None or lay.min_rows < GLUON_PAGED_ROWS:
            return False
        if lay.host_keys > GATHER_KEYS_PER_ROW * self.capacity:
            return False
        return gluon_unsupported(device, dtype, head_dim) is None

    def plan(self, kind: LayerKind, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *,
             softcap: bool = False):
        """The :class:`bidiattn.launch.Plan` of this kind's layers for this head shape (made once by
        the first layer, then kept): gluon over the gathered keys where :meth:`gathers` says so
        (its spans count ``host_keys`` keys, the copy's size), else triton over the pages."""
        key = (kind, num_q_heads, num_kv_heads, head_dim, dtype, softcap)
        found = self._prepared.get(key)
        if found is None:
            from ...launch import plan

            gather = self.gathers(head_dim, dtype, softcap, self.layout.cu_q.device)
            window = kind.window if kind.layer == "sliding" else None
            found = self._prepared[key] = plan(self.spans(kind, gathered=gather), num_q_heads, num_kv_heads, head_dim,
                                               window=window, backend="gluon" if gather else "triton", dtype=dtype,
                                               paged=True)
        return found

    @property
    def capacity(self) -> int:
        """The most query rows a step holds (the builder's ``max_num_batched_tokens``)."""
        return self.layout.blocks.starts.numel()

    def for_group(self, block_table: torch.Tensor, slot_mapping: torch.Tensor) -> StepMetadata:
        """This step's metadata for another KV-cache group: that group's block table (int32
        ``[B', P]`` with ``B'`` at least this step's requests; its first rows taken) and slot
        mapping, with this step's layout and the spans and plans its layers prepare (shared: none
        of them depends on the block table)."""
        _check_block_table(block_table)
        rows = self.block_table.shape[0]
        if block_table.shape[0] < rows:
            raise ValueError(f"bidiattn: the block table has {block_table.shape[0]} rows, the step {rows} requests")
        return dataclasses.replace(self, block_table=block_table[:rows], slot_mapping=slot_mapping)


# Keys per row of a step's capacity up to which head-dim-512 prefill steps gather their keys
# (StepMetadata.gathers): 4 x 8192 = 32K keys, 256 MB of K and V at 4 K/V heads.
GATHER_KEYS_PER_ROW = 4


@dataclass(frozen=True)
class StepBuilder:
    """Persistent buffers of a vLLM engine's metadata builders and the per-step work that fills
    them. vLLM builds metadata once per KV-cache group and step (Gemma-4-31B's 5:1 layer pattern
    makes six groups) from the same request layout; the builders share one ``StepBuilder``, whose
    first :meth:`build` of a step writes the buffers and whose later builds of that step (the
    same host values and the same vLLM objects) return the first's layout and prepared spans and
    plans with their own block table: one host build, one span build and one plan per layer kind
    and step, in eager steps and CUDA graphs alike.

    - ``starts``/``ends``: int32 ``[capacity]``, the step's blocks (:func:`step_blocks`);
      ``capacity`` is the most rows a step has (vLLM's ``max_num_batched_tokens``), which
      bounds the blocks.
    - ``cu_blocks``, ``cu_q``, ``cu_k``: int64 ``[max_seqs + 1]``: blocks, query rows and keys
      per request, as offsets.

    The tensors never change identity, so a CUDA graph captured over one step's metadata reads
    the next step's values after :meth:`build` rewrote them.
    """

    model: ModelRule
    kinds: tuple[LayerKind, ...]
    max_model_len: int
    starts: torch.Tensor
    ends: torch.Tensor
    cu_blocks: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    # Per request count: the buffers' views a step of that many requests writes and reads
    # (slicing and the BlockList's checks once per count, not per step).
    _views: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # The last step built (a one-element list once there is one): see _Built.
    _last: list = field(default_factory=list, init=False, repr=False, compare=False)

    @classmethod
    def allocate(cls, model: ModelRule, kinds: Sequence[LayerKind], *, max_seqs: int, max_tokens: int,
                 max_model_len: int, device: torch.device | str) -> StepBuilder:
        for name, value in (("max_seqs", max_seqs), ("max_tokens", max_tokens), ("max_model_len", max_model_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"bidiattn: {name} must be a positive int, got {value!r}")

        def zeros(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, device=device)

        return cls(model, tuple(kinds), max_model_len, zeros(max_tokens, torch.int32), zeros(max_tokens, torch.int32),
                   zeros(max_seqs + 1, torch.int64), zeros(max_seqs + 1, torch.int64), zeros(max_seqs + 1, torch.int64))

    @property
    def capacity(self) -> int:
        return self.starts.numel()

    @property
    def max_seqs(self) -> int:
        return self.cu_q.numel() - 1

    @property
    def reads_blocks(self) -> bool:
        return any(kind.rule.blocks != "none" for kind in self.kinds)

    def build(self, *, num_reqs: int, num_tokens: int, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
              query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor | None,
              ranges: Mapping[int, Sequence[tuple[int, int]]] | None, block_table: torch.Tensor,
              slot_mapping: torch.Tensor) -> StepMetadata:
        """Write one step into the buffers and return its metadata (vLLM's names: device
        ``query_start_loc`` int32 ``[B+1]`` and ``seq_lens`` int32 ``[B]``, their host copies,
        ``seq_lens_cpu`` exact or an upper bound, ``None`` if unknown). A call with the objects
        and host values of the previous call (another KV-cache group of the same step) writes
        nothing and returns that call's layout and prepared spans and plans with its own block
        table and slot mapping.

        The key count the spans carry is the bound ``num_reqs * max_model_len`` at every step,
        not the step's sum: it sets the split-KV count of decode steps, which must be the same
        in vLLM's warm-up runs (where Triton compiles), in the CUDA-graph capture and at each
        replay; each split's key range still follows the real lengths on the device."""
        if num_reqs > self.max_seqs:
            raise ValueError(f"bidiattn: a step of {num_reqs} requests exceeds the builder's {self.max_seqs}")
        _check_block_table(block_table)
        cu_q_host = query_start_loc_cpu[: num_reqs + 1].tolist()
        k_lens = None if seq_lens_cpu is None else seq_lens_cpu[:num_reqs].tolist()
        sources = (query_start_loc_cpu, query_start_loc, seq_lens, ranges)
        values = (num_reqs, num_tokens, cu_q_host, k_lens)
        last = self._last[0] if self._last else None
        if last is not None and last.values == values and all(a is b for a, b in zip(last.sources, sources)):
            # Another KV-cache group of the step just built: the buffers hold it already.
            return last.metadata.for_group(block_table, slot_mapping)
        q_lens = [b - a for a, b in zip(cu_q_host[:-1], cu_q_host[1:])]
        starts, ends, counts = step_blocks(ranges if self.reads_blocks else None, q_lens, k_lens,
                                           merge=self.model.merges_adjacent)
        n = len(starts)
        if n > self.capacity:
            raise ValueError(f"bidiattn: the step has {n} image blocks on its rows, more than the {self.capacity} the "
                             "builder holds (max_num_batched_tokens)")
        views = self._views.get(num_reqs)
        if views is None:
            cu_blocks = self.cu_blocks[: num_reqs + 1]
            cu_k = self.cu_k[: num_reqs + 1]
            views = self._views[num_reqs] = (cu_blocks, self.cu_q[: num_reqs + 1], cu_k, cu_k[1:],
                                             BlockList(self.starts, self.ends, cu_blocks))
        cu_blocks, cu_q, cu_k, cu_k_tail, blocks = views
        if n:
            pin = self.starts.is_cuda
            host = torch.tensor(starts + ends, dtype=torch.int32)
            offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
            if pin:
                host, offsets = host.pin_memory(), offsets.pin_memory()
            self.starts[:n].copy_(host[:n], non_blocking=pin)
            self.ends[:n].copy_(host[n:], non_blocking=pin)
            cu_blocks.copy_(offsets, non_blocking=pin)
        else:
            cu_blocks.zero_()
        cu_q.copy_(query_start_loc[: num_reqs + 1])
        torch.cumsum(seq_lens[:num_reqs], 0, dtype=torch.int64, out=cu_k_tail)
        total_keys = max(1, num_reqs * self.max_model_len)
        min_rows = min((n for n in q_lens if n > 0), default=0)
        host_keys = None if k_lens is None else max(1, sum(k_lens))
        layout = StepLayout(blocks, cu_q, cu_k, num_tokens, total_keys, min_rows, host_keys)
        meta = StepMetadata(layout, self.model, block_table[:num_reqs], slot_mapping, num_tokens)
        self._last[:] = [_Built(sources, values, meta)]
        return meta


@dataclass(frozen=True)
class _Built:
    """A step a :class:`StepBuilder` wrote into its buffers: the vLLM objects and host values it
    came from (another build from the same objects and values is the same step) and its metadata,
    whose layout and prepared spans and plans the step's other KV-cache groups share
    (:meth:`StepMetadata.for_group`)."""

    sources: tuple
    values: tuple
    metadata: StepMetadata


def _check_block_table(block_table: torch.Tensor) -> None:
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.stride(-1) != 1:
        raise ValueError(f"bidiattn: the block table must be int32 [B, P] with unit last stride, got "
                         f"{block_table.dtype} {tuple(block_table.shape)} strides {block_table.stride()}")


def _strides_match(t: torch.Tensor, want: tuple[int, ...]) -> bool:
    return all(size == 1 or got == w for size, got, w in zip(t.shape, t.stride(), want))


def kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K and V of one layer's vLLM cache as ``[num_blocks * block_size, Hkv, D]`` strided views
    (no copy) and the block size.

    ``kv_cache`` is what vLLM hands the impl: logical ``[num_blocks, Hkv, block_size, 2 * D]``
    with NHD strides (memory ``[num_blocks, block_size, Hkv, 2 * D]``; each token-head row is
    ``D`` key values then ``D`` value values). Another layout (HND, padded pages, a cross-layer
    cache) raises ``ValueError`` naming the strides: the kernels address key ``n`` as row
    ``page * block_size + slot`` of one flat view.
    """
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4 or kv_cache.shape[3] != 2 * head_size:
        raise ValueError(f"bidiattn: the KV cache must be [num_blocks, Hkv, block_size, 2 * {head_size}], got "
                         f"{tuple(getattr(kv_cache, 'shape', ()))}")
    nb, h, bs, c = kv_cache.shape
    want = (bs * h * c, c, h * c, 1)
    if not _strides_match(kv_cache, want):
        raise ValueError(f"bidiattn: the KV cache of shape {tuple(kv_cache.shape)} has strides {kv_cache.stride()}; "
                         f"bidiattn reads dense NHD pages (strides {want}), not another layout, padded pages or a "
                         "cross-layer cache")
    rows = kv_cache.transpose(1, 2).view(nb * bs, h, c)
    return rows[..., :head_size], rows[..., head_size:], bs


def attend(q: torch.Tensor, kv_cache: torch.Tensor, metadata: StepMetadata, kind: LayerKind, *, scale: float,
           softcap: float | None, out: torch.Tensor) -> torch.Tensor:
    """One layer's attention of the step's rows ``q [T, Hq, D]`` over its paged cache under the
    rule of ``kind``, written into ``out [T, Hq, D]`` (vLLM's output buffer): the span kernel
    with the page lookup in its key loads, split-KV on decode-sized steps; at head dim 512 on a
    prefill step (:meth:`StepMetadata.gathers`), the keys copied out of the pages, then the Gluon
    forward."""
    d = q.shape[-1]
    k, v, page_size = kv_views(kv_cache, d)
    if q.dtype != kv_cache.dtype:
        raise TypeError(f"bidiattn: queries are {q.dtype}, the KV cache {kv_cache.dtype}")
    if out.shape != q.shape or out.stride(-1) != 1 or out.dtype != q.dtype:
        raise ValueError(f"bidiattn: out must be {tuple(q.shape)} {q.dtype} with unit last stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    plan = metadata.plan(kind, q.shape[1], k.shape[1], d, q.dtype, softcap=softcap is not None)
    spans = plan.spans
    if plan.backend == "gluon":
        from ...serving.kvcache import PagedKVCache, _gluon_forward

        pages = kv_cache.transpose(1, 2)  # [num_blocks, block_size, Hkv, 2 * D]: K, then V, per key and head
        got, _ = _gluon_forward(q, PagedKVCache(pages[..., :d], pages[..., d:]), metadata.block_table, spans, scale,
                               plan.gluon, out=out if out.is_contiguous() else None)
        if got is not out:
            out.copy_(got)
        return out
    from ...kernels.forward import span_attention_forward

    span_attention_forward(q, k, v, spans, scale, softcap, out=out, page_table=metadata.block_table,
                           page_size=page_size, plan=plan.triton)
    return out


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """vLLM's cache write, in PyTorch: row ``i`` of ``key``/``value [T, Hkv, D]`` goes to slot
    ``slot_mapping[i]`` (``block * block_size + offset``; negative: padding, skipped; rows past
    ``slot_mapping`` are padding too). The spec of vLLM's ``reshape_and_cache_flash``, which the
    backend calls on CUDA; this one indexes with a boolean mask (a host sync on CUDA)."""
    k, v, _ = kv_views(kv_cache, key.shape[-1])
    n = slot_mapping.numel()
    slots = slot_mapping.long()
    keep = slots >= 0
    k[slots[keep]] = key[:n][keep].to(k.dtype)
    v[slots[keep]] = value[:n][keep].to(v.dtype)
