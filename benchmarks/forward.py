"""Forward benchmark: check correctness, then time (median of CUDA-event runs) on one GPU.

    python benchmarks/forward.py --out benchmarks/results

Writes forward-<device>-<date>.json and .md (PERF.md section 1 cites them) and prints PERF.md's rows for
them. TFLOP/s are counted on spans.num_pairs()
(4 * pairs * D * Hq: two matmuls, 2 FLOPs per multiply-add); the causal columns on causal pairs.
Columns: bidiattn triton (the public call: validation, and the launch plan the first call keeps on the spans);
bidiattn triton, planned (the public call with ``plan=bidiattn.plan(...)`` built once
outside the timing, as a model's layers share it and as the peer's block mask below is built once); bidiattn flex (FlexAttention,
BlockMask built from the spans inside the call); FlexAttention with create_block_mask over a mask_mod (the usual peer recipe, mask
built once, outside the timing); SDPA with a dense mask; SDPA causal and FA4 causal (speed
references that ignore the images; FA4 only where flash_attn.cute imports).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import bidiattn
import cases


def try_time(row, key, fn, check, flop_count):
    """Run fn once, check it, time it; record the error instead where it cannot run."""
    try:
        err = check(fn())
        if err is not None:
            row[key + "_rel_err"] = err
            if err > 2e-2:
                raise RuntimeError(f"wrong result: rel err {err:.2e}")
        row[key + "_ms"] = cases.ms(fn)
        row[key + "_tflops"] = flop_count / row[key + "_ms"] / 1e9
    except Exception as e:  # noqa: BLE001 - a column that cannot run is reported, not fatal
        row[key + "_error"] = cases.describe_error(e, 200)
    print(key, row.get(key + "_tflops", row.get(key + "_error")), flush=True)


def fa4_causal():
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # noqa: BLE001 - FA4 is optional (pip install 'bidiattn[fa4]')
        return None
    return flash_attn_func


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    fa4 = fa4_causal()
    peak = cases.matmul_peak()
    rows = []
    for case in cases.CASES:
        spans, q, k, v = cases.build(case)
        t, d = case.tokens, case.head_dim
        pairs = spans.num_pairs()
        fl = cases.flops(case, pairs)
        causal_fl = 4 * (t * (t + 1) // 2) * d * case.hq
        mask = spans.to_dense()
        want = cases.sdpa_dense(q, k, v, mask)
        row = dict(case=case.name, tokens=t, hq=case.hq, hkv=case.hkv, head_dim=d, pairs=pairs)

        def check(out):
            return cases.rel_err(out, want)

        try_time(row, "bidiattn_triton", lambda: bidiattn.attention(q, k, v, spans, backend="triton"), check, fl)
        plan = bidiattn.plan(spans, case.hq, case.hkv, d, window=case.window, backend="triton")
        try_time(row, "bidiattn_planned", lambda: bidiattn.attention(q, k, v, spans, backend="triton", plan=plan),
                 check, fl)
        try_time(row, "bidiattn_flex", lambda: bidiattn.attention(q, k, v, spans, backend="flex"), check, fl)

        glo, ghi = spans.packed_bounds()

        def mask_mod(b, h, qi, ki):
            return (ki >= glo[qi]) & (ki <= ghi[qi])

        qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        opts = dict(BLOCK_M=32, BLOCK_N=32, num_stages=1) if d > 256 else None
        try:
            row["create_block_mask_ms"] = cases.ms(lambda: create_block_mask(mask_mod, 1, 1, t, t, device="cuda"), rep=20)
            bm = create_block_mask(mask_mod, 1, 1, t, t, device="cuda")
            try_time(row, "flex_mask_mod", lambda: flex(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=opts)
                     .squeeze(0).transpose(0, 1), check, fl)
        except Exception as e:  # noqa: BLE001
            row["flex_mask_mod_error"] = cases.describe_error(e, 200)
        st, sk, sv = cases.sdpa_inputs(q, k, v)
        try_time(row, "sdpa_dense", lambda: F.scaled_dot_product_attention(st, sk, sv, attn_mask=mask), lambda o: None, fl)
        try_time(row, "sdpa_causal", lambda: F.scaled_dot_product_attention(st, sk, sv, is_causal=True), lambda o: None, causal_fl)
        if fa4 is not None:
            q4, k4, v4 = (x.unsqueeze(0) for x in (q, k, v))
            try_time(row, "fa4_causal", lambda: fa4(q4, k4, v4, causal=True), lambda o: None, causal_fl)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del mask, want, st, sk, sv
        torch.cuda.empty_cache()
    meta = cases.meta()
    meta["bf16_matmul_tflops"] = peak
    cols = [("bidiattn_triton", "bidiattn triton"), ("bidiattn_planned", "bidiattn triton, planned"),
            ("bidiattn_flex", "bidiattn flex"), ("flex_mask_mod", "Flex mask_mod"),
            ("sdpa_dense", "SDPA dense mask"), ("sdpa_causal", "SDPA causal*"), ("fa4_causal", "FA4 causal*")]

    def cell(r, key):
        if key + "_tflops" in r:
            return f"{r[key + '_tflops']:.0f} ({r[key + '_ms']:.2f} ms)"
        return "fails" if key + "_error" in r else "n/a"

    lines = [f"# Forward, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, bf16 matmul {peak:.0f} TFLOP/s. "
             "TFLOP/s on allowed pairs; * on causal pairs (ignores the images). bidiattn flex builds its block mask "
             "inside the timed call; Flex mask_mod's create_block_mask runs once outside (its time in the JSON). "
             "Errors are in the JSON.", "",
             "| case | " + " | ".join(c[1] for c in cols) + " | triton / flex | planned / flex |",
             "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        ratios = [r.get(key + "_tflops", 0) / r["flex_mask_mod_tflops"] if "flex_mask_mod_tflops" in r else float("nan")
                  for key in ("bidiattn_triton", "bidiattn_planned")]
        lines.append(f"| {r['case']} | " + " | ".join(cell(r, c[0]) for c in cols) + " | "
                     + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    stem = cases.write_results(args.out, "forward", meta, dict(rows=rows), lines)
    print("\n".join(lines))
    print("\nPERF.md rows (section 1):")
    for n, r in enumerate(rows, 1):
        print(cases.perf_row(meta, stem, f"F{n}", r["case"], "triton, planned (public)", *_perf_cells(r)))


def _perf_cells(r: dict) -> tuple[str, str, str]:
    """(figure, peer, ratio) of a PERF.md row: the planned call (the public call in brackets) against
    FlexAttention's mask_mod recipe of the same run."""
    def tf(key):
        return f"{r[key + '_tflops']:.0f}" if key + "_tflops" in r else "fails"

    flex = r.get("flex_mask_mod_tflops")
    ratios = [f"{r[k + '_tflops'] / flex:.2f}x" if flex and k + "_tflops" in r else "n/a"
              for k in ("bidiattn_planned", "bidiattn_triton")]
    return (f"{tf('bidiattn_planned')} TFLOP/s ({tf('bidiattn_triton')})", f"Flex mask_mod: {tf('flex_mask_mod')}",
            f"{ratios[0]} ({ratios[1]})")


if __name__ == "__main__":
    main()
