"""A model-like step through the default call, with every fa4 plan the masked FA4 launch (no
segments, no host sync) against every plan the segment launches.

    python benchmarks/model_step.py --out benchmarks/results [--tokens 16384] [--head-dim 256]

(FA4: pip install 'bidiattn[fa4]'.) Decides where the masked launch should run at a head dim
where the segments run faster once planned (hd256 on SM90: full layers, and training) but cost a
host read-back and ~0.6-1.0 ms of host time per plan, paid once per step and layer kind when the
spans are new (NOTES.md, "hd256 plans take the masked launch too"). The results name what
``launch.masked_layers`` picks today.

A step: new spans for the sliding and the full layer kind (``rules.build`` from block ids on the
GPU, as the transformers integration builds them each forward), then 12 layers (5 sliding + 1
full, twice: Gemma-3's pattern), each a bf16 matmul pair standing in for the layer's other work (so
the GPU has queued work when a plan reads back) and the default call ``bidiattn.attention(q, k, v,
spans)`` (8 query / 4 K/V heads; 256-token images every 1024; window 1024). Inference: no
gradients; training: forward and backward of the attention. Wall clock per step, synchronized at
its ends, with new spans every step and with spans kept from step to step (plans cached); median
(and minimum) of rounds that each run both variants in both spans modes (every round kept in the
JSON). Checks first: each variant's outputs and gradients
(and a call without gradients) against a triton plan on one layer of each kind.
Last, one inference step of the masked variant with new and with kept spans under the torch
profiler (kernel times, GPU busy time against wall time).
Writes model-step[-<label>]-<device>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

import bidiattn
import cases
from bidiattn import launch, rules

PATTERN = ("sliding",) * 5 + ("full",)


VARIANTS = {"masked": lambda *args: "all", "segments": lambda *args: "none"}  # launch.masked_layers' answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--label", default=None)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    t, hq, hkv, d = args.tokens, 8, 4, args.head_dim
    ids = torch.zeros(t, dtype=torch.int64, device="cuda")
    for n, s in enumerate(range(1024 - 256, t, 1024), 1):
        ids[s : s + 256] = n
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    dout = torch.randn_like(q)
    x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    layers = PATTERN * 2

    def build():
        return {kind: rules.build("gemma3", "official", kind, block_ids=ids, window=1024 if kind == "sliding" else None)
                for kind in ("sliding", "full")}

    def step(spans, training):
        outs, leaves = [], []
        for kind in layers:
            torch.mm(x, w)
            torch.mm(x, w)
            if training:
                a = [t_.detach().requires_grad_() for t_ in (q, k, v)]
                leaves.append(a)
                outs.append(bidiattn.attention(*a, spans[kind]))
            else:
                with torch.no_grad():
                    outs.append(bidiattn.attention(q, k, v, spans[kind]))
        if training:
            torch.autograd.backward(outs, [dout] * len(outs))

    checks = []
    spans = build()
    for kind in ("sliding", "full"):
        a = [t_.detach().requires_grad_() for t_ in (q, k, v)]
        ref = bidiattn.attention(*a, spans[kind], plan=bidiattn.plan(spans[kind], hq, hkv, d, backend="triton",
                                                                       training=True))
        ref_grads = torch.autograd.grad(ref, a, dout)
        for name, fn in VARIANTS.items():
            with mock.patch.object(launch, "masked_layers", fn):
                b = [t_.detach().requires_grad_() for t_ in (q, k, v)]
                fresh = cases.fresh(spans[kind])
                out = bidiattn.attention(*b, fresh)
                grads = torch.autograd.grad(out, b, dout)
                used = next(iter(fresh._plans.values()))
                with torch.no_grad():
                    fresh_nograd = cases.fresh(spans[kind])
                    out_nograd = bidiattn.attention(q, k, v, fresh_nograd)
                errs = [cases.rel_err(out, ref)] + [cases.rel_err(g_, r_) for g_, r_ in zip(grads, ref_grads)]
                errs.append(cases.rel_err(out_nograd, ref))
                checks.append(dict(kind=kind, variant=name, backend=used.backend, masked=used.masked is not None,
                                   segments=used.segments is not None, rel_err=errs))
                print(f"check {kind} {name}: {checks[-1]}", flush=True)
                if max(errs) > 0.02:
                    raise SystemExit(f"{name} on {kind} layers differs from the triton plan: {errs}")
    rows = []
    for training in (False, True):
        kept = {name: build() for name in VARIANTS}
        times = {(name, new_spans): [] for new_spans in (True, False) for name in VARIANTS}
        for r in range(args.rounds + 2):  # every variant and spans mode in each round, so drift hits all alike
            for new_spans in (True, False):
                for name, fn in VARIANTS.items():
                    with mock.patch.object(launch, "masked_layers", fn):
                        s = build() if new_spans else kept[name]
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        step(s, training)
                        torch.cuda.synchronize()
                        if r >= 2:
                            times[name, new_spans].append((time.perf_counter() - t0) * 1e3)
        for new_spans in (True, False):
            ts_of = {name: times[name, new_spans] for name in VARIANTS}
            row = dict(mode="training" if training else "inference", spans="new every step" if new_spans else "kept",
                       **{f"{name}_ms": statistics.median(ts) for name, ts in ts_of.items()},
                       **{f"{name}_min_ms": min(ts) for name, ts in ts_of.items()},
                       **{f"{name}_rounds_ms": ts for name, ts in ts_of.items()})
            row["masked_over_segments"] = row["masked_ms"] / row["segments_ms"]
            rows.append(row)
            print({k: v for k, v in row.items() if not k.endswith("rounds_ms")}, flush=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        for _ in layers:
            torch.mm(x, w)
            torch.mm(x, w)
    torch.cuda.synchronize()
    filler_ms = (time.perf_counter() - t0) / 10 * 1e3
    try:
        profiles = profile_inference(step, build)
    except Exception as e:  # noqa: BLE001 - the timed rounds above are written whatever the profiler does
        print(f"profile failed: {cases.describe_error(e)}", flush=True)
        profiles = []
    meta = cases.meta()
    today = launch.masked_layers(torch.cuda.get_device_capability())
    meta.update(tokens=t, heads=[hq, hkv], head_dim=d, layers=len(layers), filler_ms_per_step=filler_ms,
                masked_layers_today=today)
    lines = [f"# Model step, default call: the masked launch against the segments, {meta}", "",
             f"{len(layers)} layers (5 sliding + 1 full, twice), each with {filler_ms / len(layers):.2f} ms of matmuls "
             "before its attention; ms per step, median of interleaved rounds.", "",
             f"`launch.masked_layers` today on this device, inference and training: {today} (\"all\": the masked "
             "launch).", "",
             "| mode | spans | masked ms (min) | segments ms (min) | masked / segments |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['spans']} | {r['masked_ms']:.2f} ({r['masked_min_ms']:.2f}) | {r['segments_ms']:.2f} "
              f"({r['segments_min_ms']:.2f}) | {r['masked_over_segments']:.3f} |" for r in rows]
    lines += ["", "Checks (rel. error of out, dq, dk, dv, and out of a call without gradients, against a triton plan):", ""]
    lines += [f"- {c['kind']} / {c['variant']}: backend {c['backend']}, masked {c['masked']}, segments "
              f"{c['segments']}: " + ", ".join(f"{e:.4f}" for e in c["rel_err"]) for c in checks]
    for p in profiles:
        lines += ["", f"Inference, masked, spans {p['spans']}: one step's kernels (torch profiler), GPU busy "
                  f"{p['busy_ms']:.2f} ms of {p['wall_ms']:.2f} ms wall; the largest:", ""]
        lines += [f"- {name}: {ms:.3f} ms ({calls} calls)" for name, (calls, ms) in p["kernels"].items()]
    stem = cases.write_results(args.out, "model-step" + (f"-{args.label}" if args.label else ""), meta,
                               dict(rows=rows, checks=checks, profiles=profiles), lines)
    print(f"wrote {args.out}/{stem}.md")


def profile_inference(step, build) -> list[dict]:
    """One inference step of the masked variant with new spans and with kept spans under the
    torch profiler: GPU time and calls per kernel name (the eight largest), GPU busy time
    (the union of kernel intervals) and wall time, to tell what differs between the two (A26:
    the new-spans step ran faster than the kept-spans one with the same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    kept = build()
    with mock.patch.object(launch, "masked_layers", VARIANTS["masked"]):
        step(kept, False)  # plans kept on these spans
        for name, spans_of in (("new every step", build), ("kept", lambda: kept)):
            spans = spans_of()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                step(spans, False)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e3
            totals, intervals = {}, []
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    calls, ms = totals.get(e.name, (0, 0.0))
                    totals[e.name] = (calls + 1, ms + e.device_time_total / 1e3)
                    intervals.append((e.time_range.start, e.time_range.end))
            busy, end = 0.0, float("-inf")
            for a, b in sorted(intervals):  # µs; overlapping kernels counted once
                if b > end:
                    busy += b - max(a, end)
                    end = b
            top = dict(sorted(totals.items(), key=lambda kv: -kv[1][1])[:8])
            out.append(dict(spans=name, wall_ms=wall, busy_ms=busy / 1e3, kernels={k[:100]: v for k, v in top.items()}))
            print(f"profile, inference masked, spans {name}: busy {busy / 1e3:.2f} ms of {wall:.2f} ms", flush=True)
    return out


if __name__ == "__main__":
    main()
