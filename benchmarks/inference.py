"""Inference benchmark: decode over long contexts, chunked vs one-shot prefill, span metadata.

    python benchmarks/inference.py --out benchmarks/results

Checks each variant against the reference math (SDPA with the dense rows of the mask) before
timing (median of CUDA-event runs). Writes inference-<device>-<date>.json and .md.
Decode is memory-bound: GB/s counts the K and V bytes of the keys each query may attend.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import bidiattn
import cases
from bidiattn import rules
from bidiattn.kernels.forward import TileConfig, pick_config, span_attention_forward
from bidiattn.planner import RequestLayout, plan_prefill, step_spans
from bidiattn.spans import SpanMask

HQ, HKV, D = 16, 8, 128


def image_ids(t: int) -> torch.Tensor:
    ids = torch.zeros(t, dtype=torch.int64, device="cuda")
    for n, s in enumerate(range(2048 - 1092, t - 64, 2048), 1):
        ids[s : s + 1092] = n
    return ids


def _graphed(fn):
    """The call captured once in a CUDA graph; returns a replay that yields the static output.
    Serving engines replay decode steps this way, so host overhead does not count."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static = fn()
    except RuntimeError as e:
        print("capture failed:", e)
        return None

    def replay():
        graph.replay()
        return static

    return replay


