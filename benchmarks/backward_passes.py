"""Backward kernels one by one: the time of each pass (delta, dK/dV, dQ) per tile config.

    python benchmarks/backward_passes.py --out benchmarks/results [--cases hd512] [--label new]

For each case of ``cases.CASES`` matching ``--cases`` and each config of ``CONFIGS`` (``None``:
the library's choice): the gradients are checked against SDPA's (dense mask) first, then the
whole backward is timed (median of CUDA-event runs) and each kernel's device time is read from
the PyTorch profiler (mean over ``--profile-runs`` runs). TFLOP/s on allowed pairs, 10 FLOPs
per pair and head-dim element for the whole backward. Run it once per source tree (``--label``)
to compare kernels: configs the tree cannot build are recorded as errors. Writes
backward-passes-<label>-<device>-<date>.json and .md (PERF.md section 3).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

import bidiattn
import cases
from bidiattn.kernels import backward as bw


def _configs(head_dim: int) -> list:
    b = bw.BackwardConfig
    table = {
        128: [None, lambda: b(64, 64, 4, 2), lambda: b(64, 64, 4, 2, mask_free_tiles=True, tma=True),
              lambda: b(64, 64, 4, 3, tma=True), lambda: b(64, 128, 8, 2, tma=True)],
        256: [None, lambda: b(128, 64, 8, 1), lambda: b(64, 64, 4, 1, tma=True),
              lambda: b(128, 64, 8, 1, mask_free_tiles=True, tma=True)],
        512: [None, lambda: b(32, 64, 8, 1, separate_dk_dv=True, dq=b(64, 32, 8, 1)),
              lambda: b(32, 64, 8, 1, separate_dk_dv=True, dq=b(64, 32, 8, 2, mask_free_tiles=True))],
    }
    return table[head_dim]


def _kernel_ms(fn, runs: int) -> dict[str, float]:
    """Mean device milliseconds per call of each Triton kernel ``fn`` launches."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("_") and "kernel" in e.key:
            totals[e.key] += e.device_time_total / 1e3 / runs
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cases", default="hd128 16K,hd256 16K img,hd512")
    parser.add_argument("--label", default="tree")
    parser.add_argument("--profile-runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for case in [c for c in cases.CASES if any(s in c.name for s in args.cases.split(","))]:
        spans, q, k, v = cases.build(case)
        pairs = spans.num_pairs()
        bwd_fl = 10 * pairs * case.head_dim * case.hq
        dout = torch.randn_like(q)
        _, want = cases.sdpa_reference(q, k, v, spans.to_dense(), dout)
        out, lse = bidiattn.attention(q, k, v, spans, return_lse=True, backend="triton")
        scale = case.head_dim**-0.5
        rep = 20 if case.head_dim > 256 else 100
        for make in _configs(case.head_dim):
            row = dict(case=case.name, label=args.label, config="default")
            try:
                cfg = make() if make else None
                row["config"] = repr(cfg) if cfg else f"default {bw.pick_backward_config(case.head_dim)!r}"

                def run():
                    return bw.span_attention_backward(dout, q, k, v, out, lse, spans, scale, None, config=cfg)

                row["rel_err"] = max(cases.rel_err(a, b) for a, b in zip(run(), want))
                if row["rel_err"] > 2e-2:
                    raise RuntimeError(f"gradients differ from SDPA's: {row['rel_err']:.2e}")
                row["ms"] = cases.ms(run, rep=rep)
                row["tflops"] = bwd_fl / row["ms"] / 1e9
                row["kernels_ms"] = _kernel_ms(run, args.profile_runs)
            except Exception as e:  # noqa: BLE001 - record the variant that cannot run and go on
                row["error"] = cases.describe_error(e, 200)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del want
        torch.cuda.empty_cache()
    meta = cases.meta()
    lines = [f"# Backward passes ({args.label}), {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. Whole backward: median ms, "
             "TFLOP/s on allowed pairs (10 FLOPs per pair and head-dim element); kernels: mean device ms (profiler).", "",
             "| case | config | rel err | ms | TFLOP/s | dK/dV ms | dQ ms | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        km = r.get("kernels_ms", {})
        dkdv = sum(t for n, t in km.items() if "dkdv" in n)
        dq = sum(t for n, t in km.items() if "_dq_" in n)
        lines.append(f"| {r['case']} | {r['config']} | {r.get('rel_err', float('nan')):.1e} | {r.get('ms', 0):.2f} | "
                     f"{r.get('tflops', 0):.0f} | {dkdv:.2f} | {dq:.2f} | {r.get('error', '')[:100]} |")
    cases.write_results(args.out, f"backward-passes-{args.label}", meta, dict(rows=rows), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
