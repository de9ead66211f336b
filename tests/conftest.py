"""Shared test helpers: random layouts and an independent statement of the rule table."""

from __future__ import annotations

import datetime
import math
import os
import random
import socket
import sys

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


@pytest.fixture(autouse=True)
def _gluon_release_under_check(monkeypatch):
    """``BIDIATTN_GLUON_CHECK=<release>`` (e.g. ``3.9``): the tests treat that Triton release as
    GPU-checked (the gluon backend runs with it): the GPU run that checks it before it joins
    ``bidiattn.kernels.sm90_wide.host.GPU_CHECKED_TRITON``."""
    release = os.environ.get("BIDIATTN_GLUON_CHECK")
    if release:
        from bidiattn.kernels.sm90_wide import host

        monkeypatch.setattr(host, "GPU_CHECKED_TRITON", (*host.GPU_CHECKED_TRITON, release))


def run_ranks(fn, world: int, *args, backend: str = "gloo", timeout_s: int = 120) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined in one process group
    (``backend`` ``"gloo"``: CPU, one intra-op thread each; ``"nccl"``: GPU ``rank`` each). Every rank
    meets the others at a barrier before the group is destroyed, so that no rank tears its
    connections down while a peer still reads from them; a rank's exception fails the test. A run
    whose rank a signal kills is run once more, on a new port (CI, 2026-12-08: a gloo rank aborted
    once with no message, then passed in 12 reruns); a second such death fails the test."""
    import torch.multiprocessing as mp

    for attempt in (1, 2):
        try:
            mp.spawn(_rank_main, args=(fn, world, free_port(), backend, timeout_s, args), nprocs=world, join=True)
            return
        except mp.ProcessExitedException as e:
            if attempt == 2 or e.signal_name is None:
                raise
            print(f"run_ranks: rank {e.error_index} killed by {e.signal_name}; running the ranks once more",
                  file=sys.stderr)


def _rank_main(rank, fn, world, port, backend, timeout_s, args) -> None:
    import torch.distributed as dist

    device = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    idx = torch.tensor(rows, dtype=torch.int64)
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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads_of(fn, q, k, v, dout, dlse):
    """Gradients of ``(out * dout).sum() + (lse * dlse).sum()`` with respect to q, k, v."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.float() * dout).sum() + ((lse * dlse).sum() if dlse is not None else 0)
    return torch.autograd.grad(loss, (q, k, v))


def check_grads(spans, hq, hkv, d, dtype, softcap=None, seed=0, with_lse=False, config=None, backend="triton"):
    """Gradients of ``bidiattn.attention(..., backend=backend)`` (or, with ``config``, the Triton
    backward alone fed the fp32 forward) against the fp32 reference: error <= 2x PyTorch's own
    low-precision error + 1e-3 of the gradient's scale; no NaN (unwritten) entries."""
    import bidiattn
    from bidiattn import reference
    from bidiattn.kernels.backward import span_attention_backward

    g = torch.Generator().manual_seed(seed)
    t = spans.total_tokens
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype).to(DEVICE) for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, generator=g).to(DEVICE)
    dlse = torch.randn(hq, t, generator=g).to(DEVICE) if with_lse else None
    spans = spans.to(DEVICE)
    scale = 1 / math.sqrt(d)

    def ours(q, k, v):
        return bidiattn.attention(q, k, v, spans, softcap=softcap, return_lse=True, backend=backend)

    def fp32(q, k, v):
        return reference.attention(q.float(), k.float(), v.float(), spans, softcap=softcap, return_lse=True)

    def lowp(q, k, v):
        return lowp_attention(q, k, v, spans, scale, softcap, return_lse=True)

    if config is None:
        got = grads_of(ours, q, k, v, dout, dlse)
    else:
        out, lse = fp32(q, k, v)
        got = span_attention_backward(dout.to(dtype), q, k, v, out.to(dtype), lse, spans, scale, softcap, dlse, config)
    want = grads_of(fp32, q, k, v, dout, dlse)
    torch_grads = grads_of(lowp, q, k, v, dout, dlse)
    for name, a, w, t in zip("qkv", got, want, torch_grads):
        assert a.dtype == dtype and a.shape == w.shape
        assert not torch.isnan(a).any(), f"d{name} has unwritten (NaN) entries"
        err = (a.float() - w).abs().max().item()
        bound = 2 * (t.float() - w).abs().max().item() + 1e-3 * w.abs().max().item() + 1e-5
        assert err <= bound, (name, err, bound)
