"""Paged K/V cache: fixed-size pages, a page table per sequence, append and attention over it.

Layout (one layer)::

    k_pages, v_pages   [num_pages, page_size, Hkv, D]
    page_table         int32 [B, max_pages_per_seq]: page of each sequence's n-th page_size keys

Key ``n`` of sequence ``b`` lives in page ``page_table[b, n // page_size]`` at slot
``n % page_size``. The engine owns page allocation (which pages a sequence gets); this module
writes and reads through the table, with no host sync when ``validate=False`` (CUDA graphs).
Attention runs the span kernel with the page lookup folded into its key loads (at head dim
512 on Hopper, long chunks copy the keys out with :func:`gather` for the Gluon kernel), over extend
spans (:class:`~bidiattn.SpanMask` with ``cu_seqlens_k``): each sequence's new query rows are
the last rows of its ``k_len`` cached keys, e.g. a prefill chunk from
:func:`bidiattn.serving.prefill.step_spans` or one decode token.

Page size and speed: when a page holds a whole number of the kernel's key tiles (64 keys at
head dims up to 256), key tiles come through TMA with one table read per tile, read a tile
ahead; smaller pages gather each key row through the table, which is slower (speeds in
benchmarks/PERF.md, rows P6-P7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import check_scale_softcap
from ..launch import Plan, check_plan, interpreting
from ..spans import SpanMask, _first_true, sequence_index

__all__ = ["PagedKVCache", "append", "gather", "paged_attention"]


@dataclass(frozen=True)
class PagedKVCache:
    """K/V pages of one layer (see the module doc). The tensors are written in place by
    :func:`append`; the dataclass itself never changes."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("k_pages", "v_pages"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"PagedKVCache.{name} must be a [num_pages, page_size, Hkv, D] tensor")
        if self.k_pages.shape != self.v_pages.shape or self.k_pages.dtype != self.v_pages.dtype:
            raise ValueError(f"k_pages and v_pages differ: {tuple(self.k_pages.shape)} {self.k_pages.dtype} vs "
                             f"{tuple(self.v_pages.shape)} {self.v_pages.dtype}")
        if self.k_pages.device != self.v_pages.device:
            raise ValueError("k_pages and v_pages must be on one device")
        if not self.k_pages.dtype.is_floating_point:
            raise TypeError(f"PagedKVCache pages must be a floating-point dtype (the keys' and values'), "
                            f"got {self.k_pages.dtype}")

    @classmethod
    def allocate(cls, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cuda") -> PagedKVCache:
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages as ``[num_pages * page_size, Hkv, D]`` views (what the kernel indexes)."""
        return tuple(t.view(-1, *t.shape[2:]) for t in (self.k_pages, self.v_pages))


def _check_page_table(cache: PagedKVCache, page_table: torch.Tensor, num_seqs: int) -> None:
    if not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32 or page_table.dim() != 2:
        raise TypeError("page_table must be an int32 tensor of shape [B, max_pages_per_seq]")
    if page_table.shape[0] != num_seqs:
        raise ValueError(f"page_table has {page_table.shape[0]} rows for {num_seqs} sequences")
    if page_table.device != cache.k_pages.device:
        raise ValueError(f"page_table is on {page_table.device}, the cache on {cache.k_pages.device}")


def _check_capacity(cache: PagedKVCache, page_table: torch.Tensor, needed: torch.Tensor) -> None:
    """Host-sync checks: every sequence's keys fit its table row, and the pages they use exist."""
    capacity = page_table.shape[1] * cache.page_size
    b = _first_true(needed > capacity)
    if b is not None:
        raise ValueError(f"sequence {b} needs {int(needed[b])} keys but its page-table row holds "
                         f"{page_table.shape[1]} pages x {cache.page_size} = {capacity}")
    used = torch.arange(page_table.shape[1], device=page_table.device)[None, :] * cache.page_size < needed[:, None]
    bad = used & ((page_table < 0) | (page_table >= cache.num_pages))
    b = _first_true(bad.any(1))
    if b is not None:
        j = int(bad[b].int().argmax())
        raise ValueError(f"page_table[{b}, {j}] = {int(page_table[b, j])} is not a page (0..{cache.num_pages - 1})")


def gather(cache: PagedKVCache, page_table: torch.Tensor, cu_seqlens_k: torch.Tensor, total_keys: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's keys copied out of the pages, packed as the spans index them: ``k``/``v``
    ``[total_keys, Hkv, D]`` with key ``n`` of sequence ``b`` at row ``cu_seqlens_k[b] + n``.
    On the cache's device, no host sync; the pages may be strided views. What the gluon backend
    reads (its kernel loads contiguous key tiles through TMA). ``total_keys`` may exceed
    ``cu_seqlens_k[-1]`` (a captured step's capacity): the rows past it hold whatever the last
    sequence's pages hold there, read by no span. ``page_table``: int32 ``[B, P]``;
    ``cu_seqlens_k``: int64 ``[B+1]`` key offsets; bad types or shapes raise naming the value."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dtype != torch.int64 or cu_seqlens_k.dim() != 1:
        raise TypeError("cu_seqlens_k must be an int64 [B+1] tensor, got "
                        f"{getattr(cu_seqlens_k, 'dtype', type(cu_seqlens_k).__name__)}")
    _check_page_table(cache, page_table, cu_seqlens_k.numel() - 1)
    if isinstance(total_keys, bool) or not isinstance(total_keys, int) or total_keys < 0:
        raise ValueError(f"total_keys must be a non-negative int, got {total_keys!r}")
    return _gather(cache, page_table, cu_seqlens_k, total_keys)


def _gluon_forward(q: torch.Tensor, cache: PagedKVCache, page_table: torch.Tensor, spans: SpanMask, scale: float,
                   plan, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gluon backend over paged keys, on checked arguments: each sequence's keys copied out
    of the pages (:func:`gather`), then the Gluon forward with the ``GluonPlan``'s config and tiles;
    ``out [T, Hq, D]`` (written into ``out`` where given, contiguous) and ``lse [Hq, T]``."""
    from ..kernels.sm90_wide import forward_sm90_hd512

    k, v = _gather(cache, page_table, spans.cu_seqlens_k, spans.total_keys)
    return forward_sm90_hd512(q, k, v, spans, scale, config=plan.config, tiles=plan.tiles, out=out)


def _gather(cache: PagedKVCache, page_table: torch.Tensor, cu_seqlens_k: torch.Tensor, total_keys: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather` of checked arguments."""
    seq = sequence_index(cu_seqlens_k, total_keys).clamp_(max=page_table.shape[0] - 1)
    n = torch.arange(total_keys, device=cu_seqlens_k.device) - cu_seqlens_k[seq]
    page = page_table[seq, (n // cache.page_size).clamp_(max=page_table.shape[1] - 1)].long()
    slot = n % cache.page_size
    return tuple(_gather_rows(pages, page, slot) for pages in (cache.k_pages, cache.v_pages))


def _gather_rows(pages: torch.Tensor, page: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``pages[page, slot]``; where each key's ``Hkv * D`` values are contiguous and pages start
    on a whole number of such rows (contiguous pages, vLLM's interleaved K/V), as whole-row
    copies (``index_select`` over a row view of the storage) rather than element by element."""
    p, size, h, d = pages.shape
    row = h * d
    if (pages.stride(3), pages.stride(2), pages.stride(1)) != (1, d, row) or pages.stride(0) % row:
        return pages[page, slot]
    per_page = pages.stride(0) // row
    rows = pages.as_strided(((p - 1) * per_page + size, row), (row, 1))
    return rows.index_select(0, page * per_page + slot).view(-1, h, d)


def append(cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor, page_table: torch.Tensor,
           cu_seqlens: torch.Tensor, start: torch.Tensor, *, validate: bool = True) -> None:
    """Write new keys/values into the pages: packed row ``cu_seqlens[b] + i`` (``[T, Hkv, D]``)
    becomes key ``start[b] + i`` of sequence ``b``.

    ``start`` is int64 ``[B]`` (tokens already cached per sequence). On CUDA one fused Triton
    launch writes both (:mod:`bidiattn.kernels.append`); elsewhere two scattered writes. No host
    sync with ``validate=False``.
    """
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != cache.k_pages.shape[2:]:
        raise ValueError(f"k and v must be [T, {cache.k_pages.shape[2]}, {cache.k_pages.shape[3]}], "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != cache.k_pages.dtype or v.dtype != cache.k_pages.dtype:
        raise TypeError(f"k/v dtype {k.dtype}/{v.dtype} differs from the cache's {cache.k_pages.dtype}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int64 or cu_seqlens.dim() != 1:
        raise TypeError("cu_seqlens must be an int64 tensor of shape [B+1]")
    num_seqs = cu_seqlens.numel() - 1
    _check_page_table(cache, page_table, num_seqs)
    if start.shape != (num_seqs,) or start.dtype != torch.int64:
        raise TypeError(f"start must be int64 [B={num_seqs}], got {start.dtype} {tuple(start.shape)}")
    for name, t in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens), ("start", start)):
        if t.device != cache.k_pages.device:
            raise ValueError(f"{name} is on {t.device}, the cache on {cache.k_pages.device}")
    if validate:
        if int(cu_seqlens[-1]) != k.shape[0]:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but k has {k.shape[0]} rows")
        _check_capacity(cache, page_table, start + cu_seqlens[1:] - cu_seqlens[:-1])
    contiguous = cache.k_pages.is_contiguous() and cache.v_pages.is_contiguous()
    if contiguous and (k.is_cuda or interpreting()):
        from ..kernels.append import append_triton

        append_triton(cache.k_pages, cache.v_pages, k, v, page_table, cu_seqlens, start)
        return
    # The spec of the fused kernel (and the CPU path).
    seq = sequence_index(cu_seqlens, k.shape[0])
    pos = start[seq] + torch.arange(k.shape[0], device=k.device) - cu_seqlens[seq]
    page = page_table[seq, pos // cache.page_size].long()
    slot = pos % cache.page_size
    cache.k_pages[page, slot] = k
    cache.v_pages[page, slot] = v


def paged_attention(q: torch.Tensor, cache: PagedKVCache, page_table: torch.Tensor, spans: SpanMask, *,
                    scale: float | None = None, softcap: float | None = None, return_lse: bool = False,
                    validate: bool = True, backend: str = "auto", plan: Plan | None = None):
    """Attention of new query rows over their sequences' paged keys (forward).

    Args:
        q: ``[T, Hq, D]`` fp16/bf16, the new rows of each sequence, packed.
        cache, page_table: the layer's pages and the int32 ``[B, P]`` table.
        spans: extend spans: ``spans.cu_seqlens`` packs ``q``, ``spans.cu_seqlens_k`` holds each
            sequence's key count (cached plus new; the new keys already appended).
        validate: host-sync checks that every sequence's keys fit its table row and use real pages.
        backend: ``"auto"`` (triton: serving steps are decode and prefill chunks, where it is the
            faster; gluon at head dim 512 on Hopper for prefill chunks of at least 256 rows per
            sequence and no softcap; see :func:`bidiattn.launch.auto_backend`), ``"triton"`` (the span kernel
            with the page lookup in its key loads), ``"fa4"`` (FlashAttention-4 window launches
            over row segments, each reading its sequence's page-table row; Hopper/Blackwell,
            head dims FA4 supports there) or ``"gluon"`` (head dim 512 on Hopper: the keys
            copied out of the pages by :func:`gather`, then the Gluon forward; no softcap).
        plan: :func:`bidiattn.plan` of ``spans`` with ``paged=True`` (for triton a plan made
            without it serves too), built once per step and shared by the layers that use these
            spans; it runs the backend it records. Without it the call plans once per
            ``SpanMask`` object and head shape and keeps the plan on the spans (triton: no host
            sync, so a step stays capturable in a CUDA graph; fa4: one host sync).

    Returns ``out [T, Hq, D]`` (and ``lse [Hq, T]``).
    """
    from ..launch import fa4_unsupported, gluon_unsupported, planned, triton_unsupported

    if backend not in ("auto", "triton", "fa4", "gluon"):
        raise ValueError(f"paged_attention backend must be 'auto', 'triton', 'fa4' or 'gluon', got {backend!r}")
    for name, flag in (("return_lse", return_lse), ("validate", validate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[0] != spans.total_tokens:
        raise ValueError(f"q must be [T={spans.total_tokens}, Hq, D], got {tuple(getattr(q, 'shape', ()))}")
    if q.dtype != cache.k_pages.dtype:
        raise TypeError(f"q has dtype {q.dtype}, the cache {cache.k_pages.dtype}")
    hkv, d = cache.k_pages.shape[2:]
    if q.shape[2] != d or q.shape[1] % hkv:
        raise ValueError(f"q heads/dim {tuple(q.shape[1:])} do not fit the cache's {hkv} kv heads of dim {d}")
    if plan is not None:
        check_plan(plan, q, hkv, spans, paged=True, backend=backend)
    run = plan.backend if plan is not None else backend
    if run != "auto":
        checks = {"triton": triton_unsupported, "fa4": fa4_unsupported, "gluon": gluon_unsupported}
        unsupported = checks[run](q.device, q.dtype, d)  # device, dtype, head dim: the kernel's limits
        if unsupported is not None:
            raise unsupported
    _check_page_table(cache, page_table, spans.num_sequences)
    if validate:
        _check_capacity(cache, page_table, spans.cu_seqlens_k[1:] - spans.cu_seqlens_k[:-1])
    scale = check_scale_softcap(scale, softcap, d)
    softcap = None if softcap is None else float(softcap)
    if plan is None:
        plan = planned(spans, q.shape[1], hkv, d, backend=backend, training=False, dtype=q.dtype, paged=True,
                       softcap=softcap is not None)
    if plan.backend == "gluon":
        if softcap is not None:
            raise ValueError(f"backend='gluon' takes no softcap (got softcap={softcap}); use backend='triton'")
        out, lse = _gluon_forward(q, cache, page_table, spans, scale, plan.gluon)
        return (out, lse) if return_lse else out
    if plan.backend == "fa4":
        from ..kernels.fa4 import span_attention_fa4_forward

        out, lse = span_attention_fa4_forward(q, cache.k_pages, cache.v_pages, scale, softcap, plan.segments,
                                              page_table=page_table)
        return (out, lse) if return_lse else out
    from ..kernels.forward import span_attention_forward

    k_flat, v_flat = cache.flat()
    out, lse = span_attention_forward(q, k_flat, v_flat, spans, scale, softcap, page_table=page_table,
                                      page_size=cache.page_size, plan=plan.triton)
    return (out, lse) if return_lse else out
