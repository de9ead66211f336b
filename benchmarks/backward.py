"""Backward benchmark: sweep the backward tiles per head dim, then forward+backward against peers.

    python benchmarks/backward.py --out benchmarks/results [--sweep-only | --no-sweep]

Every variant is checked against SDPA's gradients (dense mask) before it is timed (median of
CUDA-event runs). FLOPs on allowed pairs: forward 4 * pairs * D * Hq, backward 10 * pairs * D * Hq
(five matmuls; recomputation is not counted as useful work). Writes backward-<device>-<date>.json/.md
(PERF.md sections 2 and 3 cite the --no-sweep run) and prints
PERF.md's rows for the comparison.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import bidiattn
import cases
from bidiattn.kernels.backward import span_attention_backward
from bidiattn.launch import BackwardConfig

B = BackwardConfig
SWEEP = {
    128: [B(64, 64, 8, 2), B(64, 64, 4, 2), B(128, 64, 8, 1), B(64, 128, 8, 1), B(32, 64, 4, 2), B(64, 32, 4, 3),
          B(128, 128, 8, 1), B(32, 128, 8, 2)],
    256: [B(64, 64, 8, 1), B(32, 64, 4, 1), B(64, 32, 4, 1), B(32, 32, 4, 2),
          B(128, 64, 8, 1), B(64, 128, 8, 1), B(32, 64, 8, 2), B(64, 64, 4, 1)],
    512: [B(32, 64, 8, 1)],
}
SWEPT = ["hd128 16K img1092/2048", "hd256 16K img256/1024", "hd512 16K img1092/2048"]


def err_of(got, want):
    return max(cases.rel_err(a, b) for a, b in zip(got, want))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    sweep_rows, rows = [], []
    for case in cases.CASES:
        spans, q, k, v = cases.build(case)
        pairs = spans.num_pairs()
        fwd_fl, bwd_fl = cases.flops(case, pairs), 10 * pairs * case.head_dim * case.hq
        dout = torch.randn_like(q)
        mask = spans.to_dense()
        _, want = cases.sdpa_reference(q, k, v, mask, dout)
        st, sk, sv = (x.detach().requires_grad_() for x in cases.sdpa_inputs(q, k, v))
        sdpa_fb = cases.ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(st, sk, sv, attn_mask=mask),
                                                       (st, sk, sv), dout.transpose(0, 1).unsqueeze(0)), rep=100)
        out, lse = bidiattn.attention(q, k, v, spans, return_lse=True, backend="triton")
        scale = case.head_dim**-0.5
        if case.name in SWEPT and not args.no_sweep:
            for cfg in SWEEP[case.head_dim]:
                row = dict(case=case.name, config=repr(cfg))

                def bwd():
                    return span_attention_backward(dout, q, k, v, out, lse, spans, scale, None, config=cfg)

                try:
                    row["rel_err"] = err_of(bwd(), want)
                    if row["rel_err"] < 2e-2:
                        row["ms"] = cases.ms(bwd, rep=100)
                        row["tflops"] = bwd_fl / row["ms"] / 1e9
                except Exception as e:  # noqa: BLE001 - record why a variant cannot run
                    row["error"] = cases.describe_error(e, 200)
                print(json.dumps(row), flush=True)
                sweep_rows.append(row)
        if not args.sweep_only:
            row = dict(case=case.name, tokens=case.tokens, hq=case.hq, hkv=case.hkv, head_dim=case.head_dim, pairs=pairs,
                       sdpa_dense_fwd_bwd_ms=sdpa_fb, sdpa_dense_fwd_bwd_tflops=(fwd_fl + bwd_fl) / sdpa_fb / 1e9)
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            # planned: both launch plans built once outside the timing (as a model's layers share them).
            plan = bidiattn.plan(spans, case.hq, case.hkv, case.head_dim, window=case.window, backend="triton",
                                 training=True)
            for key, backend, p in (("bidiattn_triton", "triton", None), ("bidiattn_planned", "triton", plan),
                                    ("bidiattn_flex", "flex", None)):
                def fwd_bwd():
                    out = bidiattn.attention(qg, kg, vg, spans, backend=backend, plan=p)
                    return torch.autograd.grad(out, (qg, kg, vg), dout)

                try:
                    row[key + "_rel_err"] = err_of(fwd_bwd(), want)
                    row[key + "_fwd_bwd_ms"] = cases.ms(fwd_bwd, rep=100)
                    row[key + "_fwd_ms"] = cases.ms(lambda: bidiattn.attention(q, k, v, spans, backend=backend, plan=p), rep=100)
                    row[key + "_fwd_bwd_tflops"] = (fwd_fl + bwd_fl) / row[key + "_fwd_bwd_ms"] / 1e9
                    row[key + "_bwd_tflops"] = bwd_fl / (row[key + "_fwd_bwd_ms"] - row[key + "_fwd_ms"]) / 1e9
                except Exception as e:  # noqa: BLE001
                    row[key + "_error"] = cases.describe_error(e, 200)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del mask, st, sk, sv, want
        torch.cuda.empty_cache()
    meta = cases.meta()
    lines = [f"# Backward, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. TFLOP/s on allowed pairs "
             "(fwd 4, bwd 10 FLOPs per pair per head-dim element); bwd alone = (fwd+bwd) - fwd time.", ""]
    if rows:
        lines += ["*planned*: `plan=bidiattn.plan(..., training=True)` (forward and backward launch plans) built once "
                  "outside the timing.", "",
                  "| case | bidiattn triton fwd+bwd | bwd alone | planned fwd+bwd | bwd alone "
                  "| bidiattn flex fwd+bwd | bwd alone | SDPA dense fwd+bwd | triton / flex | planned / flex |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            def c(key):
                return f"{r[key]:.0f}" if key in r else "fails"

            def ratio(key):
                flex = r.get("bidiattn_flex_fwd_bwd_tflops")
                return f"{r[key] / flex:.2f}x" if flex and key in r else "n/a"
            lines.append(f"| {r['case']} | {c('bidiattn_triton_fwd_bwd_tflops')} | {c('bidiattn_triton_bwd_tflops')} | "
                         f"{c('bidiattn_planned_fwd_bwd_tflops')} | {c('bidiattn_planned_bwd_tflops')} | "
                         f"{c('bidiattn_flex_fwd_bwd_tflops')} | {c('bidiattn_flex_bwd_tflops')} | {c('sdpa_dense_fwd_bwd_tflops')} | "
                         f"{ratio('bidiattn_triton_fwd_bwd_tflops')} | {ratio('bidiattn_planned_fwd_bwd_tflops')} |")
    if sweep_rows:
        lines += ["", "Backward tile sweep (bwd alone):", "", "| case | config | rel err | TFLOP/s | ms | note |", "|---|---|---|---|---|---|"]
        for r in sweep_rows:
            lines.append(f"| {r['case']} | {r['config']} | {r.get('rel_err', float('nan')):.1e} | {r.get('tflops', 0):.0f} "
                         f"| {r.get('ms', 0):.2f} | {r.get('error', '')[:120]} |")
    stem = cases.write_results(args.out, "backward", meta, dict(sweep=sweep_rows, rows=rows), lines)
    print("\n".join(lines))
    if rows:
        print("\nPERF.md rows (sections 2 and 3):")
        for line in _perf_rows(meta, stem, rows):
            print(line)


def _perf_rows(meta: dict, stem: str, rows: list[dict]) -> list[str]:
    """PERF.md rows: fwd+bwd per case (planned, the public call in brackets) against the flex backend,
    and the hd512 backward alone."""
    def tf(r, key):
        return f"{r[key]:.0f}" if key in r else "fails"

    def ratio(r, key, peer):
        return f"{r[key] / r[peer]:.2f}x" if key in r and r.get(peer) else "n/a"

    out = []
    for n, r in enumerate(rows, 1):
        out.append(cases.perf_row(
            meta, stem, f"B{n}", r["case"], "triton fwd+bwd, planned (public)",
            f"{tf(r, 'bidiattn_planned_fwd_bwd_tflops')} TFLOP/s ({tf(r, 'bidiattn_triton_fwd_bwd_tflops')})",
            f"flex: {tf(r, 'bidiattn_flex_fwd_bwd_tflops')}",
            f"{ratio(r, 'bidiattn_planned_fwd_bwd_tflops', 'bidiattn_flex_fwd_bwd_tflops')} "
            f"({ratio(r, 'bidiattn_triton_fwd_bwd_tflops', 'bidiattn_flex_fwd_bwd_tflops')})"))
    for r in rows:
        if r["head_dim"] == 512:
            out.append(cases.perf_row(
                meta, stem, "K1", r["case"], "triton backward, planned ((fwd+bwd) - fwd time)",
                f"{tf(r, 'bidiattn_planned_bwd_tflops')} TFLOP/s", f"flex backward alone: {tf(r, 'bidiattn_flex_bwd_tflops')}",
                ratio(r, "bidiattn_planned_bwd_tflops", "bidiattn_flex_bwd_tflops")))
    return out


if __name__ == "__main__":
    main()
