"""Host time of planning (issue 24's first-call cost): the fa4 segment plan's starts in one Triton
launch against the same starts in PyTorch ops (its spec), and ``bidiattn.plan`` per backend.

    python benchmarks/plan_cost.py --out $OUT

Cases: 16K and 128K tokens, 1092-token images every 2048 (the full layer) and the same with a
1024-token window (the sliding layer); hd128 16 q / 8 kv heads for the plans. Each column is
checked first (kernel and spec give the same starts; the plan's launches give the span mask on the
16K cases), then timed: median host microseconds per call over ``--reps`` calls after warm-up,
wall clock around the call (the sync to read the starts back included: that is what the first call
of a layer pays). Writes ``plan-cost-<device>-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys

import torch

import bidiattn
from bidiattn import launch, rules


def spans_for(t: int, window: int | None):
    ids = torch.zeros(t, dtype=torch.int64)
    for n, s in enumerate(range(2048 - 1092, t, 2048)):
        ids[s : s + 1092] = n + 1
    layer = "sliding" if window else "full"
    return rules.build("gemma3", "official", layer, block_ids=ids.cuda(), window=window)


def main() -> int:
    import cases
    from bidiattn.kernels.segments import segment_starts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    rows = []
    for t in (16384, 131072):
        for window in (None, 1024):
            spans = spans_for(t, window)
            label = f"{t // 1024}K {'sliding W1024' if window else 'full'}"
            row = dict(case=label, columns={})
            cap = min(t, 1024)
            kernel = segment_starts(spans, False, None, cap)
            spec = launch.segment_starts_spec(spans, False, None)
            if kernel != spec:
                raise SystemExit(f"{label}: the kernel's starts differ from the spec's")
            if t <= 16384:
                assert torch.equal(launch.plan_segments(spans).to_dense(), spans.to_dense())
            cols = {
                "starts: kernel (1 launch + read-back)": lambda: segment_starts(spans, False, None, cap),
                "starts: PyTorch ops (the spec)": lambda: launch.segment_starts_spec(spans, False, None),
                "plan_segments": lambda: launch.plan_segments(spans),
                "bidiattn.plan fa4": lambda: bidiattn.plan(spans, 16, 8, 128, backend="fa4", window=window),
                "bidiattn.plan triton": lambda: bidiattn.plan(spans, 16, 8, 128, backend="triton", window=window),
                "bidiattn.plan triton, training": lambda: bidiattn.plan(spans, 16, 8, 128, backend="triton",
                                                                       window=window, training=True),
            }
            for name, fn in cols.items():
                try:
                    row["columns"][name] = dict(us=cases.host_us(fn, args.reps))
                except Exception as e:  # noqa: BLE001 - recorded, not fatal
                    row["columns"][name] = dict(error=cases.describe_error(e))
                cell = row["columns"][name]
                print(f"{label:20s} {name:40s} " + (f"{cell['us']:8.1f} us" if "us" in cell else cell["error"]),
                      flush=True)
            row["segments"] = len(spec[0])
            rows.append(row)
    meta = cases.meta()
    names = list(rows[0]["columns"])
    lines = [f"# Planning host time, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, `{meta['command']}`. "
             "Median host µs per call (wall clock, read-back sync included), after warm-up; the kernel's "
             "starts checked equal to the spec's first.", "",
             "| case | segments | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        cells = [f"{r['columns'][n]['us']:.0f}" if "us" in r["columns"][n] else "fails" for n in names]
        lines.append(f"| {r['case']} | {r['segments']} | " + " | ".join(cells) + " |")
    if args.out:
        stem = cases.write_results(args.out, "plan-cost", meta, dict(rows=rows), lines)
        print(f"wrote {args.out}/{stem}.{{md,json}}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
