"""Benchmark cases and helpers shared by the benchmark scripts (run on a CUDA machine)."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from bidiattn import rules
from bidiattn.spans import SpanMask


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    hq: int
    hkv: int
    head_dim: int
    image_len: int
    image_every: int
    family: str = "gemma3"
    convention: str = "official"
    layer: str = "full"
    window: int | None = None


CASES = [
    Case("hd128 16K img1092/2048", 16384, 16, 8, 128, 1092, 2048),
    Case("hd256 16K img256/1024", 16384, 8, 4, 256, 256, 1024),
    Case("hd256 32K img256/1024", 32768, 8, 4, 256, 256, 1024),
    Case("hd256 16K sliding W1024", 16384, 8, 4, 256, 256, 1024, layer="sliding", window=1024),
    Case("hd512 16K img1092/2048", 16384, 16, 4, 512, 1092, 2048),
]
# Cases only the fa4 benchmark runs (the masked FA4 launch on sliding layers at hd128).
FA4_CASES = [Case("hd128 16K sliding W1024", 16384, 16, 8, 128, 256, 1024, layer="sliding", window=1024)]


def fa4_cli(name: str) -> tuple[argparse.Namespace, list[Case]]:
    """The fa4 benchmarks' arguments (``--out``, ``--cases``, ``--label``; results named
    ``<name>[-<label>]-...``) and their cases: those of ``CASES`` and ``FA4_CASES`` with head dim
    <= 256 whose names start with one of the ``--cases`` prefixes (all without it)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cases", default="", help="comma-separated case-name prefixes (default: all with D <= 256)")
    parser.add_argument("--label", default=None, help=f"results file name: {name}-<label>-...")
    args = parser.parse_args()
    picked = [c for c in CASES + FA4_CASES if c.head_dim <= 256
              and (not args.cases or any(c.name.startswith(p) for p in args.cases.split(",")))]
    return args, picked


def ms(fn, rep: int = 300) -> float:
    """Median milliseconds over CUDA-event-timed runs (triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=max(10, rep // 6), rep=rep, return_mode="median")


HOST_REP = 20


def host_us(fn, rep: int = HOST_REP) -> float:
    """Median host microseconds of ``fn()`` started on an idle GPU (a sync inside it included),
    after three warm-up calls."""
    times = []
    for _ in range(rep + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1e6


def fresh(spans: SpanMask) -> SpanMask:
    """The same mask (window hint included) as a new object: a call over it plans anew."""
    return SpanMask(spans.lo, spans.hi, spans.cu_seqlens, validate=False, window=spans.window)


def build(case: Case, seed: int = 0):
    """(spans, q, k, v) on the GPU: an image of ``image_len`` tokens ending every ``image_every``."""
    t = case.tokens
    ids = torch.zeros(t, dtype=torch.int64, device="cuda")
    for n, s in enumerate(range(case.image_every - case.image_len, t, case.image_every), 1):
        ids[s : s + case.image_len] = n
    spans = rules.build(case.family, case.convention, case.layer, block_ids=ids, window=case.window)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(t, case.hq, case.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(t, case.hkv, case.head_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    return spans, q, k, v


def flops(case: Case, pairs: int) -> int:
    """Two matmuls over the allowed pairs, 2 FLOPs per multiply-add."""
    return 4 * pairs * case.head_dim * case.hq


def sdpa_inputs(q, k, v):
    """[1, H, T, D] views with K/V heads repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    return tuple(x.transpose(0, 1).unsqueeze(0) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))


def sdpa_dense(q, k, v, mask):
    qt, kt, vt = sdpa_inputs(q, k, v)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).squeeze(0).transpose(0, 1)


def sdpa_reference(q, k, v, mask, dout):
    """SDPA with the dense mask: ``out [T, Hq, D]`` and the gradients ``(dq, dk, dv)`` of
    ``(out * dout).sum()`` in the packed layout (dk/dv summed over each K/V head's query heads)."""
    st, sk, sv = (x.detach().requires_grad_() for x in sdpa_inputs(q, k, v))
    out = F.scaled_dot_product_attention(st, sk, sv, attn_mask=mask)
    g = torch.autograd.grad(out, (st, sk, sv), dout.transpose(0, 1).unsqueeze(0))
    hkv = k.shape[1]
    group = q.shape[1] // hkv
    grads = (g[0].squeeze(0).transpose(0, 1),
             *(x.squeeze(0).transpose(0, 1).unflatten(1, (hkv, group)).sum(2) for x in g[1:]))
    return out.squeeze(0).transpose(0, 1).detach(), grads


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / ms(lambda: a @ a) / 1e9


def meta(command: str | None = None) -> dict:
    """Device, date, versions, commit and the command that produced a result (by default this
    process's own command line, arguments included)."""
    command = command or "python " + " ".join(shlex.quote(a) for a in sys.argv)
    # The GPU machine's copy of the tree has no usable git history: pass the hash there in
    # BIDIATTN_COMMIT, which wins over git.
    commit = os.environ.get("BIDIATTN_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(device=device, date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, fa4=fa4_version(), commit=commit, command=command)


def fa4_version() -> str | None:
    """flash-attn-4's installed version; "staged, version unknown" where ``flash_attn`` imports from a
    path without package metadata; None where it is absent (PERF.md's versions column)."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return "staged, version unknown" if importlib.util.find_spec("flash_attn") is not None else None


def describe_error(e: Exception, limit: int = 200) -> str:
    """One line for a variant that could not run (recorded in the results, not fatal)."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:limit]}"


def write_results(out_dir: str, prefix: str, meta: dict, payload: dict, lines: list[str]) -> str:
    """``<prefix>-<device>-<date>.json`` (meta and payload) and ``.md`` (lines) under ``out_dir``
    (``benchmarks/results/`` by default, where PERF.md's rows point); returns the file stem."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{meta['device'].replace(' ', '_')}-{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, **payload), indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return stem


def perf_row(meta: dict, stem: str, label: str, case: str, backend: str, figure: str, peer: str, ratio: str) -> str:
    """One row of PERF.md's table for a result of this run (printed by forward.py and backward.py for
    pasting; nothing reads it back)."""
    versions = f"torch {meta['torch']}, triton {meta['triton']}" + (f", FA4 {meta['fa4']}" if meta.get("fa4") else "")
    return (f"| {label} | {case} | {backend} | {figure} | {peer} | {ratio} | {meta['device']} | {meta['date']} | "
            f"{versions} | {meta['commit']} | `results/{stem}.{{md,json}}` | `{meta['command']}` |")
