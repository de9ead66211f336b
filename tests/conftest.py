"""Shared test helpers: random layouts and an independent statement of the rule table."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Kernels run through Triton's interpreter where there is no GPU; this must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Tests of the CPU path through Triton's interpreter (CPU tensors, TRITON_INTERPRET=1, which this
# file sets only where CUDA is missing); their GPU counterparts carry the ``gpu`` marker.
cpu_interpreter_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the CPU path through Triton's interpreter (CUDA present: "
    "TRITON_INTERPRET is not set); the gpu-marked tests cover the CUDA path")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `python -m pytest -m gpu` on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_packed_layout(rng: random.Random, max_seqs: int = 3, max_len: int = 40, block_frac: float = 0.5):
    """(block_ids [T] int64, cu_seqlens [B+1] int64): random blocks, unique ids, some adjacent."""
    ids, cu, next_id = [], [0], 1
    for _ in range(rng.randint(1, max_seqs)):
        length = rng.randint(1, max_len)
        pos = 0
        while pos < length:
            n = min(length - pos, rng.randint(1, 12))
            if rng.random() < block_frac:
                ids += [next_id] * n
                next_id += 1
            else:
                ids += [0] * n
            pos += n
        cu.append(cu[-1] + length)
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(cu, dtype=torch.int64)


def image_spans(length, blocks, family="gemma3", convention="official", layer="full", window=None):
    """Spans of one sequence with image blocks ``[(start, end), ...]`` (end exclusive)."""
    from bidiattn import rules

    ids = torch.zeros(length, dtype=torch.int64)
    for n, (s, e) in enumerate(blocks, 1):
        ids[s:e] = n
    return rules.build(family, convention, layer, block_ids=ids, window=window)


def tail_rows(spans, keep: list[int]):
    """Extend spans: the last ``keep[b]`` rows of each sequence over all of its keys."""
    from bidiattn.spans import SpanMask

    cu = spans.cu_seqlens.tolist()
    rows, new_cu = [], [0]
    for b, n in enumerate(keep):
        n = min(n, cu[b + 1] - cu[b])
        rows += range(cu[b + 1] - n, cu[b + 1])
        new_cu.append(new_cu[-1] + n)
    idx = torch.tensor(rows)
    return SpanMask(spans.lo[idx], spans.hi[idx], torch.tensor(new_cu), cu_seqlens_k=spans.cu_seqlens,
                    total_keys=spans.total_tokens)


def gpu_size_spans():
    """The benchmark's layout, shorter: 4K tokens, 1092-token images every 2048, sliding W=1024."""
    return image_spans(4096, [(s, s + 1092) for s in range(500, 4096, 2048)], layer="sliding", window=1024)


def lowp_attention(q, k, v, spans, scale, softcap, return_lse=False):
    """The same math as the reference in the inputs' own dtype: PyTorch's low-precision error."""
    group = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)
    kt = k.repeat_interleave(group, 1).transpose(0, 1)
    vt = v.repeat_interleave(group, 1).transpose(0, 1)
    s = torch.matmul(qt, kt.transpose(1, 2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~spans.to_dense(), float("-inf"))
    out = torch.matmul(torch.softmax(s, -1), vt).transpose(0, 1)
    return (out, torch.logsumexp(s, -1).float()) if return_lse else out


def assert_longest_first(order: torch.Tensor, work: torch.Tensor, longest: int, classes: int = 64):
    """``order`` (a kernel launch order) must be the tiles sorted by work class, longest first,
    tile index order inside a class: class ``c`` holds work in the ``c``-th of ``classes`` equal
    slices of ``[0, longest]`` (see ``bidiattn.kernels.tiles``)."""
    cls = (classes - 1) - work.long().clamp_min(0) * classes // (longest + 1)
    assert torch.equal(order, torch.argsort(cls, stable=True).to(torch.int32))
    assert sorted(order.tolist()) == list(range(order.numel()))
    real = work > 0
    if bool(real.any()):
        assert int(work[int(order[0])]) * classes // (longest + 1) == int(work.max()) * classes // (longest + 1)
