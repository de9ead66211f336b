"""Sweep forward-kernel tile configs per head dim: check each against SDPA, then time it.

    python benchmarks/tune_forward.py --out benchmarks/results [--round stages] [--no-flex]

Writes tune-forward-<round>-<device>-<date>.json and .md (every variant, its time or why it failed;
``-<N>kv`` added with --kv-heads). The winners go into ``bidiattn.kernels.forward.pick_config`` by
hand, the decision and its numbers into benchmarks/NOTES.md; the round behind a current default is
a PERF.md row (section 10).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import cases
from bidiattn.kernels import forward
from bidiattn.kernels.forward import span_attention_forward
from bidiattn.launch import TileConfig

T = TileConfig
# Round 1 and 2 of 2026-11-21 (warp_specialize variants, since dropped, are in that run's results, in git history).
SWEEP = {
    128: [T(128, 64, 8, 3), T(128, 64, 4, 3), T(128, 64, 8, 2), T(128, 128, 8, 2), T(64, 64, 4, 3), T(128, 32, 4, 3),
          T(128, 64, 8, 4), T(128, 128, 8, 1), T(256, 64, 8, 2), T(256, 64, 16, 2), T(128, 64, 16, 3)],
    256: [T(64, 32, 4, 2), T(64, 32, 8, 2), T(128, 32, 8, 1), T(128, 32, 8, 2), T(64, 64, 4, 1), T(64, 64, 8, 1),
          T(128, 64, 8, 1), T(128, 64, 8, 2), T(64, 64, 4, 2, split_dv=2), T(128, 64, 8, 2, split_dv=2),
          T(128, 128, 8, 1, split_dv=2), T(128, 128, 8, 1), T(128, 64, 4, 1), T(256, 64, 16, 1),
          T(256, 32, 16, 1), T(128, 64, 16, 1), T(128, 32, 8, 3)],
    512: [T(64, 32, 8, 1), T(64, 32, 4, 1), T(64, 64, 8, 1), T(128, 32, 8, 1), T(64, 32, 4, 2, split_dv=2),
          T(64, 64, 4, 2, split_dv=2), T(128, 64, 8, 1, split_dv=2), T(128, 32, 8, 2, split_dv=2),
          T(64, 64, 4, 2, split_dv=4), T(128, 64, 8, 2, split_dv=4), T(128, 128, 8, 1, split_dv=4),
          T(128, 32, 8, 1, split_dv=2), T(64, 64, 4, 1, split_dv=2), T(64, 32, 4, 1, split_dv=2),
          T(64, 64, 8, 1, split_dv=2), T(128, 32, 16, 1), T(64, 64, 16, 1), T(128, 64, 16, 1, split_dv=2),
          T(256, 32, 16, 1, split_dv=4), T(128, 64, 8, 1, split_dv=4)],
}
# Round 3 (sixth session): a deeper pipeline on the mask-free middle loop only (edge_stages).
STAGES = {
    128: [T(256, 64, 16, 3, edge_stages=1), T(128, 64, 8, 3), T(128, 64, 8, 4, edge_stages=1)],
    256: [T(128, 64, 8, 1), T(128, 64, 8, 2, edge_stages=1), T(128, 32, 8, 3, edge_stages=1),
          T(128, 32, 8, 2, edge_stages=1)],
    512: [T(128, 64, 8, 1, split_dv=2), T(128, 32, 8, 2, split_dv=2, edge_stages=1), T(64, 32, 8, 2, edge_stages=1),
          T(64, 16, 8, 3, edge_stages=1), T(128, 32, 8, 1, split_dv=2)],
}
# Round 4 (seventh session): K/V tiles through TMA descriptors (head dims up to 256).
TMA = {
    128: [T(256, 64, 16, 3, edge_stages=1), T(256, 64, 16, 3, edge_stages=1, tma=True),
          T(256, 64, 16, 2, edge_stages=1, tma=True), T(256, 64, 16, 4, edge_stages=1, tma=True),
          T(128, 64, 8, 3, tma=True), T(128, 128, 8, 2, edge_stages=1, tma=True), T(256, 128, 16, 2, edge_stages=1, tma=True)],
    256: [T(128, 64, 8, 2, edge_stages=1), T(128, 64, 8, 2, edge_stages=1, tma=True), T(128, 64, 8, 1, tma=True),
          T(128, 32, 8, 3, edge_stages=1, tma=True), T(128, 64, 8, 2, tma=True), T(64, 64, 4, 2, edge_stages=1, tma=True)],
    512: [],
}
# Round 5: TMA with the query heads of a K/V group packed into the tile (pack_gqa).
TMA_PACK = {
    128: [T(128, 64, 8, 3, edge_stages=1, pack_gqa=True, tma=True), T(128, 64, 8, 4, edge_stages=1, pack_gqa=True, tma=True),
          T(128, 64, 8, 3, pack_gqa=True, tma=True), T(128, 64, 8, 2, edge_stages=1, pack_gqa=True, tma=True),
          T(256, 64, 16, 3, edge_stages=1, pack_gqa=True, tma=True), T(256, 64, 16, 4, edge_stages=1, tma=True),
          T(128, 64, 8, 3, edge_stages=1, tma=True), T(128, 64, 8, 4, edge_stages=1, tma=True)],
    256: [T(128, 64, 8, 2, edge_stages=1, tma=True), T(128, 64, 8, 2, edge_stages=1, pack_gqa=True, tma=True),
          T(128, 32, 8, 3, edge_stages=1, pack_gqa=True, tma=True), T(64, 64, 4, 2, edge_stages=1, pack_gqa=True, tma=True),
          T(128, 64, 8, 1, pack_gqa=True, tma=True), T(128, 32, 8, 4, edge_stages=1, pack_gqa=True, tma=True)],
    512: [],
}
# Round 6: the GQA group at hd128 (run with --kv-heads): packed tiles at groups 4 and 8, and
# the tiles without a group to pack (group 1).
GROUPS = {
    128: [T(128, 64, 8, 3, edge_stages=1, pack_gqa=True, tma=True), T(128, 64, 8, 3, pack_gqa=True, tma=True),
          T(128, 64, 8, 3, tma=True), T(128, 64, 8, 3, edge_stages=1, tma=True), T(256, 64, 16, 3, edge_stages=1, tma=True),
          T(128, 64, 8, 4, pack_gqa=True, tma=True), T(128, 64, 8, 3)],
    256: [T(128, 64, 8, 2, edge_stages=1, pack_gqa=True, tma=True), T(128, 64, 8, 2, edge_stages=1, tma=True)],
    512: [],
}
# Round 7 (ninth session): hd512 in one program without recomputing q·k (column_halves, K/V
# in TMA boxes of 256 columns). Its run at f6a2d9f (in git history) also timed a
# lazy running max (rescale_slack=8, since removed: 4-10% slower in every case).
HALVES = {
    128: [T(128, 64, 8, 3, edge_stages=1, pack_gqa=True, tma=True)],
    256: [T(128, 64, 8, 2, edge_stages=1, pack_gqa=True, tma=True)],
    512: [T(128, 64, 8, 1, split_dv=2), T(128, 64, 8, 1, split_dv=2, column_halves=True, tma=True),
          T(64, 64, 8, 1, column_halves=True), T(64, 64, 8, 1, column_halves=True, tma=True),
          T(64, 32, 8, 2, edge_stages=1, column_halves=True, tma=True),
          T(64, 64, 4, 1, column_halves=True, tma=True), T(128, 32, 16, 1, column_halves=True, tma=True),
          T(64, 64, 8, 1, pack_gqa=True, column_halves=True, tma=True),
          T(128, 64, 8, 1, split_dv=2)],
}
# Round 8: column halves without the lazy max (which cost 4-10% everywhere in round 7).
HALVES2 = {
    128: [T(128, 64, 8, 3, edge_stages=1, pack_gqa=True, tma=True),
          T(128, 64, 8, 3, edge_stages=1, pack_gqa=True, tma=True, column_halves=True),
          T(128, 64, 8, 3, pack_gqa=True, tma=True, column_halves=True),
          T(128, 64, 8, 4, edge_stages=1, pack_gqa=True, tma=True, column_halves=True)],
    256: [T(128, 64, 8, 2, edge_stages=1, pack_gqa=True, tma=True),
          T(128, 64, 8, 2, edge_stages=1, pack_gqa=True, tma=True, column_halves=True),
          T(128, 64, 8, 2, edge_stages=1, tma=True, column_halves=True),
          T(128, 64, 8, 1, pack_gqa=True, tma=True, column_halves=True),
          T(128, 32, 8, 3, edge_stages=1, pack_gqa=True, tma=True, column_halves=True),
          T(128, 64, 8, 2, edge_stages=1, pack_gqa=True, column_halves=True),
          T(128, 64, 8, 2, edge_stages=1, pack_gqa=True, tma=True)],
    512: [T(128, 64, 8, 1, split_dv=2), T(128, 64, 8, 1, split_dv=2, column_halves=True),
          T(128, 32, 8, 1, split_dv=2, column_halves=True, tma=True),
          T(128, 32, 8, 2, edge_stages=1, split_dv=2, column_halves=True, tma=True),
          T(128, 64, 8, 1, split_dv=2, pack_gqa=True, column_halves=True, tma=True),
          T(128, 64, 8, 1, split_dv=2)],
}
# Round 9 (warp_specialize=True on the mask-free loop with TMA loads) ran at e4057e1; the knob
# was removed after an A/B in alternating processes showed no gain (NOTES.md; runs in git history).
# Round 10 (twelfth session) ran at 5295784 (in git history): q·k of the next key
# tile issued before this tile's softmax on the mask-free loop (scores_ahead), and a register cap
# (max_registers) letting two programs share a multiprocessor; both slower everywhere, removed.
ROUNDS = {"tiles": SWEEP, "stages": STAGES, "tma": TMA, "tma-pack": TMA_PACK, "groups": GROUPS, "halves": HALVES,
          "halves2": HALVES2}
TUNED = ["hd128 16K img1092/2048", "hd256 16K img256/1024", "hd512 16K img1092/2048"]
FLEX_OPTIONS = [None, dict(BLOCK_M=64, BLOCK_N=32, num_stages=1), dict(BLOCK_M=32, BLOCK_N=32, num_stages=1),
                dict(BLOCK_M=64, BLOCK_N=16, num_stages=1, num_warps=8)]


def flex_probe(case, spans, q, k, v, want, fl):
    """Which FlexAttention kernel_options run at this head dim (the issue saw 263 KB asked at 512)."""
    from torch.nn.attention.flex_attention import flex_attention

    from bidiattn.kernels.flex import block_mask_from_spans

    bm = block_mask_from_spans(spans)
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    rows = []
    for opts in FLEX_OPTIONS:
        torch._dynamo.reset()
        fn = torch.compile(flex_attention, dynamic=False)
        row = dict(case=case.name, kernel_options=opts)
        try:
            out = fn(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=opts)
            row["rel_err"] = cases.rel_err(out.squeeze(0).transpose(0, 1), want)
            row["ms"] = cases.ms(lambda: fn(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=opts), rep=100)
            row["tflops"] = fl / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - record why a variant cannot run
            row["error"] = cases.describe_error(e, 300)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _compiled() -> dict:
    """Registers, spills and shared memory of every compiled forward kernel, by cache key (read
    from Triton's JIT cache; empty where this Triton version keeps it elsewhere)."""
    stats = {}
    try:
        for cache, *_ in forward._span_fwd_kernel.device_caches.values():
            for key, kernel in cache.items():
                stats[key] = dict(regs=getattr(kernel, "n_regs", None), spills=getattr(kernel, "n_spills", None),
                                  shared=kernel.metadata.shared)
    except (AttributeError, TypeError, ValueError):
        return {}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--round", choices=sorted(ROUNDS), default="tiles")
    parser.add_argument("--cases", default=",".join(TUNED), help="comma-separated case names")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention hd512 probe")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="K/V heads instead of each case's (the GQA group is hq / kv-heads)")
    args = parser.parse_args()
    rows, flex_rows = [], []
    for case in cases.CASES:
        if case.name not in args.cases.split(","):
            continue
        if args.kv_heads:
            case = dataclasses.replace(case, name=f"{case.name} {case.hq}q/{args.kv_heads}kv", hkv=args.kv_heads)
        spans, q, k, v = cases.build(case)
        want = cases.sdpa_dense(q, k, v, spans.to_dense())
        fl = cases.flops(case, spans.num_pairs())
        scale = case.head_dim**-0.5
        for cfg in ROUNDS[args.round][case.head_dim]:
            row = dict(case=case.name, config=repr(cfg))
            t0 = time.perf_counter()
            try:
                before = _compiled()
                out, _ = span_attention_forward(q, k, v, spans, scale, None, config=cfg)
                row["kernels"] = [x for key, x in _compiled().items() if key not in before]
                row["rel_err"] = cases.rel_err(out, want)
                row["compile_s"] = time.perf_counter() - t0
                if row["rel_err"] < 1e-2:
                    row["ms"] = cases.ms(lambda: span_attention_forward(q, k, v, spans, scale, None, config=cfg), rep=100)
                    row["tflops"] = fl / row["ms"] / 1e9
            except Exception as e:  # noqa: BLE001 - record why a variant cannot run
                row["error"] = cases.describe_error(e, 300)
            print(json.dumps(row), flush=True)
            rows.append(row)
        if case.head_dim == 512 and not args.no_flex:
            flex_rows += flex_probe(case, spans, q, k, v, want, fl)
        del want
        torch.cuda.empty_cache()
    meta = cases.meta()
    lines = [f"# Forward tile sweep, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. TFLOP/s on allowed pairs.", "",
             "| case | config | rel err | TFLOP/s | ms | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['config']} | {r.get('rel_err', float('nan')):.1e} | {r.get('tflops', 0):.0f} "
                     f"| {r.get('ms', 0):.2f} | {_kernel_note(r)}{r.get('error', '')[:120]} |")
    lines += ["", "FlexAttention at hd512 by kernel_options:", "", "| options | TFLOP/s | note |", "|---|---|---|"]
    for r in flex_rows:
        lines.append(f"| {r['kernel_options']} | {r.get('tflops', 0):.0f} | {r.get('error', '')[:160]} |")
    label = f"tune-forward-{args.round}" + (f"-{args.kv_heads}kv" if args.kv_heads else "")
    cases.write_results(args.out, label, meta, dict(rows=rows, flex_hd512=flex_rows), lines)
    print("\n".join(lines))


def _kernel_note(row: dict) -> str:
    return " ".join(f"{x['regs']} regs, {x['spills']} spills, {x['shared'] // 1024} KB;" for x in row.get("kernels", []))


if __name__ == "__main__":
    main()