def decode_rows(ctx_lens, fa4):
    rows = []
    for ctx in ctx_lens:
        for batch in (1, 8):
            k, v = (torch.randn(batch * ctx, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
            full = rules.build("gemma3", "official", "full", block_ids=image_ids(ctx), validate=False)
            lo = full.lo[-1:].repeat(batch)
            hi = full.hi[-1:].repeat(batch)
            spans = SpanMask(lo, hi, torch.arange(batch + 1, device="cuda"), validate=False,
                             cu_seqlens_k=torch.arange(0, (batch + 1) * ctx, ctx, device="cuda"), total_keys=batch * ctx)
            kb, vb = (x.view(batch, ctx, HKV, D) for x in (k, v))
            want = F.scaled_dot_product_attention(q.view(batch, HQ, 1, D), kb.transpose(1, 2), vb.transpose(1, 2),
                                                  enable_gqa=True).view(batch, HQ, D)
            row = dict(context=ctx, batch=batch, kv_bytes=2 * batch * ctx * HKV * D * 2)
            variants = {
                "bidiattn_auto_splits": lambda: bidiattn.attention(q, k, v, spans, backend="triton"),
                "bidiattn_no_split": lambda: span_attention_forward(
                    q, k, v, spans, D**-0.5, None, config=TileConfig(**{**pick_config(D).__dict__, "kv_splits": 1}))[0],
                "sdpa": lambda: F.scaled_dot_product_attention(q.view(batch, HQ, 1, D), kb.transpose(1, 2),
                                                               vb.transpose(1, 2), enable_gqa=True),
            }
            if fa4 is not None:
                variants["fa4"] = lambda: fa4(q.view(batch, 1, HQ, D), kb, vb, causal=True)
            graph_fn = _graphed(variants["bidiattn_auto_splits"])
            if graph_fn is not None:
                variants["bidiattn_cuda_graph"] = graph_fn
            for name, fn in variants.items():
                try:
                    got = fn()
                    if isinstance(got, tuple):
                        got = got[0]
                    row[name + "_rel_err"] = cases.rel_err(got.reshape(batch, HQ, D), want)
                    row[name + "_us"] = 1000 * cases.ms(fn, rep=200)
                    row[name + "_gbps"] = row["kv_bytes"] / row[name + "_us"] / 1e3
                except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
                    row[name + "_error"] = cases.describe_error(e, 160)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def prefill_rows(t: int, budgets):
    ids = image_ids(t)
    q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rows = []
    for layer, window in (("full", None), ("sliding", 1024)):
        full = rules.build("gemma3", "official", layer, block_ids=ids, window=window)
        one_shot = bidiattn.attention(q, k, v, full, backend="triton")
        t_one = cases.ms(lambda: bidiattn.attention(q, k, v, full, backend="triton"), rep=100)
        row = dict(tokens=t, layer=layer, one_shot_ms=t_one, pairs=full.num_pairs())
        layout = RequestLayout.from_block_ids(ids.cpu())
        for budget in budgets:
            plan = plan_prefill([layout], budget)
            steps = [(step_spans(s, [full]), s.chunks[0]) for s in plan.steps]
            out = torch.empty_like(q)

            def run():
                for spans, c in steps:
                    out[c.start : c.end] = bidiattn.attention(q[c.start : c.end], k[: c.end], v[: c.end], spans,
                                                              backend="triton")
                return out

            err = cases.rel_err(run(), one_shot)
            ms = cases.ms(run, rep=100)
            row[f"chunked_{budget}"] = dict(steps=len(plan.steps), max_step_tokens=plan.max_step_tokens, ms=ms,
                                            rel_err_vs_one_shot=err, throughput_vs_one_shot=t_one / ms)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def metadata_row(t: int):
    ids = image_ids(t)
    cu = torch.tensor([0, t], device="cuda")

    def build():
        spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=1024, cu_seqlens=cu, validate=False)
        return spans.tile_summary(pick_config(D).block_m)

    build()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        build()
        no_sync = True
    except RuntimeError:
        no_sync = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    row = dict(tokens=t, bytes_per_token=8, build_us=1000 * cases.ms(build, rep=100), no_host_sync=no_sync)
    replay = _graphed(build)
    if replay is not None:
        row["build_us_cuda_graph"] = 1000 * cases.ms(replay, rep=100)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except Exception:  # noqa: BLE001 - FA4 is optional
        fa4 = None
    result = dict(decode=decode_rows([8192, 32768, 131072], fa4), prefill=prefill_rows(32768, [2048, 8192]),
                  metadata=metadata_row(131072))
    meta = cases.meta("python benchmarks/inference.py")
    lines = [f"# Inference, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. hd{D}, {HQ} q / {HKV} kv heads, "
             "bf16, gemma3 official rule, 1092-token images every 2048.", "",
             "Decode (one query per sequence; µs, and GB/s of K/V read):", "",
             "| context | batch | bidiattn (auto splits) | same, CUDA graph replay | bidiattn (no split) | SDPA (no mask) | FA4 causal |",
             "|---|---|---|---|---|---|---|"]

    def cell(r, key):
        return f"{r[key + '_us']:.1f} µs ({r[key + '_gbps']:.0f} GB/s)" if key + "_us" in r else (
            "fails" if key + "_error" in r else "n/a")

    for r in result["decode"]:
        lines.append(f"| {r['context']} | {r['batch']} | " + " | ".join(
            cell(r, key) for key in ("bidiattn_auto_splits", "bidiattn_cuda_graph", "bidiattn_no_split", "sdpa", "fa4")) + " |")
    lines += ["", "Prefill, 32K tokens: one shot vs chunks from the planner (no image split):", "",
              "| layer | one shot | chunks of 2K | chunks of 8K |", "|---|---|---|---|"]
    for r in result["prefill"]:
        cells = [f"{r[f'chunked_{b}']['ms']:.2f} ms ({r[f'chunked_{b}']['throughput_vs_one_shot']:.2f}x, "
                 f"{r[f'chunked_{b}']['steps']} steps)" for b in (2048, 8192)]
        lines.append(f"| {r['layer']} | {r['one_shot_ms']:.2f} ms | " + " | ".join(cells) + " |")
    m = result["metadata"]
    lines += ["", f"Span metadata at {m['tokens']} tokens: {m['bytes_per_token']} bytes/token, spans + tile summary built "
              f"in {m['build_us']:.0f} µs eager ({m.get('build_us_cuda_graph', float('nan')):.0f} µs as a CUDA graph "
              f"replay), no host sync: {m['no_host_sync']}."]
    cases.write_results(args.out, "inference", meta, result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
