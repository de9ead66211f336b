"""Inference benchmark: decode over long contexts, chunked vs one-shot prefill, span metadata,
and the end-to-end runner (:class:`bidiattn.serving.runner.ServingSession`) driven through chunked
prefill and decode.

    python benchmarks/inference.py --out benchmarks/results

Checks each variant against the reference math (SDPA with the dense rows of the mask, or the
one-shot call) before timing (median of CUDA-event runs; the runner: median of wall-clock runs).
Writes <name>-<device>-<date>.json and .md (``--name``, default ``inference``; PERF.md sections 5-7 and 9
cite the runs). Decode is memory-bound: GB/s counts the K and V
bytes of the keys each query may attend.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F

import bidiattn
import cases
from bidiattn import rules
from bidiattn.blocks import BlockList
from bidiattn.serving.kvcache import PagedKVCache, paged_attention
from bidiattn.kernels.forward import span_attention_forward
from bidiattn.launch import TileConfig, pick_config, plan_forward
from bidiattn.serving.prefill import RequestLayout, plan_prefill, step_spans
from bidiattn.serving.graphs import capture
from bidiattn.serving.runner import AttentionStack, ServingSession, StackConfig
from bidiattn.spans import SpanMask

HQ, HKV, D = 16, 8, 128
SPLIT_SWEEP = (2, 4, 8, 16, 32)
PAGE_SIZES = (16, 64)  # 64: a key tile per page, so TMA loads (hd128 tiles are 64 keys)
# Tiles for small prefill steps (a 2K chunk is 8 tiles of 256 rows x 16 heads: one wave).
STEP_SWEEP = (TileConfig(256, 64, 16, 3, edge_stages=1), TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 3, edge_stages=1),
              TileConfig(128, 64, 8, 2, edge_stages=1), TileConfig(128, 64, 8, 3, pack_gqa=True),
              TileConfig(256, 64, 16, 3, edge_stages=1, kv_splits=2))


def image_ids(t: int) -> torch.Tensor:
    ids = torch.zeros(t, dtype=torch.int64, device="cuda")
    for n, s in enumerate(range(2048 - 1092, t - 64, 2048), 1):
        ids[s : s + 1092] = n
    return ids


def _graphed(fn):
    """The call captured once in a CUDA graph; returns a replay that yields the static output.
    Serving engines replay decode steps this way, so host overhead does not count."""
    try:
        graph, static = capture(fn)
    except RuntimeError as e:
        print("capture failed:", e)
        return None

    def replay():
        graph.replay()
        return static

    return replay


class _Lazy:
    """A call to capture in a CUDA graph when its turn to be timed comes."""

    def __init__(self, fn):
        self.fn = fn

    def capture(self):
        return _graphed(self.fn)


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
            # A launch plan built once per step and shared by the layers: each layer's call is the
            # kernel (and the split merge) only.
            plan = plan_forward(spans, HQ, HKV, D)
            row["planned_kv_splits"] = plan.kv_splits
            variants["bidiattn_planned"] = lambda: span_attention_forward(q, k, v, spans, D**-0.5, None, plan=plan)[0]
            # CUDA graphs, each captured just before it is timed (after every eager variant ran).
            graphs = {"bidiattn_cuda_graph": variants["bidiattn_auto_splits"],
                      "bidiattn_planned_cuda_graph": variants["bidiattn_planned"]}
            decode_cfg = pick_config(D, rows_per_sequence=1)
            for splits in SPLIT_SWEEP:
                plan_s = plan_forward(spans, HQ, HKV, D, config=TileConfig(**{**decode_cfg.__dict__, "kv_splits": splits}))
                graphs[f"planned_graph_splits{splits}"] = (
                    lambda plan_s=plan_s: span_attention_forward(q, k, v, spans, D**-0.5, None, plan=plan_s)[0])
            # The serving layout: the same keys in shuffled pages, read through the page table.
            for page_size in PAGE_SIZES:
                pages = batch * ctx // page_size
                perm = torch.randperm(pages, device="cuda")
                cache = PagedKVCache.allocate(pages, page_size, HKV, D, torch.bfloat16, "cuda")
                cache.k_pages[perm] = k.view(pages, page_size, HKV, D)
                cache.v_pages[perm] = v.view(pages, page_size, HKV, D)
                table = perm.to(torch.int32).view(batch, ctx // page_size)
                graphs[f"paged{page_size}_planned_graph"] = (
                    lambda cache=cache, table=table: paged_attention(q, cache, table, spans, plan=plan, validate=False))
            for name, fn in graphs.items():
                variants[name] = _Lazy(fn)
            for name, fn in variants.items():
                try:
                    if isinstance(fn, _Lazy):
                        fn = fn.capture()
                        if fn is None:
                            row[name + "_error"] = "capture failed"
                            continue
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


def _rep(t: int) -> int:
    """do_bench's time budget in ms: enough for ~7 runs of a 128K-token full layer (~140 ms)."""
    return max(100, t // 128)


def prefill_rows(t: int, budgets, step_sweep: bool = False):
    ids = image_ids(t)
    rep = _rep(t)
    q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    layout = RequestLayout.from_block_ids(ids.cpu())
    blocks = BlockList.from_pairs([layout.blocks], device="cuda")
    rows = []
    for layer, window in (("full", None), ("sliding", 1024)):
        full = rules.build("gemma3", "official", layer, block_ids=ids, window=window)
        one_shot = bidiattn.attention(q, k, v, full, backend="triton")
        t_one = cases.ms(lambda: bidiattn.attention(q, k, v, full, backend="triton"), rep=rep)
        row = dict(tokens=t, layer=layer, one_shot_ms=t_one, pairs=full.num_pairs())
        # With the launch plan built outside the timed call (once per step, shared by the layers).
        plan_one = plan_forward(full, HQ, HKV, D, window=window)

        def one_planned():
            return span_attention_forward(q, k, v, full, D**-0.5, None, plan=plan_one)[0]

        row["one_shot_planned_ms"] = cases.ms(one_planned, rep=rep)
        graphed = _graphed(one_planned)
        row["one_shot_planned_graph_ms"] = cases.ms(graphed, rep=rep) if graphed else None
        # The same call over a paged cache (pages in order; the kernel reads the table either way).
        for page_size in PAGE_SIZES:
            cache = PagedKVCache.allocate(-(-t // page_size), page_size, HKV, D, torch.bfloat16, "cuda")
            cache.k_pages.view(-1, HKV, D)[:t].copy_(k)
            cache.v_pages.view(-1, HKV, D)[:t].copy_(v)
            table = torch.arange(cache.num_pages, dtype=torch.int32, device="cuda")[None]
            extend = SpanMask(full.lo, full.hi, full.cu_seqlens, cu_seqlens_k=full.cu_seqlens, total_keys=t)
            plan_paged = plan_forward(extend, HQ, HKV, D, window=window)

            def paged(cache=cache, table=table, extend=extend, plan_paged=plan_paged):
                return paged_attention(q, cache, table, extend, plan=plan_paged, validate=False)

            row[f"one_shot_paged{page_size}_rel_err"] = cases.rel_err(paged(), one_shot)
            graphed_paged = _graphed(paged)
            row[f"one_shot_paged{page_size}_graph_ms"] = cases.ms(graphed_paged, rep=rep) if graphed_paged else None
            del cache, graphed_paged
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
            ms = cases.ms(run, rep=rep)
            cell = dict(steps=len(plan.steps), max_step_tokens=plan.max_step_tokens, ms=ms,
                        rel_err_vs_one_shot=err, throughput_vs_one_shot=t_one / ms)
            planned = [(spans, c, plan_forward(spans, HQ, HKV, D, window=window)) for spans, c in steps]

            def run_planned():
                for spans, c, p in planned:
                    span_attention_forward(q[c.start : c.end], k[: c.end], v[: c.end], spans, D**-0.5, None,
                                           out=out[c.start : c.end], plan=p)
                return out

            cell["planned_rel_err_vs_one_shot"] = cases.rel_err(run_planned(), one_shot)
            cell["planned_ms"] = cases.ms(run_planned, rep=rep)
            cell["planned_vs_one_shot_planned"] = row["one_shot_planned_ms"] / cell["planned_ms"]
            graphed = _graphed(run_planned)
            if graphed is not None and row["one_shot_planned_graph_ms"]:
                cell["planned_graph_ms"] = cases.ms(graphed, rep=rep)
                cell["planned_graph_vs_one_shot_graph"] = row["one_shot_planned_graph_ms"] / cell["planned_graph_ms"]
            if step_sweep and budget <= 2048 and graphed is not None:
                sweep = {}
                for cfg in STEP_SWEEP:
                    tuned = [(spans, c, plan_forward(spans, HQ, HKV, D, config=cfg)) for spans, c in steps]

                    def run_tuned(tuned=tuned):
                        for spans, c, p in tuned:
                            span_attention_forward(q[c.start : c.end], k[: c.end], v[: c.end], spans, D**-0.5, None,
                                                   out=out[c.start : c.end], plan=p)
                        return out

                    err = cases.rel_err(run_tuned(), one_shot)
                    g = _graphed(run_tuned)
                    sweep[repr(cfg)] = dict(rel_err_vs_one_shot=err, graph_ms=cases.ms(g, rep=rep) if g else None)
                cell["config_sweep_graph"] = sweep
            # Per-step metadata (spans from the block list + launch plan), paid once per step and
            # layer type, not per layer.
            c0 = plan.steps[len(plan.steps) // 2].chunks[0]
            cu_q = torch.tensor([0, c0.tokens], device="cuda")
            cu_k = torch.tensor([0, c0.end], device="cuda")

            def metadata():
                spans = rules.build_from_blocks("gemma3", "official", layer, blocks=blocks, cu_seqlens=cu_q,
                                                total_tokens=c0.tokens, window=window, cu_seqlens_k=cu_k,
                                                total_keys=c0.end, validate=False)
                return plan_forward(spans, HQ, HKV, D, window=window)

            cell["step_metadata_us"] = 1000 * cases.ms(metadata, rep=50)
            row[f"chunked_{budget}"] = cell
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


RUNNER_LAYERS = ("sliding",) * 5 + ("full",)  # Gemma-3's pattern: five sliding layers, then one global


def _wall_ms(fn, runs: int) -> float:
    """Median wall-clock ms of ``runs`` calls after one warm-up (host work included)."""
    fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def runner_rows(contexts, budgets, page_sizes, decode_steps: int = 16):
    """The end-to-end runner: a six-layer stack (random weights, hd128, 16 q / 8 kv heads, window
    1024) through :class:`ServingSession` — prefill in planned chunks over paged caches, then decode.
    Eager and with ``cuda_graphs=True`` (host work of each step included); the one-step plan
    (budget = prompt length) is the one-shot baseline, and :meth:`AttentionStack.one_shot` (contiguous K/V, no
    cache) shows what paging costs."""
    config = StackConfig(hidden=HQ * D, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, layer_types=RUNNER_LAYERS,
                         window=1024)
    stack = AttentionStack(config, seed=0, device="cuda")
    rows = []
    for t, page_size in itertools.product(contexts, page_sizes):
        ids = image_ids(t)
        g = torch.Generator(device="cuda").manual_seed(t)
        x = torch.randn(t, config.hidden, device="cuda", dtype=config.dtype, generator=g)
        session = ServingSession(stack, [ids], page_size=page_size, max_tokens_per_request=t + decode_steps + 1)
        graphed = ServingSession(stack, [ids], page_size=page_size, max_tokens_per_request=t + decode_steps + 1,
                                 cuda_graphs=True)
        runs = 3 if t > 32768 else 5
        want = stack.one_shot(x, ids, backend="triton")
        row = dict(tokens=t, layers=len(RUNNER_LAYERS), page_size=page_size, runs=runs,
                   stack_one_shot_ms=_wall_ms(lambda: stack.one_shot(x, ids, backend="triton"), runs))
        for key, budget in (("one_step", t), *((f"chunked_{b}", b) for b in budgets)):
            plan = plan_prefill(session.layouts, budget)
            got = session.prefill([x], budget)[0]
            row[key] = dict(steps=len(plan.steps), rel_err_vs_stack_one_shot=cases.rel_err(got, want),
                            ms=_wall_ms(lambda budget=budget: session.prefill([x], budget), runs))
            # CUDA graphs: the first run captures each step shape, the timed runs replay them.
            got = graphed.prefill([x], budget)[0]
            row[key]["graphs_rel_err_vs_stack_one_shot"] = cases.rel_err(got, want)
            row[key]["graphs_ms"] = _wall_ms(lambda budget=budget: graphed.prefill([x], budget), runs)
        for budget in budgets:
            cell = row[f"chunked_{budget}"]
            cell["throughput_vs_one_step"] = row["one_step"]["ms"] / cell["ms"]
            cell["graphs_throughput_vs_one_step"] = row["one_step"]["graphs_ms"] / cell["graphs_ms"]
        # Decode after a whole prefill: each step appends one token per layer and attends the cache.
        tokens = torch.randn(decode_steps, 1, config.hidden, device="cuda", dtype=config.dtype, generator=g)
        first = session.decode(tokens[0])
        full = stack.one_shot(torch.cat([x, tokens[0]]), torch.cat([ids, ids.new_zeros(1)]), backend="triton")
        row["decode_rel_err_vs_stack_one_shot"] = cases.rel_err(first, full[-1:])
        graphed.prefill([x], t)
        row["decode_graphs_rel_err_vs_stack_one_shot"] = cases.rel_err(graphed.decode(tokens[0]), full[-1:])
        for name, s in (("decode_ms_per_step", session), ("decode_graphs_ms_per_step", graphed)):
            times = []
            for i in range(1, decode_steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                s.decode(tokens[i])
                torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - t0))
            row[name] = statistics.median(times)
        del graphed
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def metadata_row(t: int):
    ids = image_ids(t)
    cu = torch.tensor([0, t], device="cuda")
    blocks = BlockList.from_pairs([RequestLayout.from_block_ids(ids.cpu()).blocks], device="cuda")
    want = rules.build("gemma3", "official", "sliding", block_ids=ids, window=1024, cu_seqlens=cu)

    def from_ids():
        spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=1024, cu_seqlens=cu, validate=False)
        return spans.tile_summary(pick_config(D).block_m)

    def from_blocks():
        return rules.build_from_blocks("gemma3", "official", "sliding", blocks=blocks, cu_seqlens=cu, total_tokens=t,
                                       window=1024, validate=False)

    def from_blocks_and_plan():
        return plan_forward(from_blocks(), HQ, HKV, D)

    got = from_blocks()
    row = dict(tokens=t, bytes_per_token=8, blocks=blocks.capacity,
               blocks_match_build=bool(torch.equal(got.lo, want.lo) and torch.equal(got.hi, want.hi)))
    for name, fn in (("build", from_ids), ("blocks_build", from_blocks), ("blocks_build_and_plan", from_blocks_and_plan)):
        fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            row[name + "_no_host_sync"] = True
        except RuntimeError:
            row[name + "_no_host_sync"] = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        row[name + "_us"] = 1000 * cases.ms(fn, rep=100)
        replay = _graphed(fn)
        if replay is not None:
            row[name + "_us_cuda_graph"] = 1000 * cases.ms(replay, rep=100)
    row["no_host_sync"] = row["build_no_host_sync"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="inference", help="result file stem")
    parser.add_argument("--sections", default="metadata,decode,prefill,runner",
                        help="comma-separated subset of metadata, decode, prefill, runner")
    parser.add_argument("--contexts", default="8192,32768,131072", help="prompt lengths of the prefill and runner sections")
    parser.add_argument("--step-sweep", action="store_true", help="also time STEP_SWEEP's tiles on 2K chunks")
    parser.add_argument("--page-sizes", default="16,64",
                        help="the runner's page sizes (pages of a multiple of 64 keys take TMA loads at hd128)")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except Exception:  # noqa: BLE001 - FA4 is optional
        fa4 = None
    sections = args.sections.split(",")
    result = dict(metadata=metadata_row(131072) if "metadata" in sections else None,
                  decode=decode_rows([8192, 32768, 131072], fa4) if "decode" in sections else [],
                  prefill=[r for t in contexts for r in prefill_rows(t, [2048, 8192], args.step_sweep)]
                  if "prefill" in sections else [],
                  runner=runner_rows(contexts, [2048, 8192], [int(p) for p in args.page_sizes.split(",")]) if "runner" in sections else [])
    meta = cases.meta()
    lines = [f"# Inference, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. hd{D}, {HQ} q / {HKV} kv heads, "
             "bf16, gemma3 official rule, 1092-token images every 2048."]
    lines += [] if not result["decode"] else [
        "", "Decode (one query per sequence; µs, and GB/s of K/V read). *paged*: the same keys in shuffled "
        "pages of a paged cache. *planned*: the launch plan built once "
        "per step outside the call (shared by the layers); *graph*: CUDA-graph replay; best split: the "
        f"fastest planned graph over kv_splits {SPLIT_SWEEP}:", "",
        "| context | batch | bidiattn (auto splits) | graph | planned | planned, graph | best split, graph "
        "| bidiattn (no split) | SDPA (no mask) | FA4 causal | " + " | ".join(
            f"paged {p}, planned, graph" for p in PAGE_SIZES) + " |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(PAGE_SIZES)]

    def cell(r, key):
        return f"{r[key + '_us']:.1f} µs ({r[key + '_gbps']:.0f} GB/s)" if key + "_us" in r else (
            "fails" if key + "_error" in r else "n/a")

    for r in result["decode"]:
        sweep = {sp: r[f"planned_graph_splits{sp}_us"] for sp in SPLIT_SWEEP if f"planned_graph_splits{sp}_us" in r}
        best = min(sweep, key=sweep.get) if sweep else None
        best_cell = f"{sweep[best]:.1f} µs ({best} splits)" if best else "n/a"
        lines.append(f"| {r['context']} | {r['batch']} | " + " | ".join(
            cell(r, key) for key in ("bidiattn_auto_splits", "bidiattn_cuda_graph", "bidiattn_planned",
                                     "bidiattn_planned_cuda_graph")) + f" | {best_cell} | " + " | ".join(
            cell(r, key) for key in ("bidiattn_no_split", "sdpa", "fa4", *(f"paged{p}_planned_graph" for p in PAGE_SIZES)))
            + " |")
    lines += [] if not result["prefill"] else [
        "", "Prefill, one attention layer: one shot vs chunks from the planner (no image split); ms, and "
        "throughput relative to the one-shot call of the same kind:", "",
        "| tokens | layer | kind | one shot | chunks of 2K | chunks of 8K |", "|---|---|---|---|---|---|"]
    for r in result["prefill"]:
        for kind, one_key, key, ratio in (
                ("eager, unplanned", "one_shot_ms", "ms", "throughput_vs_one_shot"),
                ("eager, planned", "one_shot_planned_ms", "planned_ms", "planned_vs_one_shot_planned"),
                ("planned, graph", "one_shot_planned_graph_ms", "planned_graph_ms", "planned_graph_vs_one_shot_graph")):
            if r.get(one_key) is None:
                continue
            cells = [f"{r[f'chunked_{b}'][key]:.2f} ms ({r[f'chunked_{b}'][ratio]:.2f}x)"
                     if key in r[f"chunked_{b}"] else "n/a" for b in (2048, 8192)]
            lines.append(f"| {r['tokens']} | {r['layer']} | {kind} | {r[one_key]:.2f} ms | " + " | ".join(cells) + " |")
    if result["prefill"]:
        lines += ["", "One-shot prefill over a paged cache (planned, graph; pages in order): ms, and the contiguous "
                  "call's time over it:", "", "| tokens | layer | contiguous | " + " | ".join(
                      f"pages of {p}" for p in PAGE_SIZES) + " |", "|---|---|---|" + "---|" * len(PAGE_SIZES)]
        for r in result["prefill"]:
            base = r["one_shot_planned_graph_ms"]
            cells = [f"{r[f'one_shot_paged{p}_graph_ms']:.2f} ms ({base / r[f'one_shot_paged{p}_graph_ms']:.2f}x)"
                     if r.get(f"one_shot_paged{p}_graph_ms") and base else "n/a" for p in PAGE_SIZES]
            lines.append(f"| {r['tokens']} | {r['layer']} | {base:.2f} ms | " + " | ".join(cells) + " |")
    for r in result["prefill"]:
        for b in (2048,):
            sweep = r[f"chunked_{b}"].get("config_sweep_graph", {})
            if sweep:
                lines += ["", f"{r['tokens']} tokens, {r['layer']}, {b // 1024}K chunks, tile configs (planned, graph): " + "; ".join(
                    f"{name}: {v['graph_ms']:.2f} ms" for name, v in sweep.items() if v["graph_ms"])]
    lines += [] if not result["prefill"] else ["", "Per-step metadata of a mid-prompt chunk (spans from the block list + launch plan, eager, once per "
              "step and layer type): " + ", ".join(
                  f"{r['tokens']} tokens {r['layer']} {b // 1024}K chunks {r[f'chunked_{b}']['step_metadata_us']:.0f} µs"
                  for r in result["prefill"] for b in (2048, 8192)) + "."]
    if result["runner"]:
        lines += ["", f"End-to-end runner (`bidiattn.serving.runner.ServingSession`): {len(RUNNER_LAYERS)} layers "
                  f"({', '.join(RUNNER_LAYERS)}), hidden {HQ * D}, window 1024; wall-clock median, host work of "
                  "every step included; *eager*: the session's Python per layer, *graphs*: `cuda_graphs=True` "
                  "(each step shape captured in a first run, replayed in the timed ones). *stack one shot*: "
                  "`AttentionStack.one_shot` (contiguous K/V, no cache); *one step*: the session with a budget of "
                  "the whole prompt; chunk columns: throughput relative to one step of the same mode; rel. err: "
                  "the session's output vs the stack's one shot (both modes):", "",
                  "| tokens | page size | mode | stack one shot | one step | chunks of 2K | chunks of 8K | max rel. err "
                  "| decode, ms/step |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["runner"]:
            for mode, pre in (("eager", ""), ("graphs", "graphs_")):
                cells = [f"{r[f'chunked_{b}'][pre + 'ms']:.1f} ms ({r[f'chunked_{b}'][pre + 'throughput_vs_one_step']:.2f}x, "
                         f"{r[f'chunked_{b}']['steps']} steps)" for b in (2048, 8192)]
                err = max([r[f"decode_{pre}rel_err_vs_stack_one_shot"]]
                          + [r[k][pre + "rel_err_vs_stack_one_shot"] for k in r if k == "one_step" or k.startswith("chunked_")])
                lines.append(f"| {r['tokens']} | {r['page_size']} | {mode} | {r['stack_one_shot_ms']:.1f} ms | "
                             f"{r['one_step'][pre + 'ms']:.1f} ms | " + " | ".join(cells)
                             + f" | {err:.1e} | {r[f'decode_{pre}ms_per_step']:.2f} |")
    m = result["metadata"] or {}
    lines += [] if not m else ["", f"Span metadata at {m['tokens']} tokens ({m['blocks']} blocks), {m['bytes_per_token']} bytes/token "
              f"(block-list spans equal rules.build: {m['blocks_match_build']}):", "",
              "| builder | eager | CUDA graph replay | no host sync |", "|---|---|---|---|"]
    for name, what in (("build", "rules.build from block ids + tile summary"),
                       ("blocks_build", "rules.build_from_blocks"),
                       ("blocks_build_and_plan", "rules.build_from_blocks + plan_forward")) if m else ():
        lines.append(f"| {what} | {m[name + '_us']:.1f} µs | {m.get(name + '_us_cuda_graph', float('nan')):.1f} µs "
                     f"| {m[name + '_no_host_sync']} |")
    cases.write_results(args.out, args.name, meta, result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
