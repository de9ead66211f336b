"""The default call and the fa4 backend against FA4's own kernels on the same GPU.

    python benchmarks/fa4.py --out benchmarks/results [--label L] [--cases 'hd128,hd256 16K sliding']

(FA4: pip install 'bidiattn[fa4]'.) For the benchmark cases with head dim <= 256 (and
``cases.FA4_CASES``: a sliding layer at hd128): checks the
default call (``bidiattn.attention(q, k, v, spans)``, which picks fa4 where FA4 takes the call)
and the fa4 backend against SDPA with the dense mask (forward and gradients), then times (median
of CUDA-event runs), forward and forward+backward:

- default, first call: a new SpanMask object every call, so every call plans (a segment plan's
  host sync included where the plan builds one);
- default, steady state: the same spans every call (the plan kept on them); the forward column on
  spans that never trained (a training plan kept on spans also serves their forward calls);
- fa4 planned: ``plan=bidiattn.plan(spans, ..., backend="fa4", training=True)`` built outside the
  timing (the masked launch or the segments, as ``launch.masked_layers`` picks);
- the segment plan (built with ``masked_layers`` patched to "none") with FA4's own pack_gqa
  heuristic on every launch (the plan turns it off for sliding-window launches);
- the segment plan with each backward forced: FA4's over copied segments, and bidiattn's Triton
  backward (the plan picks FA4's only where no key is read by two segments: text-only layouts);
- FA4 causal (speed reference, ignores the images), FA4 with the plain window on sliding cases
  (its own pairs), triton planned, FlexAttention's FLASH backend (``mask_mod``, hd <= 128 with
  gradients), and the same FA4 route called directly (``kernels/fa4_masked.py``: one FA4 launch
  with the spans' CuTe mask function and block sparsity, hd <= 256; checked first, its columns
  left out with the reason where it fails or is wrong);

and the host time of ``bidiattn.plan`` (fa4 with its sync, triton) and of a first call.
TFLOP/s on allowed pairs (causal / window pairs for FA4's own kernels): forward 4 * pairs * D * Hq,
backward 10 *. Writes fa4[-<label>]-<device>-<date>.json/.md (PERF.md section 4).
"""

from __future__ import annotations

import dataclasses
import json
from unittest import mock

import torch

import bidiattn
import cases
from bidiattn import launch
from bidiattn.kernels.fa4_masked import MAX_HEAD_DIM as MASKED_MAX_HEAD_DIM
from bidiattn.kernels.fa4_masked import mask_tables, span_attention_fa4_masked
from bidiattn.kernels.flex import span_attention_flex


