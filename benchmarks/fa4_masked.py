"""The masked FA4 launch (kernels/fa4_masked.py): where the default call's time goes, what its
tables cost on the host, and which FA4 options it should run with.

    python benchmarks/fa4_masked.py --out benchmarks/results [--cases 'hd128,hd256 16K sliding']

(FA4: pip install 'bidiattn[fa4]'.) For the fa4 benchmark cases with head dim <= 256
(``cases.CASES`` and ``cases.FA4_CASES``):

- **fwd+bwd, interleaved**: the default call ``attention(q, k, v, spans)``, the call with an
  explicit training plan, and the masked launch called directly with the plan's tables and with
  tables of its own, timed in three interleaved rounds (median of CUDA-event runs each), so that
  clock drift over a run cannot pass for a gap between them; checked against SDPA with the dense
  mask first (forward and gradients);
- **host µs per fwd+bwd** of each (enqueue ten, no sync in between) and the wall time;
- **tables**: host µs of ``mask_tables`` (one Triton launch) against its PyTorch spec
  (``block_tables_spec``), the two checked equal; host µs of an fa4 plan with and without
  ``training`` (a new SpanMask object each time, so each one plans);
- **forward options**: the masked forward with FA4's pack_gqa default (packed where GQA) and off,
  and with the other key block (64 where the plan's tables take more, FA4's sparse default of 80
  at hd256 where they take 64), each checked against the default call first.

TFLOP/s on allowed pairs: forward 4 * pairs * D * Hq, forward+backward 14 *. Writes
fa4-masked[-<label>]-<device>-<date>.json/.md.
"""

from __future__ import annotations

import statistics
import time

import cases
import torch

import bidiattn
from bidiattn.kernels import fa4_masked
from bidiattn.kernels.block_tables import block_tables


def run_case(case: cases.Case) -> dict:
    spans, q, k, v = cases.build(case)
    d = case.head_dim
    pairs = spans.num_pairs()
    fwd_fl = cases.flops(case, pairs)
    fb_fl = fwd_fl + 10 * pairs * d * case.hq
    dout = torch.randn_like(q)
    plan = bidiattn.plan(spans, case.hq, case.hkv, d, training=True)
    own = fa4_masked.mask_tables(spans, d, capability=torch.cuda.get_device_capability())
    tables = plan.masked if plan.masked is not None else own
    row = dict(case=case.name, tokens=case.tokens, hq=case.hq, hkv=case.hkv, head_dim=d, pairs=pairs,
               plan_runs_masked=plan.masked is not None)

    def grads(fn):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(fn(*x), x, dout)

    fns = {
        "default": lambda a, b, c: bidiattn.attention(a, b, c, spans),
        "planned": lambda a, b, c: bidiattn.attention(a, b, c, spans, plan=plan),
        "direct_plan_tables": lambda a, b, c: fa4_masked.span_attention_fa4_masked(a, b, c, spans, d ** -0.5, None,
                                                                                 tables=tables)[0],
        "direct_own_tables": lambda a, b, c: fa4_masked.span_attention_fa4_masked(a, b, c, spans, d ** -0.5, None,
                                                                                tables=own)[0],
    }
    ref, want = cases.sdpa_reference(q, k, v, spans.to_dense(), dout)
    for name, fn in fns.items():
        row[f"{name}_rel_err"] = cases.rel_err(fn(q, k, v), ref)
        row[f"{name}_grad_rel_err"] = max(cases.rel_err(a, b) for a, b in zip(grads(fn), want))
    del ref, want
    if max(val for key, val in row.items() if key.endswith("rel_err")) > 2e-2:
        raise RuntimeError(f"{case.name}: wrong result: {row}")
    rounds = {name: [] for name in fns}
    for _ in range(3):
        for name, fn in fns.items():
            rounds[name].append(cases.ms(lambda fn=fn: grads(fn), rep=100))
    for name, ms in rounds.items():
        row[f"{name}_fwd_bwd_rounds_ms"] = ms
        row[f"{name}_fwd_bwd_tflops"] = fb_fl / statistics.median(ms) / 1e9
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            grads(fns[name])
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        row[f"{name}_host_ms"] = (t1 - t0) / 10 * 1e3
        row[f"{name}_wall_ms"] = (time.perf_counter() - t0) / 10 * 1e3

    blocks = fa4_masked.mask_blocks(d, torch.cuda.get_device_capability(), spans.window)
    spec = fa4_masked.block_tables_spec(spans, *blocks)
    try:
        kernel = block_tables(spans, *blocks)
        row["tables_equal"] = all(torch.equal(a, b) for a, b in zip(spec, kernel))
        row["tables_kernel_host_us"] = cases.host_us(lambda: block_tables(spans, *blocks))
    except Exception as e:  # noqa: BLE001 - the kernel's first GPU runs: a failure is reported, not fatal
        row["tables_kernel_error"] = cases.describe_error(e)
    row["tables_spec_host_us"] = cases.host_us(lambda: fa4_masked.block_tables_spec(spans, *blocks))
    for key, training in (("plan_fa4_training_host_us", True), ("plan_fa4_host_us", False)):
        row[key] = cases.host_us(lambda training=training: bidiattn.plan(
            cases.fresh(spans), case.hq, case.hkv, d, backend="fa4", training=training))

    fa4 = fa4_masked.fa4_interface()
    # The forward's options: FA4's pack_gqa default and off at the plan's key blocks, and the other
    # key block (FA4 takes its key tile from the sparse block size): 64 (fewer masked elements per
    # partial block, FA4's window-kernel tile at hd256) or, where the plan takes 64, FA4's default.
    other = (blocks[0][0], 64 if blocks[0][1] != 64 else 80)
    row["other_key_block"] = list(other)
    variants = [("masked_fwd_pack_gqa_default", None, blocks[0]), ("masked_fwd_pack_gqa_off", False, blocks[0]),
                ("masked_fwd_other_block", None, other)]
    for key, flag, block in variants:
        t = fa4_masked.block_tables_spec(spans, block, None)
        sparse = fa4_masked._sparse(*t[2:6], block)

        def fwd(flag=flag, sparse=sparse, t=t):
            return fa4._flash_attn_fwd(q[None], k[None], v[None], softmax_scale=d ** -0.5,
                                       mask_mod=fa4_masked.span_mask_mod(), block_sparse_tensors=sparse,
                                       aux_tensors=[t[0], t[1]], return_lse=True, pack_gqa=flag)
        try:
            out = fwd()[0][0]
            row[key + "_rel_err"] = err = cases.rel_err(out, bidiattn.attention(q, k, v, spans))
            if err > 2e-2:
                raise RuntimeError(f"wrong result: relative error {err:.3g} against the default call")
            row[key + "_tflops"] = fwd_fl / cases.ms(fwd, rep=300) / 1e9
        except Exception as e:  # noqa: BLE001 - an option FA4 refuses is reported, not fatal
            row[key + "_error"] = cases.describe_error(e)
    torch.cuda.empty_cache()
    return row


