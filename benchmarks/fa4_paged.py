"""Paged FA4 benchmark: bidiattn fa4 over a paged K/V cache against the contiguous fa4 path, the
triton paged kernel and FA4's own causal paged kernel, on the same GPU.

    python benchmarks/fa4_paged.py --out benchmarks/results     (FA4: pip install 'bidiattn[fa4]')

Per case (the hd128 / hd256 cases of cases.py, pages of 128 keys in a shuffled pool): a whole
prompt as one extend step over its cached keys, and its last 2K rows as a prefill chunk. Checks
every variant against SDPA with the dense mask first (relative error), then times (median of
CUDA-event runs) with plans built once outside the call (as layers share them). TFLOP/s on
allowed pairs (FA4 causal on causal pairs). Writes fa4-paged-<device>-<date>.json/.md (PERF.md section 4).
"""

from __future__ import annotations

import argparse
import json
import random

import torch

import bidiattn
import cases
from bidiattn.serving.kvcache import PagedKVCache, append, paged_attention
from bidiattn.spans import SpanMask

PAGE = 128


def extend(spans: SpanMask, rows: int) -> SpanMask:
    """The last ``rows`` rows of a one-sequence self-attention mask over all of its keys."""
    t = spans.total_tokens
    cu_q = torch.tensor([0, rows], device="cuda")
    cu_k = torch.tensor([0, t], device="cuda")
    return SpanMask(spans.lo[t - rows:], spans.hi[t - rows:], cu_q, validate=False, cu_seqlens_k=cu_k, total_keys=t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from flash_attn.cute import interface as fa4

    rows = []
    for case in [c for c in cases.CASES if c.head_dim <= 256 and c.tokens <= 16384]:
        full, q_all, k, v = cases.build(case)
        t, d = case.tokens, case.head_dim
        pages = t // PAGE + 1
        order = list(range(pages))
        random.Random(0).shuffle(order)
        table = torch.tensor([order], dtype=torch.int32, device="cuda")
        cache = PagedKVCache.allocate(pages, PAGE, case.hkv, d, device="cuda")
        append(cache, k, v, table, torch.tensor([0, t], device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda"))
        mask_all = full.to_dense()
        for label, n in (("whole prompt", t), ("last 2K rows", 2048)):
            spans = extend(full, n)
            q = q_all[t - n:].contiguous()
            pairs = spans.num_pairs()
            fl = 4 * pairs * d * case.hq
            causal_pairs = sum(t - n + i + 1 for i in range(n))
            want = cases.sdpa_dense(q_all, k, v, mask_all)[t - n:]
            seg = bidiattn.plan(spans, case.hq, case.hkv, d, backend="fa4", paged=True)
            seg_flat = bidiattn.plan(spans, case.hq, case.hkv, d, backend="fa4")
            launch = bidiattn.plan(spans, case.hq, case.hkv, d, window=case.window, backend="triton", paged=True)
            cu_q32 = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            used = torch.tensor([t], dtype=torch.int32, device="cuda")
            variants = {
                "fa4_paged": (lambda: paged_attention(q, cache, table, spans, plan=seg,
                                                      validate=False), fl),
                "fa4_contiguous": (lambda: bidiattn.attention(q, k, v, spans, plan=seg_flat), fl),
                "triton_paged": (lambda: paged_attention(q, cache, table, spans, plan=launch, validate=False), fl),
                "fa4_causal_paged": (lambda: fa4._flash_attn_fwd(
                    q, cache.k_pages, cache.v_pages, cu_seqlens_q=cu_q32, seqused_k=used, max_seqlen_q=n,
                    max_seqlen_k=t, page_table=table, causal=True)[0], 4 * causal_pairs * d * case.hq),
            }
            row = dict(case=case.name, step=label, rows=n, keys=t, pairs=pairs, page_size=PAGE,
                       launches=[dict(kind=c.kind, segments=c.num_segments) for c in seg.segments.calls])
            for name, (fn, flops) in variants.items():
                try:
                    got = fn()
                    if name != "fa4_causal_paged":
                        row[name + "_rel_err"] = cases.rel_err(got, want)
                    ms = cases.ms(fn, rep=200)
                    row[name + "_ms"], row[name + "_tflops"] = ms, flops / ms / 1e9
                except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported
                    row[name + "_error"] = cases.describe_error(e)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = cases.meta()
    lines = [f"# FA4 over a paged cache, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}; pages of {PAGE} keys, shuffled; "
             "plans built outside the call. TFLOP/s on allowed pairs (FA4 causal: causal pairs); ms in brackets.", "",
             "| case | step | bidiattn fa4, paged | bidiattn fa4, contiguous | bidiattn triton, paged | FA4 causal, paged "
             "| rel. err fa4 paged |", "|---|---|---|---|---|---|---|"]

    def cell(r, key):
        if key + "_tflops" not in r:
            return "fails" if key + "_error" in r else "n/a"
        return f"{r[key + '_tflops']:.0f} ({r[key + '_ms']:.2f})"

    for r in rows:
        lines.append(f"| {r['case']} | {r['step']} | " + " | ".join(
            cell(r, k) for k in ("fa4_paged", "fa4_contiguous", "triton_paged", "fa4_causal_paged"))
            + f" | {r.get('fa4_paged_rel_err', float('nan')):.1e} |")
    cases.write_results(args.out, "fa4-paged", meta, dict(rows=rows), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