def main() -> None:
    args, picked = cases.fa4_cli("fa4")
    from flash_attn.cute import flash_attn_func

    rows = []
    for case in picked:
        spans, q, k, v = cases.build(case)
        t, d, hq, hkv = case.tokens, case.head_dim, case.hq, case.hkv
        pairs = spans.num_pairs()
        fwd_fl = cases.flops(case, pairs)
        fb_fl = fwd_fl + 10 * pairs * d * hq
        causal_pairs = t * (t + 1) // 2
        causal_fwd_fl = 4 * causal_pairs * d * hq
        causal_fb_fl = causal_fwd_fl + 10 * causal_pairs * d * hq
        p_fa4 = bidiattn.plan(spans, hq, hkv, d, backend="fa4", training=True)
        p_triton = bidiattn.plan(spans, hq, hkv, d, window=case.window, backend="triton", training=True)
        with mock.patch.object(launch, "masked_layers", lambda *args: "none"):
            p_seg = bidiattn.plan(spans, hq, hkv, d, backend="fa4", training=True)  # the segments, always
        heuristic = dataclasses.replace(p_seg, segments=dataclasses.replace(
            p_seg.segments, calls=tuple(dataclasses.replace(c, pack_gqa=None) for c in p_seg.segments.calls)))
        forced = {flag: dataclasses.replace(p_seg, segments=dataclasses.replace(p_seg.segments, fa4_backward=flag))
                  for flag in (True, False)}
        default_backend = bidiattn.plan(spans, hq, hkv, d).backend
        row = dict(case=case.name, tokens=t, hq=hq, hkv=hkv, head_dim=d, pairs=pairs, default_backend=default_backend,
                   plan_fa4_masked=p_fa4.masked is not None, plan_fa4_backward=p_seg.segments.fa4_backward,
                   keys_copied_per_key=sum(int(c.k_len.sum()) for c in p_seg.segments.calls) / spans.total_keys,
                   launches=[dict(kind=c.kind, window=[c.window_left, c.window_right], segments=c.num_segments,
                                  rows=int(c.q_len.sum()), max_rows=c.max_q_len, pack_gqa=c.pack_gqa,
                                  grad_chunks=len(c.grad_chunks)) for c in p_seg.segments.calls])
        dout = torch.randn_like(q)
        ref, want = cases.sdpa_reference(q, k, v, spans.to_dense(), dout)

        def fwd_bwd(fn):
            x = [t_.detach().requires_grad_() for t_ in (q, k, v)]
            return torch.autograd.grad(fn(*x), x, dout)

        def default(a, b, c):
            return bidiattn.attention(a, b, c, spans)

        inference = cases.fresh(spans)  # never trains: the plan kept on it is a forward plan

        def default_inference(a, b, c):
            return bidiattn.attention(a, b, c, inference)

        def default_first(a, b, c):
            return bidiattn.attention(a, b, c, cases.fresh(spans))

        def fa4_planned(a, b, c):
            return bidiattn.attention(a, b, c, spans, plan=p_fa4)

        def fa4_heuristic(a, b, c):
            return bidiattn.attention(a, b, c, spans, plan=heuristic)

        def fa4_fa4_bwd(a, b, c):
            return bidiattn.attention(a, b, c, spans, plan=forced[True])

        def fa4_triton_bwd(a, b, c):
            return bidiattn.attention(a, b, c, spans, plan=forced[False])

        def fa4_causal(a, b, c):
            return flash_attn_func(a.unsqueeze(0), b.unsqueeze(0), c.unsqueeze(0), causal=True)[0].squeeze(0)

        def fa4_local(a, b, c):
            w = case.window
            return flash_attn_func(a.unsqueeze(0), b.unsqueeze(0), c.unsqueeze(0), window_size=(w - 1, 0))[0].squeeze(0)

        def triton(a, b, c):
            return bidiattn.attention(a, b, c, spans, plan=p_triton)

        def mask_mod_flash(a, b, c):
            return span_attention_flex(a, b, c, spans, d ** -0.5, None, flash=True)[0]

        masked_tables = mask_tables(spans, d) if d <= MASKED_MAX_HEAD_DIM else None

        def fa4_masked(a, b, c):
            return span_attention_fa4_masked(a, b, c, spans, d ** -0.5, None, tables=masked_tables)[0]

        row["default_rel_err"] = max(cases.rel_err(default(q, k, v), ref), cases.rel_err(default_inference(q, k, v), ref))
        row["default_grad_rel_err"] = max(cases.rel_err(a, b) for a, b in zip(fwd_bwd(default), want))
        row["fa4_rel_err"] = cases.rel_err(fa4_planned(q, k, v), ref)
        row["fa4_grad_rel_err"] = max(cases.rel_err(a, b) for a, b in zip(fwd_bwd(fa4_planned), want))
        row["fa4_fa4_bwd_grad_rel_err"] = max(cases.rel_err(a, b) for a, b in zip(fwd_bwd(fa4_fa4_bwd), want))
        if max(val for key, val in row.items() if key.endswith("rel_err")) > 2e-2:
            raise RuntimeError(f"{case.name}: bidiattn fa4 is wrong: {row}")
        masked_ok = False
        if masked_tables is not None:  # checked apart: a wrong or failing experimental path is reported
            try:
                row["fa4_masked_err"] = cases.rel_err(fa4_masked(q, k, v), ref)
                row["fa4_masked_grad_err"] = max(cases.rel_err(a, b) for a, b in zip(fwd_bwd(fa4_masked), want))
                masked_ok = max(row["fa4_masked_err"], row["fa4_masked_grad_err"]) <= 2e-2
            except Exception as e:  # noqa: BLE001
                row["fa4_masked_error"] = cases.describe_error(e)
            print(case.name, "fa4 mask_mod direct: errors", row.get("fa4_masked_err"), row.get("fa4_masked_grad_err"),
                  row.get("fa4_masked_error", ""), flush=True)

        timed = dict(
            default_first_fwd=(lambda: default_first(q, k, v), fwd_fl),
            default_fwd=(lambda: default_inference(q, k, v), fwd_fl),
            fa4_planned_fwd=(lambda: fa4_planned(q, k, v), fwd_fl),
            fa4_heuristic_pack_fwd=(lambda: fa4_heuristic(q, k, v), fwd_fl),
            fa4_causal_fwd=(lambda: fa4_causal(q, k, v), causal_fwd_fl),
            triton_fwd=(lambda: triton(q, k, v), fwd_fl),
            mask_mod_fwd=(lambda: mask_mod_flash(q, k, v), fwd_fl),
            default_first_fwd_bwd=(lambda: fwd_bwd(default_first), fb_fl),
            default_fwd_bwd=(lambda: fwd_bwd(default), fb_fl),
            fa4_planned_fwd_bwd=(lambda: fwd_bwd(fa4_planned), fb_fl),
            fa4_fa4_bwd_fwd_bwd=(lambda: fwd_bwd(fa4_fa4_bwd), fb_fl),
            fa4_triton_bwd_fwd_bwd=(lambda: fwd_bwd(fa4_triton_bwd), fb_fl),
            fa4_causal_fwd_bwd=(lambda: fwd_bwd(fa4_causal), causal_fb_fl),
            triton_fwd_bwd=(lambda: fwd_bwd(triton), fb_fl),
        )
        if d <= 128:  # FA4's forward and backward key tiles differ at hd256 under one BlockMask
            timed["mask_mod_fwd_bwd"] = (lambda: fwd_bwd(mask_mod_flash), fb_fl)
        if masked_ok:
            timed["fa4_masked_fwd"] = (lambda: fa4_masked(q, k, v), fwd_fl)
            timed["fa4_masked_fwd_bwd"] = (lambda: fwd_bwd(fa4_masked), fb_fl)
        if case.window:
            w = case.window
            local_pairs = sum(min(i + 1, w) for i in range(t))
            local_fl = 4 * local_pairs * d * hq
            timed["fa4_local_fwd"] = (lambda: fa4_local(q, k, v), local_fl)
            timed["fa4_local_fwd_bwd"] = (lambda: fwd_bwd(fa4_local), local_fl + 10 * local_pairs * d * hq)
        for key, (fn, fl) in timed.items():
            try:
                row[key + "_ms"] = cases.ms(fn, rep=100 if "bwd" in key or "first" in key else 300)
                row[key + "_tflops"] = fl / row[key + "_ms"] / 1e9
            except Exception as e:  # noqa: BLE001 - a column that cannot run is reported, not fatal
                row[key + "_error"] = cases.describe_error(e)
            print(case.name, key, row.get(key + "_tflops", row.get(key + "_error")), flush=True)
        row["plan_fa4_host_us"] = cases.host_us(lambda: bidiattn.plan(cases.fresh(spans), hq, hkv, d, backend="fa4"))
        row["plan_fa4_training_host_us"] = cases.host_us(
            lambda: bidiattn.plan(cases.fresh(spans), hq, hkv, d, backend="fa4", training=True))
        row["plan_triton_host_us"] = cases.host_us(lambda: bidiattn.plan(cases.fresh(spans), hq, hkv, d, backend="triton"))
        row["plan_triton_training_host_us"] = cases.host_us(
            lambda: bidiattn.plan(cases.fresh(spans), hq, hkv, d, backend="triton", training=True))
        row["default_first_call_host_us"] = cases.host_us(lambda: default_first(q, k, v))
        row["default_call_host_us"] = cases.host_us(lambda: default(q, k, v))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ref, want
        torch.cuda.empty_cache()
    meta = cases.meta()

    def tf(r, key):
        return f"{r[key + '_tflops']:.0f}" if key + "_tflops" in r else "n/a" if key + "_error" not in r else "fails"

    def masked(r):
        if "fa4_masked_error" in r:
            return "fails"
        if "fa4_masked_err" in r and "fa4_masked_fwd_tflops" not in r:
            return f"wrong (rel err {r['fa4_masked_err']:.3g} / {r['fa4_masked_grad_err']:.3g})"
        return f"{tf(r, 'fa4_masked_fwd')} / {tf(r, 'fa4_masked_fwd_bwd')}"

    def ratio(r, a, b):
        return f"{r[a + '_tflops'] / r[b + '_tflops']:.2f}x" if a + "_tflops" in r and b + "_tflops" in r else "n/a"

    lines = [f"# The default call and fa4 against FA4, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, FA4 {meta['fa4']}, commit {meta['commit']}. TFLOP/s on "
             "allowed pairs (FA4 causal: causal pairs, ignores the images; FA4 window: its own pairs); fwd+bwd counts "
             "14 * pairs * D * Hq. *default first*: a new SpanMask object per call (plans every call); *default*: "
             "the same spans (plan kept on them; forward: spans that never trained); *fa4 planned*: an explicit fa4 plan; *FA4 pack*: FA4's own "
             "pack_gqa on every launch; *fa4 + FA4 bwd* / *fa4 + triton bwd*: fa4 forward with each backward forced "
             "(the plan's own choice is in *fa4 planned*; keys copied per key by FA4's backward in the JSON). "
             "Launches, pack_gqa and backward chunks per case in the JSON.", "",
             "| case | default runs | fwd: default first | default | fa4 planned | FA4 pack | FA4 causal | FA4 window "
             "| triton | default / FA4 causal | default / FA4 window | fwd+bwd: default first | default | fa4 planned "
             "| fa4 + FA4 bwd | fa4 + triton bwd | FA4 causal | FA4 window | triton | default / FA4 causal | default / FA4 window "
             "| mask_mod fwd / fwd+bwd | fa4 mask_mod direct fwd / fwd+bwd "
             "| host µs: plan fa4 | plan triton (+bwd) | first call | steady call |",
             "|---" * 27 + "|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['default_backend']} | {tf(r, 'default_first_fwd')} | {tf(r, 'default_fwd')} | "
            f"{tf(r, 'fa4_planned_fwd')} | {tf(r, 'fa4_heuristic_pack_fwd')} | {tf(r, 'fa4_causal_fwd')} | "
            f"{tf(r, 'fa4_local_fwd')} | {tf(r, 'triton_fwd')} | {ratio(r, 'default_fwd', 'fa4_causal_fwd')} | "
            f"{ratio(r, 'default_fwd', 'fa4_local_fwd')} | {tf(r, 'default_first_fwd_bwd')} | "
            f"{tf(r, 'default_fwd_bwd')} | {tf(r, 'fa4_planned_fwd_bwd')} | {tf(r, 'fa4_fa4_bwd_fwd_bwd')} | "
            f"{tf(r, 'fa4_triton_bwd_fwd_bwd')} | "
            f"{tf(r, 'fa4_causal_fwd_bwd')} | {tf(r, 'fa4_local_fwd_bwd')} | {tf(r, 'triton_fwd_bwd')} | "
            f"{ratio(r, 'default_fwd_bwd', 'fa4_causal_fwd_bwd')} | {ratio(r, 'default_fwd_bwd', 'fa4_local_fwd_bwd')} | "
            f"{tf(r, 'mask_mod_fwd')} / {tf(r, 'mask_mod_fwd_bwd')} | {masked(r)} | "
            f"{r['plan_fa4_host_us']:.0f} | "
            f"{r['plan_triton_host_us']:.0f} ({r['plan_triton_training_host_us']:.0f}) | "
            f"{r['default_first_call_host_us']:.0f} | {r['default_call_host_us']:.0f} |")
    cases.write_results(args.out, "fa4" + (f"-{args.label}" if args.label else ""), meta, dict(rows=rows), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