def main() -> None:
    args, picked = cases.fa4_cli("fa4-masked")
    rows = []
    for case in picked:
        rows.append(run_case(case))
        print(rows[-1], flush=True)
    meta = cases.meta()

    def f(r, key, fmt=".0f"):
        return format(r[key], fmt) if key in r else "fails" if key.replace("_tflops", "_error") in r else "n/a"

    names = ("default", "planned", "direct_plan_tables", "direct_own_tables")
    lines = [f"# The masked FA4 launch, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, FA4 {meta['fa4']}, commit {meta['commit']}. "
             "fwd+bwd TFLOP/s (14 * pairs * D * Hq, median of three interleaved rounds; rounds in the JSON) of "
             "the default call, an explicit training plan, the masked launch called directly with the plan's "
             "tables and with its own; host ms per fwd+bwd (ten enqueued, no sync); tables and plans in host "
             "µs; the masked forward's TFLOP/s with FA4's pack_gqa default and off.", "",
             "| case | plan runs masked | " + " | ".join(names) + " | host ms: " + " | ".join(names)
             + " | tables: kernel µs | spec µs | equal | plan fa4 (training) µs "
             "| masked fwd pack_gqa default | off | other key block |",
             "|---" * 18 + "|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['plan_runs_masked']} | "
                     + " | ".join(f(r, f"{n}_fwd_bwd_tflops") for n in names) + " | "
                     + " | ".join(f(r, f"{n}_host_ms", ".2f") for n in names)
                     + f" | {f(r, 'tables_kernel_host_us')} | {r['tables_spec_host_us']:.0f} | {r.get('tables_equal', 'fails')} | "
                     f"{r['plan_fa4_host_us']:.0f} ({r['plan_fa4_training_host_us']:.0f}) | "
                     f"{f(r, 'masked_fwd_pack_gqa_default_tflops')} | {f(r, 'masked_fwd_pack_gqa_off_tflops')} | "
                     f"{f(r, 'masked_fwd_other_block_tflops')} ({r['other_key_block'][1]} keys) |")
    cases.write_results(args.out, "fa4-masked" + (f"-{args.label}" if args.label else ""), meta, dict(rows=rows),
                        lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
