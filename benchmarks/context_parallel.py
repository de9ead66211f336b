"""Context-parallel benchmark (issue 26): one long sequence over 1, 2, 4, 8 GPUs.

    torchrun --nproc-per-node 8 benchmarks/context_parallel.py [--check] [--out benchmarks/results]
    torchrun --nproc-per-node 4 benchmarks/context_parallel.py --smoke --out /tmp   # CPU, gloo, tiny

One launch measures every GPU count up to the launched world (sub-groups of the first n ranks;
the other ranks wait at a barrier), so the scaling figures come from one run. Cases: 128K, 512K
and 1M tokens; hd256 8q/4kv and hd512 16q/4kv; an image of 1092 tokens ending every 2048
(gemma3 official rules); full layers and sliding layers (W=1024); bf16, ``backend="auto"``.

Per case and GPU count n: forward and forward+backward time (median of ``--rep`` runs; each run
barrier-started, timed per rank, the slowest rank's time), TFLOP/s per GPU (4 * pairs * D * Hq
forward, 10 * pairs * D * Hq backward, pairs = allowed (query, key) pairs), scaling efficiency
``t(n0) * n0 / (t(n) * n)`` against the smallest count n0 that ran, and bytes sent per rank
(forward: the K/V slices the plan sends; backward: those again plus fp32 dK/dV) against a plain
ring (each rank sends its whole shard to every other rank: (n-1) * T/n keys of K and V forward;
forward bytes again plus fp32 dK/dV backward), with the largest halo in windows for sliding layers.
Bytes come from the plan: the code sends exactly its key ranges. On full layers the balanced
plan gives the first ranks more rows (causal work grows along the sequence), and an owner sends
its shard to every later rank directly, so the largest rank may send more than a ring's
equal-shard figure (the smoke run's 4-rank full cases: 1.9x) while the mean is lower; the json
has ``fwd_mean`` too.

A count whose shard does not fit raises out-of-memory on some rank, which the others cannot
see while they wait on a transfer: run the large cases with ``--tokens`` and fewer counts first.
``--check``: every rank also builds the whole sequence from one seed and compares its shard's
output with one-shot :func:`bidiattn.attention` (max abs error relative to the largest value;
the 128K cases on a GPU, every case with ``--smoke``).

``--smoke`` runs the same logic on CPU with gloo at tiny sizes (hd16, 512/1024 tokens, images of
68 every 128, W=64, fp32, reference backend, checked): what CI-less review can run.

Writes ``context-parallel-<device>-<date>.json`` / ``.md`` (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import bidiattn
from bidiattn import rules
from bidiattn.distributed import context_attention, plan_rank, plan_shards


@dataclass(frozen=True)
class Case:
    tokens: int
    hq: int
    hkv: int
    head_dim: int
    layer: str
    image_len: int = 1092
    image_every: int = 2048
    window: int = 1024

    @property
    def name(self) -> str:
        layer = "full" if self.layer == "full" else f"sliding W{self.window}"
        return (f"hd{self.head_dim} {self.hq}q/{self.hkv}kv {self.tokens / 1024:g}K img{self.image_len}/"
                f"{self.image_every} {layer}")


def build_spans(case: Case):
    """Host spans: an image of ``image_len`` tokens ending every ``image_every`` (cases.py's layout)."""
    pos = torch.arange(case.tokens)
    in_image = (pos % case.image_every) >= (case.image_every - case.image_len)
    ids = torch.where(in_image, pos // case.image_every + 1, 0)
    return rules.build("gemma3", "official", case.layer, block_ids=ids, window=case.window)


def bytes_per_rank(plan, hkv: int, d: int, elem: int) -> dict:
    """Bytes each rank sends (forward; forward+backward) under the plan and under a plain ring."""
    w, t = plan.world_size, plan.starts[-1]
    fwd = [0] * w
    halo = [0] * w
    for (r, s), (k0, k1) in plan.key_ranges.items():
        if r != s:
            fwd[s] += (k1 - k0) * hkv * d * elem * 2  # owner s sends K and V to r
            halo[r] = max(halo[r], k1 - k0)
    # backward: K/V again, then dK/dV (fp32) back to the owner
    fb = [f + f // elem * 4 + f for f in fwd]
    ring_fwd = (w - 1) * -(-t // w) * hkv * d * elem * 2
    ring_fb = ring_fwd * 2 + ring_fwd // elem * 4
    return dict(fwd_max=max(fwd), fwd_mean=sum(fwd) / w, fb_max=max(fb), ring_fwd=ring_fwd, ring_fb=ring_fb,
                halo_keys_max=max(halo))


def timed(fn, rep: int, group, device) -> float:
    """Median over ``rep`` runs of the slowest rank's seconds (barrier-started)."""
    times = []
    for i in range(rep + 1):
        dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
        if i:  # the first run is warm-up (planning, allocations)
            times.append(float(dt))
    return statistics.median(times)


def run_case(case: Case, n: int, group, rank: int, args, device, dtype) -> dict:
    """Time one case on the first ``n`` ranks (``rank`` is the group rank)."""
    spans = build_spans(case)
    shards = plan_shards(spans, n, num_q_heads=case.hq, tile=args.tile)
    plan = plan_rank(spans, shards, rank, device=device)
    dev_spans = spans.to(device)
    a, b = plan.rows
    g = torch.Generator(device=device).manual_seed(1234 + (0 if args.check else rank))
    rows = case.tokens if args.check else b - a

    def make(h):
        return torch.randn(rows, h, case.head_dim, device=device, dtype=dtype, generator=g)

    q, k, v, dout = make(case.hq), make(case.hkv), make(case.hkv), make(case.hq)
    if args.check:  # every rank made the whole sequence from one seed: keep its shard
        full = (q, k, v, dout)
        q, k, v, dout = (x[a:b].contiguous() for x in full)
    backend = args.backend

    def fwd():
        with torch.no_grad():
            context_attention(q, k, v, dev_spans, group=group, plan=plan, backend=backend)

    ql, kl, vl = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd_bwd():
        out = context_attention(ql, kl, vl, dev_spans, group=group, plan=plan, backend=backend)
        torch.autograd.grad(out, (ql, kl, vl), dout)

    row = dict(case=case.name, **asdict(case), gpus=n, rows_per_rank=[shards.starts[i + 1] - shards.starts[i]
                                                                       for i in range(n)],
               work_max_over_mean=max(shards.work) * n / max(1, sum(shards.work)))
    row["fwd_s"] = timed(fwd, args.rep, group, device)
    row["fwd_bwd_s"] = timed(fwd_bwd, args.rep, group, device)
    pairs = spans.num_pairs()
    fl_f, fl_b = 4 * pairs * case.head_dim * case.hq, 10 * pairs * case.head_dim * case.hq
    row["fwd_tflops_per_gpu"] = fl_f / row["fwd_s"] / n / 1e12
    row["fwd_bwd_tflops_per_gpu"] = (fl_f + fl_b) / row["fwd_bwd_s"] / n / 1e12
    row.update(bytes_per_rank(shards, case.hkv, case.head_dim, torch.finfo(dtype).bits // 8))
    if args.check and (args.smoke or case.tokens <= 131072):
        out = context_attention(ql, kl, vl, dev_spans, group=group, plan=plan, backend=backend)
        torch.autograd.backward(out, dout)
        qf, kf, vf = (x.detach().requires_grad_() for x in full[:3])
        want = bidiattn.attention(qf, kf, vf, dev_spans, backend=backend)
        want.backward(full[3])
        errs = []
        for got, ref in ((out, want[a:b]), (ql.grad, qf.grad[a:b]), (kl.grad, kf.grad[a:b]), (vl.grad, vf.grad[a:b])):
            errs.append((got.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30))
        err = torch.tensor(errs, dtype=torch.float64, device=device)
        dist.all_reduce(err, op=dist.ReduceOp.MAX, group=group)
        row["check_rel_err"] = dict(zip(("out", "dq", "dk", "dv"), err.tolist()))
    return row


def meta(args, device) -> dict:
    command = "torchrun " + " ".join(shlex.quote(a) for a in sys.argv)
    commit = os.environ.get("BIDIATTN_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu-gloo-smoke"
    return dict(device=name, date=datetime.date.today().isoformat(), torch=torch.__version__, commit=commit,
                command=command, world=dist.get_world_size(), backend_dist=dist.get_backend(), backend=args.backend)


def report(rows: list[dict]) -> list[str]:
    lines = ["| case | GPUs | fwd ms | fwd TFLOP/s/GPU | fwd eff | fwd+bwd ms | fwd+bwd TFLOP/s/GPU | fwd+bwd eff | "
             "fwd MB sent/rank (max) | ring MB | ratio | halo keys | check |", "|" + "---|" * 13]
    base = {}
    for r in rows:
        key = r["case"]
        if key not in base:
            base[key] = r
        b = base[key]
        eff_f = b["fwd_s"] * b["gpus"] / (r["fwd_s"] * r["gpus"])
        eff_fb = b["fwd_bwd_s"] * b["gpus"] / (r["fwd_bwd_s"] * r["gpus"])
        r["fwd_eff"], r["fwd_bwd_eff"], r["eff_base_gpus"] = eff_f, eff_fb, b["gpus"]
        ratio = r["fwd_max"] / r["ring_fwd"] if r["ring_fwd"] else float("nan")
        check = r.get("check_rel_err")
        check = "" if check is None else f"{max(check.values()):.1e}"
        lines.append(f"| {key} | {r['gpus']} | {r['fwd_s'] * 1e3:.2f} | {r['fwd_tflops_per_gpu']:.1f} | {eff_f:.2f} | "
                     f"{r['fwd_bwd_s'] * 1e3:.2f} | {r['fwd_bwd_tflops_per_gpu']:.1f} | {eff_fb:.2f} | "
                     f"{r['fwd_max'] / 1e6:.1f} | {r['ring_fwd'] / 1e6:.1f} | {ratio:.2f} | {r['halo_keys_max']} | "
                     f"{check} |")
    lines.append("")
    lines.append("eff: t(n0) * n0 / (t(n) * n) against the smallest GPU count n0 of the case that ran; "
                 "check: max relative error of out/dQ/dK/dV against one-shot attention.")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="131072,524288,1048576")
    p.add_argument("--heads", default="256:8:4,512:16:4", help="head_dim:q_heads:kv_heads,...")
    p.add_argument("--layers", default="full,sliding")
    p.add_argument("--gpus", default=None, help="counts to measure (default 1,2,4,8 up to the world)")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--rep", type=int, default=5)
    p.add_argument("--backend", default="auto")
    p.add_argument("--check", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.smoke:
        dist.init_process_group("gloo")
        device, dtype = torch.device("cpu"), torch.float32
        args.backend, args.check, args.tile, args.rep = "reference", True, 16, 1
        torch.set_num_threads(1)
        tokens, heads = [512, 1024], [(16, 8, 4), (16, 4, 2)]
        geometry = dict(image_len=68, image_every=128, window=64)
    else:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, dtype = torch.device("cuda", local), torch.bfloat16
        dist.init_process_group("nccl", device_id=device)
        tokens = [int(x) for x in args.tokens.split(",")]
        heads = [tuple(int(y) for y in x.split(":")) for x in args.heads.split(",")]
        geometry = {}
    world, rank = dist.get_world_size(), dist.get_rank()
    dist.barrier()  # a first collective on the world (batch_isend_irecv's first call needs all ranks)
    counts = [int(x) for x in args.gpus.split(",")] if args.gpus else [n for n in (1, 2, 4, 8) if n <= world]
    groups = {n: dist.new_group(list(range(n))) for n in counts}  # every rank creates every group
    for n in counts:
        if rank < n:
            dist.barrier(groups[n])
    rows = []
    for t in tokens:
        for d, hq, hkv in heads:
            for layer in args.layers.split(","):
                case = Case(t, hq, hkv, d, layer, **geometry)
                for n in counts:
                    if rank < n:
                        row = run_case(case, n, groups[n], rank, args, device, dtype)
                        if rank == 0:
                            rows.append(row)
                            print(json.dumps({k: v for k, v in row.items() if k != "rows_per_rank"}), flush=True)
                    dist.barrier()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if rank == 0:
        m = meta(args, device)
        lines = [f"# Context parallelism, {m['device']} x{world}, {m['date']}, commit {m['commit']}", "",
                 f"`{m['command']}`", ""] + report(rows)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"context-parallel-{m['device'].replace(' ', '_')}-{m['date']}"
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=m, rows=rows), indent=2))
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"wrote {out / stem}.json/.md")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
