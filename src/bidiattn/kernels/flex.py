"""FlexAttention backend: a ``BlockMask`` built from the spans, O(T / block) work, no T x T mask.

Packed sequences are flattened to packed key positions (:meth:`SpanMask.packed_bounds`), which
are non-decreasing over the whole pack, so every query block of ``block_size`` rows has its
bounds at its first and last row, and its key blocks are:
full (inside ``[lo_max, hi_min]``, no ``mask_mod`` call), partial (the ragged ends, masked by
``mask_mod``) or absent. The block tables are built on the device without a host sync.
"""

from __future__ import annotations

import functools

import torch

from ..spans import SpanMask

__all__ = ["block_mask_from_spans", "span_attention_flex"]

FLEX_BLOCK_SIZE = 128


def _block_table(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[1, 1, nq]`` and indices ``[1, 1, nq, nk]`` (members first, ascending) of a
    ``[nq, nk]`` membership matrix."""
    nk = member.shape[1]
    idx = torch.arange(nk, device=member.device)
    key = torch.where(member, idx, idx + nk)
    order = torch.argsort(key, dim=1).to(torch.int32)
    return member.sum(1, dtype=torch.int32)[None, None], order[None, None]


def block_mask_from_spans(spans: SpanMask, block_size: int | tuple[int, int] = FLEX_BLOCK_SIZE,
                          for_backward: bool = True, padded_length: int | None = None):
    """FlexAttention ``BlockMask`` (batch 1, broadcast over heads) equal to ``spans.to_dense()``.

    ``block_size``: one size for query and key blocks, or ``(query block, key block)``.
    ``for_backward=False`` skips the transposed (per-key-block) tables only a backward reads.
    ``padded_length`` (>= T) appends rows that attend only themselves, for inputs padded to it.
    """
    glo, ghi = spans.packed_bounds()
    t = spans.total_tokens
    if padded_length is not None and padded_length > t:
        extra = torch.arange(t, padded_length, device=glo.device)
        glo, ghi, t = torch.cat([glo, extra]), torch.cat([ghi, extra]), padded_length
    return _block_mask(glo, ghi, t, block_size, for_backward)


def _block_mask(glo: torch.Tensor, ghi: torch.Tensor, t: int, block_size: int | tuple[int, int], for_backward: bool):
    from torch.nn.attention.flex_attention import BlockMask

    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq = -(-t // bq)
    first = torch.arange(nq, device=glo.device) * bq
    last = torch.clamp(first + bq - 1, max=t - 1)
    lo_min, lo_max, hi_min, hi_max = glo[first], glo[last], ghi[first], ghi[last]
    kb = torch.arange(-(-t // bk), device=glo.device)[None, :]
    visited = (kb >= (lo_min // bk)[:, None]) & (kb <= (hi_max // bk)[:, None])
    full_start = -(-lo_max // bk)
    full_end = (hi_min + 1) // bk
    full = (kb >= full_start[:, None]) & (kb < full_end[:, None])
    partial = visited & ~full
    kv_num, kv_idx = _block_table(partial)
    full_num, full_idx = _block_table(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= glo[q_idx]) & (kv_idx <= ghi[q_idx])

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(t, t),
        compute_q_blocks=for_backward,
    )


def _softcap_score_mod(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


@functools.cache
def _compiled_flex():
    # FlexAttention is only fast compiled; one compiled callable per process so that repeated
    # calls reuse Dynamo's cache instead of recompiling.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def span_attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask,
    scale: float, softcap: float | None, flash: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run FlexAttention on validated inputs; returns ``out [T, Hq, D]`` and ``lse [Hq, T]`` (fp32).

    Compiled on CUDA; eager elsewhere (slow, for tests). Differentiable. ``flash=True`` asks
    FlexAttention for its FLASH backend: FA4 (``flash_attn.cute``) with the spans' ``mask_mod``
    compiled to CuTe and the block tables as FA4's block sparsity, forward and backward (CUDA,
    head dim <= 256; the FA4 backend's ``mask_mod`` strategy); with gradients it returns no
    lse (``None``).
    """
    from torch.nn.attention.flex_attention import flex_attention

    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    t = q.shape[0]
    padded = t
    if q.is_cuda and t % FLEX_BLOCK_SIZE:
        # Compiled FlexAttention finds no kernel config for lengths that are not a multiple of
        # its 128-row block (torch 2.11): pad with rows that attend only themselves and drop
        # them from the output.
        padded = -(-t // FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - t)) for x in (q, k, v))
    # FA4 on SM90 needs key blocks equal to its key tile: 80 at hd256, 128 up to hd128
    # (FA4 4.0.0b36).
    block = (FLEX_BLOCK_SIZE, 80 if q.shape[-1] > 128 else FLEX_BLOCK_SIZE) if flash else FLEX_BLOCK_SIZE
    block_mask = block_mask_from_spans(spans, block, for_backward=needs_grad, padded_length=padded)
    score_mod = _softcap_score_mod(softcap) if softcap is not None else None

    fn = _compiled_flex() if q.is_cuda else flex_attention
    options = None
    if flash:
        options = dict(BACKEND="FLASH")
    elif q.is_cuda and q.shape[-1] > 256:
        # FlexAttention's default tiles need more shared memory than a Hopper block has at
        # hd512; 32x32 tiles with one stage fit.
        options = dict(BLOCK_M=32, BLOCK_N=32, num_stages=1)
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                  kernel_options=options)
    if flash and needs_grad:
        # The FLASH backward cannot differentiate through the lse ("FLASH backend backward does
        # not support differentiating through logsumexp", torch 2.11), and asking for the lse
        # makes it part of the graph: no lse then.
        out = fn(qt, kt, vt, **kwargs)
        return out.squeeze(0).transpose(0, 1)[:t], None
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9 only has the older flag
        out, lse = fn(qt, kt, vt, return_lse=True, **kwargs)
    else:
        out, aux = fn(qt, kt, vt, return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    return out.squeeze(0).transpose(0, 1)[:t], lse.squeeze(0).float()[:, :t]
