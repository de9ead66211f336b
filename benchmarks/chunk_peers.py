"""Chunked prefill against one shot, bidiattn and FA4 side by side.

    python benchmarks/chunk_peers.py --out benchmarks/results

How much throughput a prompt loses when it is prefilled in chunks is a property of the chunk
size as much as of the mask: each chunk step is one kernel launch whose start and drain are not
amortized. This benchmark measures that loss for bidiattn on the inference benchmark's case
(hd128, 16 q / 8 kv heads, gemma3 full and sliding layers, 1092-token images every 2048, chunks
from the planner) and, as the peer's own reference, for bidiattn and FA4 on plain causal masks
(no images; sliding: the last 1024 keys) cut in equal chunks. Every call is a CUDA-graph replay
(one graph per whole one-shot or chunked run), each output is checked against bidiattn's
one-shot output before anything is timed, and the variants of a case are timed in turns
(``--rounds`` rounds, median of the rounds' medians) so that clock drift hits them alike.
*Ratio*: one-shot time over chunked time (1.0: chunking loses nothing). FA4 runs only where
``flash_attn.cute`` imports. Writes prefill-peers[-<label>]-<device>-<date>.json and .md (PERF.md
section 5).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import cases
from bidiattn import rules
from bidiattn.kernels.forward import span_attention_forward
from bidiattn.launch import plan_forward
from bidiattn.serving.prefill import RequestLayout, plan_prefill, step_spans
from inference import D, HKV, HQ, _graphed, image_ids

WINDOW = 1024
SCALE = D**-0.5


def bidiattn_calls(q, k, v, full, window, steps):
    """(one shot, chunked) callables over planned launches, as a serving step would run them."""
    plan_one = plan_forward(full, HQ, HKV, D, window=window)
    out_one, out = torch.empty_like(q), torch.empty_like(q)
    planned = [(s, a, b, plan_forward(s, HQ, HKV, D, window=window)) for s, a, b in steps]

    def one():
        return span_attention_forward(q, k, v, full, SCALE, None, out=out_one, plan=plan_one)[0]

    def chunked():
        for s, a, b, p in planned:
            span_attention_forward(q[a:b], k[:b], v[:b], s, SCALE, None, out=out[a:b], plan=p)
        return out

    return one, chunked


def fa4_calls(fa4, q, k, v, window, steps):
    """FA4's causal kernel, one shot and over the same chunks (bottom-right causal alignment:
    a chunk's rows are the last rows of its keys)."""
    ws = (window - 1, 0) if window else (None, None)
    q4, k4, v4 = q[None], k[None], v[None]
    out = torch.empty_like(q4)

    def one():
        return fa4(q4, k4, v4, softmax_scale=SCALE, causal=True, window_size=ws)[0][0]

    def chunked():
        for _, a, b in steps:
            out[:, a:b] = fa4(q4[:, a:b], k4[:, :b], v4[:, :b], softmax_scale=SCALE, causal=True, window_size=ws)[0]
        return out[0]

    return one, chunked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tokens", default="8192,32768,131072")
    parser.add_argument("--budgets", default="2048,8192")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--label", default=None, help="results file name: prefill-peers-<label>-...")
    args = parser.parse_args()
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except Exception as e:  # noqa: BLE001 - FA4 is optional
        print("FA4 not available:", cases.describe_error(e))
        fa4 = None
    results = []
    for t in (int(x) for x in args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        ids = image_ids(t)
        layout = RequestLayout.from_block_ids(ids.cpu())
        plain = RequestLayout.from_block_ids(torch.zeros(t, dtype=torch.int64))
        for images, (layer, window), budget in ((i, lw, b) for i in (True, False)
                                                for lw in (("full", None), ("sliding", WINDOW))
                                                for b in (int(x) for x in args.budgets.split(","))):
            # No images: block ids all zero, so the rule is plain causal (with the window) and
            # the planner cuts equal chunks.
            block_ids = ids if images else torch.zeros_like(ids)
            full = rules.build("gemma3", "official", layer, block_ids=block_ids, window=window)
            steps = [(step_spans(s, [full]), s.chunks[0].start, s.chunks[0].end)
                     for s in plan_prefill([layout if images else plain], budget).steps]
            row = dict(tokens=t, mask="images" if images else "plain causal", layer=layer, budget=budget,
                       steps=len(steps))
            ref = span_attention_forward(q, k, v, full, SCALE, None)[0]
            calls = dict(zip(("bidiattn_one", "bidiattn_chunked"), bidiattn_calls(q, k, v, full, window, steps)))
            if fa4 is not None and not images:
                calls.update(zip(("fa4_one", "fa4_chunked"), fa4_calls(fa4, q, k, v, window, steps)))
            graphs = {}
            for name, fn in calls.items():
                try:
                    err = cases.rel_err(fn(), ref)
                    row[f"{name}_rel_err"] = err
                    if err > 1e-2:
                        raise RuntimeError(f"{name} differs from bidiattn's one-shot output: {err:.2e}")
                    graph = _graphed(fn)
                    if graph is None:
                        raise RuntimeError(f"{name} could not be captured in a CUDA graph")
                    graphs[name] = graph
                except Exception as e:  # noqa: BLE001 - record the failing variant and go on
                    row[f"{name}_error"] = cases.describe_error(e)
            runs = {name: [] for name in graphs}
            for _ in range(args.rounds):
                for name, graph in graphs.items():
                    runs[name].append(cases.ms(graph, rep=200))
            for name, ms in runs.items():
                row[f"{name}_ms"] = statistics.median(ms)
                row[f"{name}_rounds"] = ms
            for peer in ("bidiattn", "fa4"):
                if f"{peer}_one_ms" in row and f"{peer}_chunked_ms" in row:
                    row[f"{peer}_ratio"] = row[f"{peer}_one_ms"] / row[f"{peer}_chunked_ms"]
                    # Time each chunk step loses against an even share of the one-shot call.
                    row[f"{peer}_loss_us_per_step"] = 1e3 * (row[f"{peer}_chunked_ms"] - row[f"{peer}_one_ms"]) / len(steps)
            print(json.dumps(row), flush=True)
            results.append(row)
    meta = cases.meta()
    lines = [f"# Chunked prefill against one shot, bidiattn and FA4, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. hd{D}, {HQ} q / {HKV} kv heads, "
             f"bf16; *images*: gemma3 official rule, 1092-token images every 2048, chunks from the planner; *plain "
             f"causal*: no images, equal chunks; sliding window {WINDOW}. CUDA-graph replays, median of "
             f"{args.rounds} rounds. Ratio: one-shot time over chunked time; loss: (chunked - one shot) / steps.", "",
             f"Command: `{meta['command']}`", "",
             "| tokens | mask | layer | chunk | steps | bidiattn one shot ms | chunked ms | ratio | loss µs/step "
             "| FA4 one shot ms | chunked ms | ratio | loss µs/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = []
        for peer in ("bidiattn", "fa4"):
            if f"{peer}_ratio" in r:
                cells += [f"{r[f'{peer}_one_ms']:.4f}", f"{r[f'{peer}_chunked_ms']:.4f}", f"{r[f'{peer}_ratio']:.3f}",
                          f"{r[f'{peer}_loss_us_per_step']:.1f}"]
            else:
                failed = [v for key, v in r.items() if key.startswith(peer) and key.endswith("_error")]
                cells += [f"fails: {failed[0]}" if failed else "n/a", "", "", ""]
        lines.append(f"| {r['tokens']} | {r['mask']} | {r['layer']} | {r['budget']} | {r['steps']} | " + " | ".join(cells) + " |")
    cases.write_results(args.out, "prefill-peers" + (f"-{args.label}" if args.label else ""), meta,
                        dict(results=results), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
