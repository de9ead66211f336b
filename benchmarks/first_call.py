"""Where the default call's first-call host time goes (issue 24: at most 100 µs over a planned call).

    python benchmarks/first_call.py --out $OUT [--cases 'hd256 16K img,hd128 16K img'] [--label L]

Per case, host microseconds (``cases.host_us``: median, call started on an idle GPU) of: a new
``SpanMask`` over the same bounds; ``bidiattn.plan`` with the default backend; the call with that
plan; the default call on new spans (plans inside: the first call of a layer); the default call
on spans that keep their plan (steady). The first call's excess over new spans + plan + steady is
what none of them explains. Then a cProfile of 30 first calls, the functions with the most own
time, written into the .md. Cases: ``cases.fa4_cli``'s. Checked first: the first and steady calls
give the same output, within ``cases.rel_err`` of SDPA with the dense mask (up to 16K tokens).
Writes first-call[-<label>]-<device>-<date>.{md,json}.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys

import cases
import torch

import bidiattn

PARTS = ("new spans", "plan", "call with plan", "first call", "steady call")
PROFILED_CALLS = 30


def profile_first_calls(q, k, v, spans, calls: int) -> list[str]:
    """The top functions by own time over ``calls`` first calls, as pstats prints them."""
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        bidiattn.attention(q, k, v, cases.fresh(spans))
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
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
            cases.host_us(lambda: bidiattn.attention(q, k, v, spans)),
        )))
        unexplained = host["first call"] - host["new spans"] - host["plan"] - host["steady call"]
        rows.append(dict(case=case.name, backend=plan.backend, rel_err=err, host_us=host, unexplained_us=unexplained))
        parts = ", ".join(f"{n} {t:.0f}" for n, t in host.items())
        print(f"{case.name}: {plan.backend}, rel err {err}; {parts}; unexplained {unexplained:.0f} µs", flush=True)
        profiles[case.name] = profile_first_calls(q, k, v, spans, PROFILED_CALLS)
    meta = cases.meta()
    lines = [f"# The default call's first-call host time, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, FA4 {meta['fa4']}, commit {meta['commit']}, "
             f"`{meta['command']}`. Median host µs per call (started on an idle GPU). *unexplained*: first call - "
             "new spans - plan - steady call.", "",
             "| case | backend | rel err | " + " | ".join(PARTS) + " | unexplained |", "|---" * (len(PARTS) + 4) + "|"]
    for r in rows:
        err = "n/a" if r["rel_err"] is None else f"{r['rel_err']:.4f}"
        lines.append(f"| {r['case']} | {r['backend']} | {err} | "
                     + " | ".join(f"{r['host_us'][n]:.0f}" for n in PARTS) + f" | {r['unexplained_us']:.0f} |")
    for name, text in profiles.items():
        lines += ["", f"## {name}: {PROFILED_CALLS} first calls, by own time", "", "```", *text, "```"]
    if args.out:
        prefix = "first-call" + (f"-{args.label}" if args.label else "")
        stem = cases.write_results(args.out, prefix, meta, dict(rows=rows, profiles=profiles), lines)
        print(f"wrote {args.out}/{stem}.{{md,json}}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
