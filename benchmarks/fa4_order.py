"""The masked FA4 launch with FA4's tile order for mask functions against its causal kernel's order.

    python benchmarks/fa4_order.py --out benchmarks/results [--cases 'hd256 16K img,hd128 16K img']

(FA4: pip install 'bidiattn[fa4]'.) With a ``mask_mod``, FA4 4.0.0b36's SM90 forward takes
``SingleTileScheduler``: query blocks in increasing order, so on a causal-shaped mask the heaviest
blocks start last. Its causal kernel takes ``SingleTileLPTScheduler``: blocks reversed (longest
first), heads swizzled for L2. This measures what the second order would give the masked launch:
each case runs in two processes, one with FA4 as installed ("plain") and one where FA4's SM90
forward module is given the LPT scheduler, reversal on, in place of ``SingleTileScheduler``
("lpt"; every SM90 forward of that process, FA4's window kernel included; the causal kernel
already runs it). An experiment only: bidiattn does not patch FA4.

Per case and order: the masked launch called directly with the plan's forward tables (checked
against SDPA with the dense mask at 16K), FA4 causal and, on sliding cases, FA4's window kernel;
median of three CUDA-event medians each. TFLOP/s on allowed pairs (FA4's own kernels on theirs).
Writes fa4-order[-<label>]-<device>-<date>.json/.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cases
import torch

ORDERS = ("plain", "lpt")


def use_lpt_order() -> None:
    """Give FA4's SM90 forward module the LPT scheduler, reversal on, where it takes the plain one."""
    import flash_attn.cute.flash_fwd_sm90 as sm90
    import flash_attn.cute.tile_scheduler as ts

    class LongestFirst(ts.SingleTileLPTScheduler):
        @staticmethod
        def to_underlying_arguments(args, *, scheduling_mode=ts.SchedulingMode.STATIC, loc=None, ip=None):
            args.lpt = True
            return ts.SingleTileLPTScheduler.Params.create(args, scheduling_mode=scheduling_mode, loc=loc, ip=ip)

    sm90.SingleTileScheduler = LongestFirst


def measure(case: cases.Case) -> dict:
    """One case in this process's order."""
    from flash_attn.cute import flash_attn_func

    from bidiattn.kernels import fa4_masked

    spans, q, k, v = cases.build(case)
    d, t, hq = case.head_dim, case.tokens, case.hq
    tables = fa4_masked.mask_tables(spans, d, backward=False)
    row = dict(case=case.name, block=list(tables.block))
    masked = lambda: fa4_masked.span_attention_fa4_masked(q, k, v, spans, d**-0.5, None, tables)  # noqa: E731
    if t <= 16384:
        row["rel_err"] = cases.rel_err(masked()[0], cases.sdpa_dense(q, k, v, spans.to_dense()))
    timed = {"masked": (masked, spans.num_pairs()),
             "fa4_causal": (lambda: flash_attn_func(q[None], k[None], v[None], causal=True), t * (t + 1) // 2)}
    if case.window:
        w = case.window
        timed["fa4_window"] = (lambda: flash_attn_func(q[None], k[None], v[None], window_size=(w - 1, 0)),
                               sum(min(i + 1, w) for i in range(t)))
    for name, (fn, pairs) in timed.items():
        ms = sorted(cases.ms(fn) for _ in range(3))[1]
        row[name + "_ms"] = ms
        row[name + "_tflops"] = 4 * pairs * d * hq / ms / 1e9
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        order, names = sys.argv[2], sys.argv[3].split("|")
        if order == "lpt":
            use_lpt_order()
        for case in cases.CASES + cases.FA4_CASES:
            if case.name in names:
                print("ROW " + json.dumps(dict(measure(case), order=order)), flush=True)
                torch.cuda.empty_cache()
        return
    args, picked = cases.fa4_cli("fa4-order")
    names = "|".join(c.name for c in picked)
    rows = []
    for order in ORDERS:
        proc = subprocess.run([sys.executable, __file__, "worker", order, names], capture_output=True, text=True)
        got = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode:
            print(f"{order}: exit {proc.returncode}\n{proc.stderr[-2000:]}", flush=True)
        rows += got
        for r in got:
            print(r, flush=True)
    meta = cases.meta()
    lines = [f"# The masked FA4 launch: FA4's tile order for mask functions (plain) against its causal order "
             f"(lpt), {meta}", "", "TFLOP/s (ms); masked / FA4 causal and, on sliding cases, / FA4 window.", "",
             "| case | order | block | rel err | masked | FA4 causal | FA4 window | masked / causal "
             "| masked / window |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        windowed = "fa4_window_ms" in r
        window = f"{r['fa4_window_tflops']:.0f} ({r['fa4_window_ms']:.3f})" if windowed else ""
        per_window = f"{r['masked_tflops'] / r['fa4_window_tflops']:.3f}" if windowed else ""
        lines.append(f"| {r['case']} | {r['order']} | {r['block'][0]}x{r['block'][1]} | "
                     f"{r.get('rel_err', float('nan')):.4f} | {r['masked_tflops']:.0f} ({r['masked_ms']:.3f}) | "
                     f"{r['fa4_causal_tflops']:.0f} ({r['fa4_causal_ms']:.3f}) | {window} | "
                     f"{r['masked_tflops'] / r['fa4_causal_tflops']:.3f} | {per_window} |")
    stem = cases.write_results(args.out, "fa4-order" + (f"-{args.label}" if args.label else ""), meta,
                               dict(rows=rows), lines)
    print("\n".join(lines[4:]))
    print(f"wrote {args.out}/{stem}.md")


if __name__ == "__main__":
    main()
