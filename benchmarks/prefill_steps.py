"""Where chunked prefill loses time: each step of a chunked 32K prompt timed alone.

    python benchmarks/prefill_steps.py --out benchmarks/results [--label L]

Writes prefill-steps[-<label>]-<device>-<date>.json and .md (PERF.md row P5 cites the ``--label 8k`` run).

Same case as the prefill section of ``inference.py`` (hd128, 16 q / 8 kv heads, gemma3 full and
sliding layers, 1092-token images every 2048, planned calls replayed in CUDA graphs). For each
tile config and chunk budget: the one-shot call, the whole chunked run, and (2K chunks) every
step alone.
*Ratio*: the default one-shot call's time over the chunked run's. A step's *efficiency* is the
time it would take at the default one-shot call's rate (its allowed pairs over the one-shot pairs
per ms) over its measured time, so a step at 1.0 loses nothing to being a chunk. Each variant's output is checked against the one-shot output before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

import cases
from bidiattn import rules
from bidiattn.kernels.forward import span_attention_forward
from bidiattn.launch import TileConfig, plan_forward
from bidiattn.serving.prefill import RequestLayout, plan_prefill, step_spans
from inference import D, HKV, HQ, _graphed, image_ids

# None: the planner's choice. Tried and dropped (NOTES.md, "Tried and removed"): 256x128,
# 3-stage 256x64 and 128x128 tiles do not fit in shared memory at hd128 (262-328 KB asked); a
# stream-K schedule (commits b0d07b6, 7163e35) ran 20-50% slower.
CONFIGS = (None, TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 3, pack_gqa=True),
           TileConfig(256, 64, 16, 3, edge_stages=1, pack_gqa=True), TileConfig(128, 64, 8, 3, edge_stages=1, pack_gqa=True))
LAYERS = (("full", None), ("sliding", 1024))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--budgets", default="2048,8192")
    parser.add_argument("--layers", default="full,sliding")
    parser.add_argument("--no-steps", action="store_true", help="time whole runs only, not each 2K step")
    parser.add_argument("--configs", default=None,
                        help="tile configs instead of the built-in list, ';'-separated: 'default' (the planner's "
                        "choice) or block_m,block_n,num_warps,num_stages[,field=value...], e.g. "
                        "'default;64,64,4,3,edge_stages=1,pack_gqa=1'")
    parser.add_argument("--label", default=None, help="results file name: prefill-steps-<label>-...")
    parser.add_argument("--kv-heads", type=int, default=HKV, help=f"K/V heads (default {HKV}; {HQ} query heads)")
    args = parser.parse_args()
    configs = CONFIGS if args.configs is None else tuple(_parse_config(c) for c in args.configs.split(";"))
    t = args.tokens
    ids = image_ids(t)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    hkv = args.kv_heads
    k, v = (torch.randn(t, hkv, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    layout = RequestLayout.from_block_ids(ids.cpu())
    scale = D**-0.5
    results = []
    default_one_shot = {}
    budgets = [int(x) for x in args.budgets.split(",")]
    for layer, window in [x for x in LAYERS if x[0] in args.layers.split(",")]:
        full = rules.build("gemma3", "official", layer, block_ids=ids, window=window)
        reference = span_attention_forward(q, k, v, full, scale, None)[0]
        for budget, cfg in itertools.product(budgets, configs):
            steps = [(step_spans(s, [full]), s.chunks[0]) for s in plan_prefill([layout], budget).steps]
            row = dict(layer=layer, budget=budget, config=repr(cfg) if cfg else "default")
            try:
                plan_one = plan_forward(full, HQ, hkv, D, config=cfg, window=window)
                out_one = torch.empty_like(q)

                def one():
                    return span_attention_forward(q, k, v, full, scale, None, out=out_one, plan=plan_one)[0]

                row["one_shot_rel_err"] = cases.rel_err(one(), reference)
                if row["one_shot_rel_err"] > 1e-2:
                    raise RuntimeError(f"one-shot output differs from the default kernel: {row['one_shot_rel_err']:.2e}")
                row["one_shot_ms"] = cases.ms(_graphed(one), rep=100)
                pairs_one = full.num_pairs()
                rate = pairs_one / default_one_shot.get(layer, row["one_shot_ms"])
                out = torch.empty_like(q)
                planned = [(s, c, plan_forward(s, HQ, hkv, D, config=cfg, window=window)) for s, c in steps]

                def step_fn(s, c, p):
                    return lambda: span_attention_forward(q[c.start : c.end], k[: c.end], v[: c.end], s, scale, None,
                                                          out=out[c.start : c.end], plan=p)[0]

                def run_all():
                    for s, c, p in planned:
                        step_fn(s, c, p)()
                    return out

                row["chunked_rel_err"] = cases.rel_err(run_all(), reference)
                if row["chunked_rel_err"] > 1e-2:
                    raise RuntimeError(f"chunked output differs from one shot: {row['chunked_rel_err']:.2e}")
                row["chunked_ms"] = cases.ms(_graphed(run_all), rep=100)
                default_one_shot.setdefault(layer, row["one_shot_ms"])
                # Against the default one-shot call: what a user of the default gets without chunks.
                row["ratio"] = default_one_shot[layer] / row["chunked_ms"]
                row["steps"] = []
                for s, c, p in planned if budget <= 2048 and not args.no_steps else ():
                    step_ms = cases.ms(_graphed(step_fn(s, c, p)), rep=50)
                    pairs = s.num_pairs()
                    row["steps"].append(dict(start=c.start, end=c.end, pairs=pairs, ms=step_ms,
                                             efficiency=pairs / rate / step_ms))
            except Exception as e:  # noqa: BLE001 - record the failing variant and go on
                row["error"] = cases.describe_error(e)
            print(json.dumps(row), flush=True)
            results.append(row)
    meta = cases.meta()
    lines = [f"# Chunked prefill step by step, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. hd{D}, {HQ} q / {hkv} kv "
             f"heads, {t} tokens, gemma3 official rule, CUDA-graph replays.", "",
             "| layer | chunk | config | one shot ms | chunked ms | ratio | step efficiencies (first ... last) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['budget']} | {r['config']} | fails: {r['error']} | | | |")
            continue
        eff = " ".join(f"{s['efficiency']:.2f}" for s in r["steps"])
        lines.append(f"| {r['layer']} | {r['budget']} | {r['config']} | {r['one_shot_ms']:.2f} | {r['chunked_ms']:.2f} "
                     f"| {r['ratio']:.3f} | {eff} |")
    cases.write_results(args.out, "prefill-steps" + (f"-{args.label}" if args.label else ""), meta, dict(results=results), lines)
    print("\n".join(lines))


def _parse_config(text: str) -> TileConfig | None:
    """'default' -> None; 'bm,bn,warps,stages[,field=value...]' -> TileConfig (ints; the
    boolean fields take 0/1)."""
    if text.strip() == "default":
        return None
    parts = [x.strip() for x in text.split(",")]
    kwargs = {}
    for item in parts[4:]:
        name, _, value = item.partition("=")
        kwargs[name] = bool(int(value)) if isinstance(getattr(TileConfig, name, None), bool) else int(value)
    return TileConfig(*(int(x) for x in parts[:4]), **kwargs)


if __name__ == "__main__":
    main()
