"""Where the default call's first-call host time goes (issue 24: at most 100 µs over a planned call).

    python benchmarks/first_call.py --out $OUT [--cases 'hd256 16K img,hd128 16K img'] [--label L]

Per case, host microseconds (``cases.host_us``: median, call started on an idle GPU) of: a new
``SpanMask`` over the same bounds; ``bidiattn.plan`` with the default backend; the call with that
plan; a new ``SpanMask`` and the default call on it (plans inside: the first call of a layer); the
default call alone on a ``SpanMask`` built before the timer (its excess over the call with a plan is
what issue 24 bounds); the default call on spans that keep their plan (steady). The first call's
excess over new spans + plan + steady is what none of them explains. To find it: the first call's
parts timed in sequence within one call (new spans, plan, the call with that new plan), and for
fa4's masked launch the tables launch alone and FA4's interface alone on kept and on new tables.
Then cProfiles of 30 first and 30 steady calls (cumulative time), written into the .md. Cases:
``cases.fa4_cli``'s. Checked first: the first and steady calls give the same output, within
``cases.rel_err`` of SDPA with the dense mask (up to 16K tokens).
Writes first-call[-<label>]-<device>-<date>.{md,json}.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time

import cases
import torch

import bidiattn

PARTS = ("new spans", "plan", "call with plan", "first call", "first call alone", "steady call")
IN_SEQUENCE = ("new spans", "plan", "call with new plan")
FA4_PARTS = ("tables launch", "FA4, kept tables", "FA4, new tables")
PROFILED_CALLS = 30
REP = 20


def in_sequence(q, k, v, spans) -> dict[str, float]:
    """Median host µs of a first call's parts timed one after another within each call (started
    on an idle GPU), as the default call runs them: new spans, their plan, the call with it."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    laps = []
    for _ in range(REP + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fresh = cases.fresh(spans)
        t1 = time.perf_counter()
        plan = bidiattn.plan(fresh, hq, hkv, d)
        t2 = time.perf_counter()
        bidiattn.attention(q, k, v, fresh, plan=plan)
        t3 = time.perf_counter()
        laps.append((t1 - t0, t2 - t1, t3 - t2))
    return {name: statistics.median(lap[i] for lap in laps[3:]) * 1e6 for i, name in enumerate(IN_SEQUENCE)}


def fa4_parts(q, k, v, spans, plan) -> dict[str, float]:
    """For a masked-launch fa4 plan: host µs of its tables launch alone, and of FA4's interface
    alone (``fa4_masked.masked_forward``) on the plan's tables and on tables new each call."""
    from bidiattn.kernels import fa4_masked

    d, scale = q.shape[2], q.shape[2] ** -0.5
    window, capability = plan.window, fa4_masked.device_capability(q.device)
    new = iter([fa4_masked.mask_tables(spans, d, backward=False, capability=capability, window=window)
                for _ in range(REP + 3)])
    return dict(zip(FA4_PARTS, (
        cases.host_us(lambda: fa4_masked.mask_tables(spans, d, backward=False, capability=capability, window=window)),
        cases.host_us(lambda: fa4_masked.masked_forward(q, k, v, plan.masked, scale, None)),
        cases.host_us(lambda: fa4_masked.masked_forward(q, k, v, next(new), scale, None)),
    )))


def profile_calls(call, calls: int) -> list[str]:
    """The top functions by cumulative time over ``calls`` calls, as pstats prints them."""
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def main() -> int:
    args, picked = cases.fa4_cli("first-call")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if not picked:
        raise SystemExit(f"no case matches --cases {args.cases!r}")
    rows, profiles = [], {}
    for case in picked:
        spans, q, k, v = cases.build(case)
        hq, hkv, d = case.hq, case.hkv, case.head_dim
        first = bidiattn.attention(q, k, v, cases.fresh(spans))
        steady = bidiattn.attention(q, k, v, spans)
        if not torch.equal(first, steady):
            raise SystemExit(f"{case.name}: the first and the steady call differ")
        err = cases.rel_err(steady, cases.sdpa_dense(q, k, v, spans.to_dense())) if case.tokens <= 16384 else None
        plan = bidiattn.plan(spans, hq, hkv, d)
        host = dict(zip(PARTS, (
            cases.host_us(lambda: cases.fresh(spans)),
            cases.host_us(lambda: bidiattn.plan(spans, hq, hkv, d)),  # plan() keeps nothing
            cases.host_us(lambda: bidiattn.attention(q, k, v, spans, plan=plan)),
            cases.host_us(lambda: bidiattn.attention(q, k, v, cases.fresh(spans))),
            cases.host_us(lambda fresh=iter([cases.fresh(spans) for _ in range(cases.HOST_REP + 3)]):
                          bidiattn.attention(q, k, v, next(fresh))),
            cases.host_us(lambda: bidiattn.attention(q, k, v, spans)),
        )))
        unexplained = host["first call"] - host["new spans"] - host["plan"] - host["steady call"]
        excess = host["first call alone"] - host["call with plan"]
        sequence = in_sequence(q, k, v, spans)
        fa4 = fa4_parts(q, k, v, spans, plan) if plan.masked is not None else {}
        rows.append(dict(case=case.name, backend=plan.backend, rel_err=err, host_us=host, unexplained_us=unexplained,
                         excess_us=excess, in_sequence_us=sequence, fa4_us=fa4))
        alone, seq, fa4_alone = (", ".join(f"{n} {t:.0f}" for n, t in d.items()) for d in (host, sequence, fa4))
        print(f"{case.name}: {plan.backend}, rel err {err}; {alone}; unexplained {unexplained:.0f} µs; "
              f"first call over the planned call {excess:.0f} µs; in sequence: "
              f"{seq}; {fa4_alone}", flush=True)
        profiles[f"{case.name}: {PROFILED_CALLS} first calls"] = profile_calls(
            lambda: bidiattn.attention(q, k, v, cases.fresh(spans)), PROFILED_CALLS)
        profiles[f"{case.name}: {PROFILED_CALLS} steady calls"] = profile_calls(
            lambda: bidiattn.attention(q, k, v, spans), PROFILED_CALLS)
    meta = cases.meta()
    lines = [f"# The default call's first-call host time, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, FA4 {meta['fa4']}, commit {meta['commit']}, "
             f"`{meta['command']}`. Median host µs per call (started on an idle GPU). *first call*: a new "
             "SpanMask and the default call on it; *first call alone*: the default call on a SpanMask built "
             "before the timer (what issue 24 bounds: its excess over the call with a plan, *over plan*). "
             "*unexplained*: first call - new spans - plan - steady call.", "",
             "| case | backend | rel err | " + " | ".join(PARTS) + " | over plan | unexplained |",
             "|---" * (len(PARTS) + 5) + "|"]
    for r in rows:
        err = "n/a" if r["rel_err"] is None else f"{r['rel_err']:.4f}"
        lines.append(f"| {r['case']} | {r['backend']} | {err} | "
                     + " | ".join(f"{r['host_us'][n]:.0f}" for n in PARTS)
                     + f" | {r['excess_us']:.0f} | {r['unexplained_us']:.0f} |")
    lines += ["", "The first call's parts timed in sequence within each call; for fa4's masked launch, its tables "
              "launch alone and FA4's interface alone (`fa4_masked.masked_forward`) on kept and on new tables "
              "(host µs, median):", "",
              "| case | " + " | ".join(IN_SEQUENCE + FA4_PARTS) + " |",
              "|---" * (len(IN_SEQUENCE + FA4_PARTS) + 1) + "|"]
    for r in rows:
        cells = [r["in_sequence_us"][n] for n in IN_SEQUENCE] + [r["fa4_us"].get(n) for n in FA4_PARTS]
        lines.append(f"| {r['case']} | " + " | ".join("n/a" if c is None else f"{c:.0f}" for c in cells) + " |")
    for name, text in profiles.items():
        lines += ["", f"## {name}, by cumulative time", "", "```", *text, "```"]
    if args.out:
        prefix = "first-call" + (f"-{args.label}" if args.label else "")
        stem = cases.write_results(args.out, prefix, meta, dict(rows=rows, profiles=profiles), lines)
        print(f"wrote {args.out}/{stem}.{{md,json}}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
