"""The vLLM backend's decode step at Gemma-4-31B geometry, without vLLM: the metadata builder's
host time (one build, and a step's builds for six KV-cache groups: shared, through vLLM's
``update_block_table`` hook, or separate) and each layer kind's attention over a cache laid out
as vLLM lays it out, per tile config of the decode kernel.

    python benchmarks/vllm_decode.py --out benchmarks/results [--batch 2] [--context 8192]

Where vLLM's decode with bidiattn trails its TRITON_ATTN backend (PERF.md V7: 0.90x tokens/s
with CUDA graphs), this separates the parts bidiattn owns: the builder's ``build`` (host work
once per KV-cache group and step, outside vLLM's CUDA graphs) and, inside them, the first layer
of a kind (spans, launch plan, attention) and every other layer (attention alone). Layers:
sliding head dim 256 with 32 query / 16 K/V heads (window 1024) and full head dim 512 with 32 /
4 (Gemma-4-31B); ``--batch`` requests of ``--context`` cached tokens, a 280-token image every
1000, one new row each; pages of 16 in a shuffled pool. The attention runs as CUDA-graph
replays (as in vLLM's full decode graphs), timed with CUDA events (median);
*K+V GB/s* counts the K and V bytes the layer must read once. Decode tile configs: today's
``launch.pick_config`` and the variants in ``VARIANTS`` (each checked against the fp32
reference before it is timed; one that fails to compile or to match is recorded, not timed).
Writes vllm-decode[-<label>]-<device>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

import cases
from bidiattn import SpanMask, launch, reference
from bidiattn.integrations.vllm.config import resolve_model
from bidiattn.integrations.vllm.step import StepBuilder, attend
from bidiattn.launch import TileConfig
from bidiattn.serving.graphs import capture

BLOCK = 16
GROUPS = 6  # vLLM's KV-cache groups for a 5:1 sliding:full pattern (one layer of each type per group)
IMAGE, EVERY = 280, 1000
# (layer, head dim, query heads, K/V heads): Gemma-4-31B's two layer kinds.
LAYERS = (("sliding", 256, 32, 16), ("full", 512, 32, 4))
# Decode tile configs to try per head dim, besides today's pick_config.
VARIANTS = {
    # kv_splits=32: what the sliding layers' decode ran before the split count heeded the window
    256: [TileConfig(16, 64, 4, 2, kv_splits=32, pack_gqa=True), TileConfig(16, 64, 4, 2, kv_splits=8, pack_gqa=True),
          TileConfig(16, 64, 4, 3, pack_gqa=True), TileConfig(16, 32, 4, 3, pack_gqa=True)],
    # split_dv=2: the decode default before 16x32 tiles over all 512 columns (which read K once)
    512: [TileConfig(16, 64, 4, 1, split_dv=2, pack_gqa=True), TileConfig(16, 32, 4, 2, kv_splits=64, pack_gqa=True),
          TileConfig(16, 32, 4, 3, pack_gqa=True), TileConfig(16, 32, 8, 2, pack_gqa=True)],
}


def short(c: TileConfig) -> str:
    """A tile config in a table cell."""
    return (f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages} dv{c.split_dv}" + (" pack" if c.pack_gqa else "")
            + (f" splits={c.kv_splits}" if c.kv_splits else ""))


def vllm_cache(num_blocks: int, hkv: int, d: int, g: torch.Generator) -> torch.Tensor:
    """One layer's cache as vLLM 0.26 allocates it (tests/test_vllm_step.py): logical ``[blocks,
    Hkv, BLOCK, 2D]`` with NHD memory order, random bf16 values."""
    raw = torch.randn(num_blocks, BLOCK, hkv, 2 * d, generator=g, device="cuda").to(torch.bfloat16)
    return raw.permute(0, 2, 1, 3)


def graph_us(calls: list) -> float:
    """Microseconds of one replay (``cases.ms``: median of CUDA-event timings) of a CUDA graph
    captured by :func:`bidiattn.serving.graphs.capture` over two calls: the first runs as its
    warm-up, the second is captured (each may prepare state on its first run, as a step's first
    layer builds the spans and the plan)."""
    graph, _ = capture(lambda: calls.pop(0)())
    return cases.ms(graph.replay) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--label", default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=8192)
    args = parser.parse_args()
    b, ctx = args.batch, args.context
    model = resolve_model("gemma4", sliding_window=1024, use_bidirectional_attention="vision",
                          convention="official", family_name="gemma4")
    kinds = {"sliding": model.kind(1024), "full": model.kind(None)}
    ranges = [(s, s + IMAGE - 1) for s in range(EVERY - IMAGE, ctx - IMAGE, EVERY)]
    per_req = -(-(ctx + 1) // BLOCK)
    g = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randperm(b * per_req, generator=g, device="cuda").to(torch.int32).view(b, per_req)

    def allocate() -> StepBuilder:
        return StepBuilder.allocate(model, tuple(kinds.values()), max_seqs=b, max_tokens=8192,
                                    max_model_len=ctx + 1024, device="cuda")

    builder = allocate()
    cu_q_cpu = torch.arange(b + 1, dtype=torch.int32)
    seq_cpu = torch.full((b,), ctx + 1, dtype=torch.int32)
    step = dict(num_reqs=b, num_tokens=b, query_start_loc=cu_q_cpu.cuda(), seq_lens=seq_cpu.cuda(),
                query_start_loc_cpu=cu_q_cpu, seq_lens_cpu=seq_cpu, ranges={r: ranges for r in range(b)},
                block_table=table, slot_mapping=torch.zeros(b, dtype=torch.int64, device="cuda"))

    def new_step() -> dict:
        # A step's own objects, as vLLM slices them each step: a builder rebuilds for them (it
        # reuses its last build only for another KV-cache group of the same step).
        return dict(step, query_start_loc_cpu=cu_q_cpu[: b + 1], query_start_loc=step["query_start_loc"][: b + 1])

    # A vLLM step builds metadata once per KV-cache group (six for Gemma-4-31B's 5:1 pattern) from
    # the same objects: through the engine's one shared StepBuilder, and through six builders of
    # their own (before dc0401f).
    separate = [allocate() for _ in range(GROUPS)]

    def step_builds(builders):
        new = new_step()
        for one in builders:
            one.build(**new)

    def step_with_hook():
        # What vLLM does with the builder's update_block_table: one build per KV-cache spec (the
        # sliding groups' first, then the full group's, which reuses it), the other sliding
        # groups through the hook.
        new = new_step()
        first = builder.build(**new)
        for _ in range(GROUPS - 2):
            first.for_group(new["block_table"], new["slot_mapping"])
        builder.build(**new)

    build_us = cases.host_us(lambda: step_builds([builder]), rep=200)
    shared_us = cases.host_us(lambda: step_builds([builder] * GROUPS), rep=200)
    hook_us = cases.host_us(step_with_hook, rep=200)
    separate_us = cases.host_us(lambda: step_builds(separate), rep=200)
    rows = []
    for layer, d, hq, hkv in LAYERS:
        kind = kinds[layer]
        cache = vllm_cache(b * per_req, hkv, d, g)
        q = torch.randn(b, hq, d, generator=g, device="cuda").to(torch.bfloat16)
        scale = d**-0.5
        # Reference: each request's keys read back through the table, the step's spans for its row.
        pages = cache.transpose(1, 2)  # [blocks, BLOCK, Hkv, 2D]
        spans = builder.build(**new_step()).spans(kind)
        want = []
        for r in range(b):
            keys = pages[table[r].long()].reshape(-1, hkv, 2 * d)[: ctx + 1].float()
            one = SpanMask(spans.lo[r : r + 1].cpu(), spans.hi[r : r + 1].cpu(), cu_seqlens_k=torch.tensor([0, ctx + 1]),
                           total_keys=ctx + 1)
            want.append(reference.attention(q[r : r + 1].float().cpu(), keys[..., :d].cpu(), keys[..., d:].cpu(), one,
                                            scale=scale))
        want = torch.cat(want)
        key_bytes = b * min(ctx + 1, kind.window or ctx + 1) * hkv * d * 2 * 2
        configs = [("today", None)] + [(short(c), c) for c in VARIANTS[d]]
        for name, cfg in configs:
            real_pick = launch.pick_config

            def pick(head_dim, rows_per_sequence=None, gqa_group=1, cfg=cfg):
                if cfg is not None and rows_per_sequence is not None and rows_per_sequence <= launch.DECODE_ROWS:
                    return cfg
                return real_pick(head_dim, rows_per_sequence, gqa_group)

            row = dict(layer=layer, head_dim=d, heads=[hq, hkv], config=name)
            with mock.patch.object(launch, "pick_config", pick):
                try:
                    out = torch.empty_like(q)
                    meta = builder.build(**new_step())
                    attend(q, cache, meta, kind, scale=scale, softcap=None, out=out)
                    plan = meta.plan(kind, hq, hkv, d, q.dtype)
                    row.update(picked=short(plan.triton.config), kv_splits=plan.triton.kv_splits,
                               rel_err=cases.rel_err(out.cpu(), want))
                    if row["rel_err"] > 0.02:
                        raise ValueError(f"rel err {row['rel_err']:.4f} against the fp32 reference")
                    def layer_call(m):  # the metadata is built outside the graph, as vLLM builds it
                        return lambda: attend(q, cache, m, kind, scale=scale, softcap=None, out=out)

                    row["first_layer_us"] = graph_us([layer_call(builder.build(**new_step())) for _ in range(2)])
                    row["layer_us"] = graph_us([layer_call(meta)] * 2)
                    row["bytes_per_us"] = key_bytes / row["layer_us"]
                except Exception as e:  # a variant that does not compile or match is recorded
                    row["error"] = cases.describe_error(e)
            rows.append(row)
            print(row, flush=True)
    meta = cases.meta()
    meta.update(batch=b, context=ctx, image=IMAGE, every=EVERY, block=BLOCK, build_host_us=build_us,
                step_builds_shared_host_us=shared_us, step_builds_separate_host_us=separate_us,
                step_builds_hook_host_us=hook_us)
    lines = [f"# vLLM decode step without vLLM (Gemma-4-31B layers), {meta}", "",
             f"Builder `build` (host): {build_us:.1f} µs; a step's {GROUPS} builds (one per KV-cache group) through the "
             f"engine's shared builder {shared_us:.1f} µs ({hook_us:.1f} µs with vLLM's `update_block_table` hook: two "
             f"builds, {GROUPS - 2} hook calls), through {GROUPS} builders of their own {separate_us:.1f} µs. "
             "Attention as CUDA-graph replays: the first layer of a kind (spans, plan, kernels) and every other "
             "layer (kernels).", "",
             "| layer | config | picked | splits | rel err | first layer µs | layer µs | K+V GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['config']} | | | | failed: {r['error']} | | |")
            continue
        lines.append(f"| {r['layer']} | {r['config']} | {r['picked']} | {r['kv_splits']} | {r['rel_err']:.4f} | "
                     f"{r['first_layer_us']:.1f} | {r['layer_us']:.1f} | {r['bytes_per_us'] / 1e3:.0f} |")
    stem = cases.write_results(args.out, "vllm-decode" + (f"-{args.label}" if args.label else ""), meta,
                               dict(rows=rows), lines)
    print(f"builder build: {build_us:.1f} us host; a step's {GROUPS} group builds: shared {shared_us:.1f} us, "
          f"with the hook {hook_us:.1f} us, separate {separate_us:.1f} us")
    print("\n".join(lines[-len(rows):]))
    print(f"wrote {args.out}/{stem}.md")


if __name__ == "__main__":
    main()
