"""FA4 backend benchmark: bidiattn fa4 (segment launches) against FA4 causal on the same GPU.

    python benchmarks/fa4.py --out benchmarks/results [--label L]     (FA4: pip install 'bidiattn[fa4]')

For the benchmark cases with head dim <= 256: checks bidiattn fa4 against SDPA with the dense
mask (forward and gradients), then times (median of CUDA-event runs) the forward with the
segment plan built inside the call and built once outside it, the plan alone, FA4 causal (speed
reference, ignores the images; on sliding cases also FA4 with the plain window, its own pairs),
bidiattn triton; and forward+backward of each. TFLOP/s on
allowed pairs (causal pairs for FA4 causal): forward 4 * pairs * D * Hq, backward 10 *.
Writes fa4[-<label>]-<device>-<date>.json/.md (PERF.md section 4).
"""

from __future__ import annotations

import argparse
import json

import torch

import bidiattn
import cases
from bidiattn.kernels.flex import span_attention_flex
from bidiattn.segments import plan_segments


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cases", default="", help="comma-separated case-name prefixes (default: all with D <= 256)")
    parser.add_argument("--label", default=None, help="results file name: fa4-<label>-...")
    args = parser.parse_args()
    from flash_attn.cute import flash_attn_func

    rows = []
    picked = [c for c in cases.CASES if c.head_dim <= 256
              and (not args.cases or any(c.name.startswith(p) for p in args.cases.split(",")))]
    for case in picked:
        spans, q, k, v = cases.build(case)
        t, d = case.tokens, case.head_dim
        pairs = spans.num_pairs()
        fwd_fl = cases.flops(case, pairs)
        fb_fl = fwd_fl + 10 * pairs * d * case.hq
        causal_pairs = t * (t + 1) // 2
        causal_fwd_fl = 4 * causal_pairs * d * case.hq
        causal_fb_fl = causal_fwd_fl + 10 * causal_pairs * d * case.hq
        plan = plan_segments(spans)
        row = dict(case=case.name, tokens=t, hq=case.hq, hkv=case.hkv, head_dim=d, pairs=pairs,
                   launches=[dict(kind=c.kind, window=[c.window_left, c.window_right], segments=c.num_segments,
                                  rows=int(c.q_len.sum()), max_rows=c.max_q_len) for c in plan.calls])
        dout = torch.randn_like(q)
        ref, want = cases.sdpa_reference(q, k, v, spans.to_dense(), dout)

        def fwd_bwd(fn):
            x = [t_.detach().requires_grad_() for t_ in (q, k, v)]
            return torch.autograd.grad(fn(*x), x, dout)

        def fa4_seg(a, b, c):
            return bidiattn.attention(a, b, c, spans, backend="fa4", segment_plan=plan)

        def fa4_causal(a, b, c):
            return flash_attn_func(a.unsqueeze(0), b.unsqueeze(0), c.unsqueeze(0), causal=True)[0].squeeze(0)

        def mask_mod_flash(a, b, c):
            return span_attention_flex(a, b, c, spans, scale, None, flash=True)[0]

        def triton(a, b, c):
            return bidiattn.attention(a, b, c, spans, backend="triton")

        scale = d ** -0.5
        row["fa4_rel_err"] = cases.rel_err(fa4_seg(q, k, v), ref)
        try:
            row["fa4_mask_mod_rel_err"] = cases.rel_err(mask_mod_flash(q, k, v), ref)
            if d <= 128:  # FA4's forward and backward key tiles differ at hd256 (see attention())
                row["fa4_mask_mod_grad_rel_err"] = max(cases.rel_err(a, b) for a, b in zip(fwd_bwd(mask_mod_flash), want))
        except Exception as e:  # noqa: BLE001 - FlexAttention's FLASH backend is experimental
            row["fa4_mask_mod_error"] = cases.describe_error(e, 400)
            print(case.name, "mask_mod", row["fa4_mask_mod_error"], flush=True)
        row["fa4_grad_rel_err"] = max(cases.rel_err(a, b) for a, b in zip(fwd_bwd(fa4_seg), want))
        if max(val for key, val in row.items() if key.endswith("rel_err")) > 2e-2:
            raise RuntimeError(f"{case.name}: bidiattn fa4 is wrong: {row}")
        timed = dict(
            fa4_fwd=(lambda: bidiattn.attention(q, k, v, spans, backend="fa4"), fwd_fl),
            fa4_planned_fwd=(lambda: fa4_seg(q, k, v), fwd_fl),
            fa4_causal_fwd=(lambda: fa4_causal(q, k, v), causal_fwd_fl),
            fa4_mask_mod_fwd=(lambda: mask_mod_flash(q, k, v), fwd_fl),
            fa4_mask_mod_fwd_bwd=(lambda: fwd_bwd(mask_mod_flash), fb_fl),
            triton_fwd=(lambda: triton(q, k, v), fwd_fl),
            fa4_planned_fwd_bwd=(lambda: fwd_bwd(fa4_seg), fb_fl),
            fa4_causal_fwd_bwd=(lambda: fwd_bwd(fa4_causal), causal_fb_fl),
            triton_fwd_bwd=(lambda: fwd_bwd(triton), fb_fl),
        )
        if case.window:
            w = case.window
            local_pairs = sum(min(i + 1, w) for i in range(t))
            timed["fa4_local_fwd"] = (lambda: flash_attn_func(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                                              window_size=(w - 1, 0))[0], 4 * local_pairs * d * case.hq)
        for key, (fn, fl) in timed.items():
            if key.startswith("fa4_mask_mod") and ("fa4_mask_mod_error" in row or ("bwd" in key and d > 128)):
                continue
            try:
                row[key + "_ms"] = cases.ms(fn, rep=100 if "bwd" in key else 300)
                row[key + "_tflops"] = fl / row[key + "_ms"] / 1e9
            except Exception as e:  # noqa: BLE001 - a column that cannot run is reported, not fatal
                row[key + "_error"] = cases.describe_error(e)
            print(case.name, key, row.get(key + "_tflops", row.get(key + "_error")), flush=True)
        row["plan_ms"] = cases.ms(lambda: plan_segments(spans), rep=100)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ref, want
        torch.cuda.empty_cache()
    meta = cases.meta()

    def tf(r, key):
        return f"{r[key + '_tflops']:.0f}" if key + "_tflops" in r else "fails"

    def ratio(r, a, b):
        return f"{r[a + '_tflops'] / r[b + '_tflops']:.2f}x" if a + "_tflops" in r and b + "_tflops" in r else "n/a"

    lines = [f"# FA4 backend, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. TFLOP/s on allowed pairs "
             "(FA4 causal: causal pairs, ignores the images); fwd+bwd counts 14 * pairs * D * Hq. 'fa4' builds the "
             "segment plan in the call (plan ms: that alone), 'fa4 planned' takes it prebuilt; fa4's backward is "
             "bidiattn's triton backward. Launches per case in the JSON.", "",
             "| case | fa4 | fa4 planned | FA4 causal "
             "| FA4 window | planned / causal | triton | plan ms | fwd+bwd: fa4 planned | FA4 causal | triton "
             "| planned / causal | mask_mod | mask_mod fwd+bwd |", "|---" * 14 + "|"]
    for r in rows:
        lines.append(f"| {r['case']} | {tf(r, 'fa4_fwd')} | {tf(r, 'fa4_planned_fwd')} | "
                     f"{tf(r, 'fa4_causal_fwd')} | {tf(r, 'fa4_local_fwd') if 'fa4_local_fwd_tflops' in r else 'n/a'} | "
                     f"{ratio(r, 'fa4_planned_fwd', 'fa4_causal_fwd')} | {tf(r, 'triton_fwd')} | {r['plan_ms']:.2f} | "
                     f"{tf(r, 'fa4_planned_fwd_bwd')} | {tf(r, 'fa4_causal_fwd_bwd')} | {tf(r, 'triton_fwd_bwd')} | "
                     f"{ratio(r, 'fa4_planned_fwd_bwd', 'fa4_causal_fwd_bwd')} | {tf(r, 'fa4_mask_mod_fwd')} | "
                     f"{tf(r, 'fa4_mask_mod_fwd_bwd')} |")
    cases.write_results(args.out, "fa4" + (f"-{args.label}" if args.label else ""), meta, dict(rows=rows), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
