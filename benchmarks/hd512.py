"""Head dim 512 on SM90 (issue 27): check and time bidiattn's Gluon forward against its peers.

    export PYTHONPATH=$PWD/src:$PYTHONPATH
    python benchmarks/hd512.py compile                      # no GPU needed: regs/spills/shared per config
    python benchmarks/hd512.py check --variants all --out $OUT
    python benchmarks/hd512.py time  --variants all --out $OUT
    python benchmarks/hd512.py paged --out $OUT               # a prefill chunk read from pages
    python benchmarks/hd512.py passes --out $OUT              # the Gluon backward, pass by pass

``check``: the kernel (each variant) against an fp32 reference of the same span mask at small
shapes (causal, 1092-token images every 2048, sliding window with images, packed odd lengths,
extend spans, GQA 4 and 8, bf16 and fp16): output and lse, NaN-poisoned buffers; the rule is
``err <= 2 * err(PyTorch eager in the input dtype) + 1e-3`` against the fp32 result. Exit status 1
on any failure. Writes ``hd512-check-<device>-<date>.{md,json}``.

``time``: hd512, 16q/4kv and 32q/4kv heads, 16K and 32K tokens, causal and images (1092 every
2048, the any-span case). Columns: the Gluon kernel (each variant; tile tables built once, as a
plan), ``bidiattn.attention(q, k, v, spans)`` with no other argument (the default call: Gluon on
SM90), bidiattn Triton (public call), FlexAttention (mask_mod block mask built once), SDPA with a
dense mask, cuDNN through SDPA's CUDNN_ATTENTION backend, ffpa-attn and cuDNN frontend's own d512
forward (``cudnn.sdpa_torch``, the plan it ran noted; both causal only, where they import), and the
bf16 matmul rate. Every column is checked first on a subset of rows against an
fp32 reference (same 2x rule); a column that fails or errors is recorded and the run goes on
(the cluster configs, ``*-c2``, error under Triton 3.6: their K/V multicast needs 3.9's Gluon).
TFLOP/s on allowed pairs, 4 * pairs * D * Hq. ``--backward`` adds forward+backward columns (the
default call: the Gluon forward and backward; bidiattn Triton; ffpa-attn on causal cases; the
Gluon forward and backward passes called directly, without autograd), 14 * pairs * D * Hq, and
the backward alone. Writes ``hd512-<device>-<date>.{md,json}``.

``passes``: the Gluon backward's passes (dV, dK, dQ, the delta launch) one by one, profiler
device time each, and the whole backward's time, gradients checked against the triton backend's
first; 16q/4kv 16K causal and images unless ``--cases``; ``--score-regs 120:120,168:136`` times
each variant of the dV and dK passes' score-warpgroup registers. Writes ``hd512-passes-<device>-<date>``.

``--label L`` puts ``-L`` after each file's prefix (``hd512-L-<device>-<date>``), e.g. the Triton
release the run used.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import bidiattn
from bidiattn import reference, rules
from bidiattn.kernels.sm90_wide import CONFIGS, default_config, forward_sm90_hd512
from bidiattn.spans import SpanMask

D = 512
FLOOR = 1e-3


# ----------------------------------------------------------------------------- helpers
def _prefix(name: str, args) -> str:
    """A results file's prefix: ``name``, then ``-<label>`` where ``--label`` gives one."""
    return f"{name}-{args.label}" if args.label else name


def variants(arg: str) -> dict:
    names = list(CONFIGS) if arg == "all" else [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(CONFIGS)}")
    return {n: CONFIGS[n] for n in names}


def default_config_name() -> str:
    """The CONFIGS name of the config the public call runs here (``default_config()``)."""
    return next(n for n, c in CONFIGS.items() if c == default_config())


def image_ids(lengths: list[int], image_len: int, every: int) -> torch.Tensor:
    """block ids of packed sequences, an image of ``image_len`` tokens ending every ``every``."""
    ids, n = [], 0
    for length in lengths:
        seq = torch.zeros(length, dtype=torch.int64)
        for s in range(every - image_len, length, every):
            n += 1
            seq[s : s + image_len] = n
        ids.append(seq)
    return torch.cat(ids)


def make_spans(rule: str, lengths: list[int], window: int | None = None) -> SpanMask:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device="cuda")
    if rule == "causal":
        ids = torch.zeros(sum(lengths), dtype=torch.int64)
        return rules.build("causal", "official", "full", block_ids=ids.cuda(), cu_seqlens=cu)
    ids = image_ids(lengths, 1092, 2048).cuda()
    layer = "sliding" if window else "full"
    return rules.build("gemma3", "official", layer, block_ids=ids, window=window, cu_seqlens=cu)


def extend_spans(q_len: int, k_len: int) -> SpanMask:
    """One sequence's last ``q_len`` rows over ``k_len`` keys, causal (a prefill chunk over a cache)."""
    i = torch.arange(q_len, device="cuda", dtype=torch.int32)
    return SpanMask(torch.zeros_like(i), k_len - q_len + i, torch.tensor([0, q_len], device="cuda"),
                    cu_seqlens_k=torch.tensor([0, k_len], device="cuda"), total_keys=k_len)


def inputs(total: int, keys: int, hq: int, hkv: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(total, hq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(keys, hkv, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(keys, hkv, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def lowp(q, k, v, mask, scale):
    """PyTorch eager in the inputs' dtype (the error the 2x rule allows twice): out, lse."""
    group = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)
    kt = k.repeat_interleave(group, 1).transpose(0, 1)
    vt = v.repeat_interleave(group, 1).transpose(0, 1)
    s = torch.matmul(qt, kt.transpose(1, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), vt).transpose(0, 1), torch.logsumexp(s, -1).float()


def rows_reference(q, k, v, spans: SpanMask, rows: torch.Tensor, scale: float, heads: list[int]):
    """fp32 and low-precision outputs/lse of the query ``rows`` (packed indices) of ``heads``: a
    row subset of a long call, where the full reference would not fit."""
    glo, ghi = spans.packed_bounds()
    keys = torch.arange(k.shape[0], device=q.device)
    mask = (keys[None, :] >= glo[rows, None]) & (keys[None, :] <= ghi[rows, None])
    group = q.shape[1] // k.shape[1]
    res = {}
    for h in heads:
        qh, kh, vh = q[rows, h], k[:, h // group], v[:, h // group]
        for name, dt in (("f32", torch.float32), ("low", q.dtype)):
            s = (qh.to(dt) @ kh.to(dt).T) * scale
            s = s.masked_fill(~mask, float("-inf"))
            out = torch.softmax(s, -1) @ vh.to(dt)
            res[name, h] = (out.float(), torch.logsumexp(s.float() if name == "f32" else s, -1).float())
    return res


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- check
CHECK_CASES = [
    # name, rule, lengths, hq, hkv, dtype, window
    ("causal packed odd 1/63/130/777/1093, GQA 4", "causal", [1, 63, 130, 777, 1093], 8, 2, torch.bfloat16, None),
    ("images 1092/2048 4096, GQA 8", "images", [4096], 16, 2, torch.bfloat16, None),
    ("images packed 2500/1601, GQA 4", "images", [2500, 1601], 8, 2, torch.bfloat16, None),
    ("sliding W1024 + images 3001, GQA 4", "images", [3001], 4, 1, torch.bfloat16, 1024),
    ("causal fp16 1000, MHA", "causal", [1000], 4, 4, torch.float16, None),
    ("extend 300 rows over 1000 keys, GQA 4", "extend", [300, 1000], 4, 1, torch.bfloat16, None),
]


def check(args) -> int:
    import cases

    vs = variants(args.variants)
    results, failures = [], 0
    t0 = time.time()
    for name, rule, lengths, hq, hkv, dtype, window in CHECK_CASES:
        spans = extend_spans(*lengths) if rule == "extend" else make_spans(rule, lengths, window)
        total, keys = spans.total_tokens, spans.total_keys
        q, k, v = inputs(total, keys, hq, hkv, dtype)
        scale = D ** -0.5
        mask = spans.to_dense()
        ref_out, ref_lse = reference.attention(q.float(), k.float(), v.float(), spans, return_lse=True)
        low_out, low_lse = lowp(q, k, v, mask, scale)
        torch_err, torch_lse_err = max_err(low_out, ref_out), max_err(low_lse, ref_lse)
        bound, lse_bound = 2 * torch_err + FLOOR, 2 * torch_lse_err + FLOOR
        runs = {f"gluon {n}": (lambda c=c: _gluon_poisoned(q, k, v, spans, scale, c)) for n, c in vs.items()}
        runs["bidiattn triton"] = lambda: bidiattn.attention(q, k, v, spans, backend="triton", return_lse=True)
        for col, fn in runs.items():
            row = dict(case=name, column=col, torch_err=torch_err, torch_lse_err=torch_lse_err)
            try:
                out, lse = fn()
                torch.cuda.synchronize()
                row.update(err=max_err(out, ref_out), lse_err=max_err(lse, ref_lse),
                           nan=bool(torch.isnan(out).any() or torch.isnan(lse).any()))
                row["ok"] = (not row["nan"]) and row["err"] <= bound and row["lse_err"] <= lse_bound
            except Exception as e:  # noqa: BLE001 - a failing column is reported
                row.update(ok=False, error=cases.describe_error(e, 300))
                traceback.print_exc()
            failures += not row["ok"]
            results.append(row)
            print(f"{name:42s} {col:22s} " + (f"err {row['err']:.2e} (bound {bound:.2e})  lse {row['lse_err']:.2e} "
                  f"(bound {lse_bound:.2e})  nan {row['nan']}" if "err" in row else row.get("error", "")) +
                  f"  {'ok' if row['ok'] else 'FAIL'}", flush=True)
        del q, k, v, mask, ref_out, ref_lse, low_out, low_lse
        torch.cuda.empty_cache()
    meta = cases.meta()
    meta["seconds"] = round(time.time() - t0, 1)
    lines = [f"# hd512 check, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, `{meta['command']}`. "
             f"Rule: max abs error vs fp32 <= 2 x PyTorch eager (input dtype) error + {FLOOR}; out and lse. "
             f"{failures} failure(s), {meta['seconds']} s.", "",
             "| case | column | out err | PyTorch err | lse err | PyTorch lse err | ok |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "err" in r:
            lines.append(f"| {r['case']} | {r['column']} | {r['err']:.2e} | {r['torch_err']:.2e} | {r['lse_err']:.2e} | "
                         f"{r['torch_lse_err']:.2e} | {'yes' if r['ok'] else '**no**'} |")
        else:
            lines.append(f"| {r['case']} | {r['column']} | {r.get('error')} | | | | **no** |")
    if args.out:
        stem = cases.write_results(args.out, _prefix("hd512-check", args), meta, dict(rows=results), lines)
        print(f"wrote {args.out}/{stem}.{{md,json}}")
    print("\n".join(lines))
    return 1 if failures else 0


def _gluon_poisoned(q, k, v, spans, scale, config):
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), device=q.device)
    return forward_sm90_hd512(q, k, v, spans, scale, config=config, out=out, lse=lse)


# ----------------------------------------------------------------------------- time
TIME_CASES = [(hq, hkv, t, rule) for t in (16384, 32768) for hq, hkv in ((16, 4), (32, 4)) for rule in ("causal", "images")]


def bench(fn, budget_s: float, min_reps: int = 3, max_reps: int = 50, warmup: int = 2) -> float:
    """Median milliseconds of CUDA-event-timed calls after ``warmup`` calls; as many calls as fit
    ``budget_s`` (at least ``min_reps``)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, start = [], time.time()
    while len(times) < max_reps and (len(times) < min_reps or time.time() - start < budget_s):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def measure(cell: dict, fn, check, flop: float, args) -> None:
    """One column's cell: ``check(fn())`` (raises on a wrong result), then ``ms`` (median, see
    :func:`bench`) and ``tflops``; a column that fails or errors gets ``error`` instead (reported,
    not fatal)."""
    import cases

    try:
        check(fn())
        ms = bench(fn, args.seconds)
        cell.update(ms=ms, tflops=flop / ms / 1e9)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        cell["error"] = cases.describe_error(e, 300)
        if args.verbose:
            traceback.print_exc()


def optional_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cudnn_fe_plan() -> str | None:
    """The plan cuDNN's heuristics chose for the graph ``cudnn.sdpa_torch`` built last (on SM90 at head dim
    512: the frontend's own CuTe DSL engine ``sdpa_fwd_prefill_sm90``, the backend library has none); None
    before a call or where the frontend's private cache is laid out otherwise."""
    try:
        from cudnn.sdpa.fwd import torch_op
        g = next(reversed(torch_op._graph_cache.values()))[0]
        return g.get_plan_name_at_index(g._plan_index)
    except Exception:  # noqa: BLE001 - private API of one frontend release: the name is informative only
        return None


def peers(args, case, spans, q, k, v, scale):
    """(column, fn returning out [T, Hq, D], note) of every column of one case."""
    hq, hkv, t, rule = case
    cols = []
    tiles_cache = {}

    def gluon(config):
        def fn():
            if config.block_m not in tiles_cache:
                from bidiattn.kernels.tiles import query_tiles
                tiles_cache[config.block_m] = query_tiles(spans, config.block_m)
            return forward_sm90_hd512(q, k, v, spans, scale, config=config, tiles=tiles_cache[config.block_m])[0]
        return fn

    for name, config in variants(args.variants).items():
        cols.append((f"gluon {name}", gluon(config), "planned (tile tables built once)"))
    skip = set(args.skip.split(",")) if args.skip else set()
    if "default" not in skip:
        cols.append(("bidiattn default", lambda: bidiattn.attention(q, k, v, spans),
                     "public call, no arguments (gluon on SM90; plan kept on the spans)"))
    if "triton" not in skip:
        cols.append(("bidiattn triton", lambda: bidiattn.attention(q, k, v, spans, backend="triton"), "public call"))
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if "ffpa" not in skip and rule == "causal":
        def ffpa():
            from ffpa_attn import ffpa_attn_varlen_func
            cu = spans.cu_seqlens.to(torch.int32)
            return ffpa_attn_varlen_func(q, k, v, cu, cu, t, t, softmax_scale=scale, causal=True, enable_gqa=True)
        cols.append(("ffpa-attn", ffpa, "varlen, causal"))
    if "cudnn-fe" not in skip and rule == "causal":
        def cudnn_fe():
            import cudnn
            cu = spans.cu_seqlens.to(torch.int32)
            return cudnn.sdpa_torch(q, k, v, scale=scale, is_causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                    max_seqlen_q=t, max_seqlen_kv=t)
        cols.append(("cudnn-fe", cudnn_fe, "cuDNN frontend's sdpa_torch, THD varlen, causal"))
    if "sdpa" not in skip:
        def sdpa():
            if "mask" not in tiles_cache:
                tiles_cache["mask"] = spans.to_dense()
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=tiles_cache["mask"], scale=scale,
                                                  enable_gqa=True).squeeze(0).transpose(0, 1)
        cols.append(("sdpa mask", sdpa, "dense bool mask, default backend"))
    if "cudnn" not in skip:
        def cudnn():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                if rule == "causal":
                    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
                else:
                    if "mask" not in tiles_cache:
                        tiles_cache["mask"] = spans.to_dense()
                    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=tiles_cache["mask"], scale=scale,
                                                       enable_gqa=True)
            return o.squeeze(0).transpose(0, 1)
        cols.append(("cudnn (sdpa)", cudnn, "torch SDPBackend.CUDNN_ATTENTION"))
    if "flex" not in skip:
        def flex():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            if "flex" not in tiles_cache:
                glo, ghi = spans.packed_bounds()

                def mask_mod(b, h, qi, ki):
                    return (ki >= glo[qi]) & (ki <= ghi[qi])

                bm = create_block_mask(mask_mod, 1, 1, t, t, device="cuda")
                tiles_cache["flex"] = (torch.compile(flex_attention, dynamic=False), bm)
            fx, bm = tiles_cache["flex"]
            opts = dict(BLOCK_M=32, BLOCK_N=32, num_stages=1)
            return fx(qt, kt, vt, block_mask=bm, enable_gqa=True, scale=scale, kernel_options=opts).squeeze(0).transpose(0, 1)
        cols.append(("flex", flex, "mask_mod block mask built once"))
    return cols


def trainers(args, case, spans, q, k, v, scale):
    """(column, its forward column, fn) of the fwd+bwd columns of one case: the default call (the Gluon
    forward and backward on SM90), bidiattn triton, ffpa-attn (causal): ``fn(q, k, v) -> out``
    (autograd); the Gluon forward + its three backward passes called directly (what the default call runs, without autograd):
    ``fn(leaves, dout) -> (dq, dk, dv)``."""
    hq, hkv, t, rule = case
    skip = set(args.skip.split(",")) if args.skip else set()
    cols = [("triton fwd+bwd", "bidiattn triton", lambda q, k, v: bidiattn.attention(q, k, v, spans, backend="triton"))]
    if "default" not in skip:
        cols.append(("default fwd+bwd", "bidiattn default", lambda q, k, v: bidiattn.attention(q, k, v, spans)))
    if "ffpa" not in skip and rule == "causal":
        def ffpa(q, k, v):
            from ffpa_attn import ffpa_attn_varlen_func
            cu = spans.cu_seqlens.to(torch.int32)
            return ffpa_attn_varlen_func(q, k, v, cu, cu, t, t, softmax_scale=scale, causal=True, enable_gqa=True)
        cols.append(("ffpa-attn fwd+bwd", "ffpa-attn", ffpa))
    if "gluon-bwd" not in skip:
        tables = {}

        def gluon_grads(leaves, dout):
            from bidiattn.kernels.sm90_wide import backward_sm90_hd512, plan_gluon
            if not tables:
                tables["plan"] = plan_gluon(spans, training=True)
            plan = tables["plan"]
            q, k, v = (x.detach() for x in leaves)
            out, lse = forward_sm90_hd512(q, k, v, spans, scale, config=plan.config, tiles=plan.tiles)
            return backward_sm90_hd512(dout, q, k, v, out, lse, spans, scale, tiles=plan.backward_tiles(spans))
        cols.append(("gluon fwd+bwd (3 passes)", f"gluon {default_config_name()}", gluon_grads))
    return cols


def time_backward(args, case, spans, q, k, v, scale, row, fwd_ms):
    """fwd+bwd columns of one case into ``row["columns"]``: gradients checked against bidiattn
    triton's (max abs difference <= 2% of the largest gradient + 1e-3; the triton backward itself is
    checked against fp32 in the GPU tests), then timed; backward alone = fwd+bwd - the column's
    forward time of the same run."""
    hq = case[0]
    flop = 14 * row["pairs"] * D * hq
    g = torch.Generator(device="cuda").manual_seed(7)
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g)
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    want = []  # triton's gradients, the first column's

    def check(grads):
        torch.cuda.synchronize()
        if not want:
            want.extend(grads)
            return
        errs = [(max_err(a, b), 0.02 * b.abs().max().item() + 1e-3) for a, b in zip(grads, want)]
        cell.update(grad_err=[e for e, _ in errs], grad_bound=[b for _, b in errs])
        if not all(e <= b for e, b in errs):  # NaN fails too
            raise RuntimeError(f"gradients differ from triton's: {errs}")

    for col, fwd_col, fwd in trainers(args, case, spans, q, k, v, scale):
        def fn(fwd=fwd, direct=col.startswith("gluon")):
            return fwd(leaves, dout) if direct else torch.autograd.grad(fwd(*leaves), leaves, dout)
        cell = dict(note="torch.autograd.grad of out with a random dout")
        measure(cell, fn, check, flop, args)
        base = fwd_ms.get(fwd_col)
        if "ms" in cell and base is not None and cell["ms"] > base:
            cell.update(bwd_ms=cell["ms"] - base, bwd_tflops=10 * row["pairs"] * D * hq / (cell["ms"] - base) / 1e9)
        row["columns"][col] = cell
        print(f"{row['case']:36s} {col:18s} " + (f"{cell['tflops']:6.0f} TFLOP/s {cell['ms']:8.2f} ms"
              + (f"  bwd alone {cell['bwd_tflops']:.0f}" if "bwd_tflops" in cell else "")
              if "tflops" in cell else cell["error"]), flush=True)
    del leaves, dout, want
    torch.cuda.empty_cache()


def time_cmd(args) -> int:
    import cases

    t_start = time.time()
    meta = cases.meta()
    meta.update(ffpa_attn=optional_version("ffpa-attn"), quack_kernels=optional_version("quack-kernels"),
                cutlass_dsl=optional_version("nvidia-cutlass-dsl"), cudnn_frontend=optional_version("nvidia-cudnn-frontend"),
                cudnn=torch.backends.cudnn.version())
    peak = cases.matmul_peak()
    meta["bf16_matmul_tflops"] = peak
    print(f"bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    rows = []
    selected = TIME_CASES if not args.cases else [TIME_CASES[int(i)] for i in args.cases.split(",")]
    for case in selected:
        hq, hkv, t, rule = case
        spans = make_spans(rule, [t])
        q, k, v = inputs(t, t, hq, hkv, torch.bfloat16)
        scale = D ** -0.5
        pairs = spans.num_pairs()
        flop = 4 * pairs * D * hq
        label = f"hd512 {hq}q/{hkv}kv {t // 1024}K {'causal' if rule == 'causal' else 'img1092/2048'}"
        row = dict(case=label, tokens=t, hq=hq, hkv=hkv, rule=rule, pairs=pairs, columns={})
        # Row subset for the checks: the first rows, rows around an image, the last rows; two heads.
        sub = torch.cat([torch.arange(0, 64), torch.arange(956 - 40, 956 + 100), torch.arange(t - 200, t)]).cuda()
        ref = rows_reference(q, k, v, spans, sub, scale, [0, hq - 1])
        for col, fn, note in peers(args, case, spans, q, k, v, scale):
            cell = dict(note=note)
            elapsed = time.time() - t_start
            if elapsed > args.budget and not col.startswith("gluon"):
                cell["error"] = f"skipped: run past its {args.budget:.0f} s budget"
                row["columns"][col] = cell
                print(f"{label:36s} {col:18s} {cell['error']}", flush=True)
                continue

            def check(out, cell=cell):
                torch.cuda.synchronize()
                errs = []
                for h in (0, hq - 1):
                    f32, low = ref["f32", h][0], ref["low", h][0]
                    errs.append((max_err(out[sub, h], f32), max_err(low, f32)))
                err = max(e for e, _ in errs)
                bound = max(2 * b + FLOOR for _, b in errs)
                cell.update(err=err, bound=bound)
                if not err <= bound:  # NaN fails too
                    raise RuntimeError(f"wrong result: max abs err {err:.2e} > {bound:.2e}")

            measure(cell, fn, check, flop, args)
            if col == "cudnn-fe":
                cell["note"] += f"; plan {cudnn_fe_plan()}"
            row["columns"][col] = cell
            print(f"{label:36s} {col:18s} " + (f"{cell['tflops']:6.0f} TFLOP/s {cell['ms']:8.2f} ms  err {cell['err']:.1e}"
                                             if "tflops" in cell else cell["error"]), flush=True)
        if args.backward:
            fwd_ms = {c: cell["ms"] for c, cell in row["columns"].items() if "ms" in cell}
            time_backward(args, case, spans, q, k, v, scale, row, fwd_ms)
        rows.append(row)
        del q, k, v, ref
        torch.cuda.empty_cache()
    meta["seconds"] = round(time.time() - t_start, 1)
    cols = []
    for r in rows:
        for c in r["columns"]:
            if c not in cols:
                cols.append(c)

    def fmt(r, c):
        cell = r["columns"].get(c)
        if cell is None:
            return "n/a"
        if "tflops" not in cell:
            return "fails"
        bwd = f"; bwd {cell['bwd_tflops']:.0f}" if "bwd_tflops" in cell else ""
        return f"{cell['tflops']:.0f} ({cell['ms']:.2f} ms{bwd})"

    lines = [f"# hd512 forward{' and backward' if args.backward else ''}, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, ffpa-attn {meta['ffpa_attn']}, quack {meta['quack_kernels']}, "
             f"cutlass-dsl {meta['cutlass_dsl']}, cuDNN {meta['cudnn']}, cuDNN frontend {meta['cudnn_frontend']}, commit {meta['commit']}, "
             f"bf16 matmul {peak:.0f} TFLOP/s; `{meta['command']}`; {meta['seconds']} s.", "",
             "TFLOP/s on allowed pairs (4 * pairs * D * Hq), median of CUDA-event-timed calls after warm-up; "
             "every column checked first on a row subset against fp32 (2x PyTorch-error rule); errors in the JSON. "
             "ffpa-attn and cudnn-fe take causal masks only (cudnn-fe's note names the plan it ran). fwd+bwd columns (--backward): 14 * pairs * D * Hq; 'bwd' = "
             "backward alone (fwd+bwd minus the same column's forward time), 10 * pairs * D * Hq; gradients "
             "checked against bidiattn triton's (2% of the largest gradient).", "",
             "| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(fmt(r, c) for c in cols) + " |")
    errors = [f"- {r['case']}, {c}: {cell['error']}" for r in rows for c, cell in r["columns"].items() if "error" in cell]
    if errors:
        lines += ["", "Errors:", *errors]
    fe_notes = sorted({cell["note"] for r in rows for c, cell in r["columns"].items() if c == "cudnn-fe"})
    lines += [f"- cudnn-fe: {n}" for n in fe_notes]
    if args.out:
        stem = cases.write_results(args.out, _prefix("hd512", args), meta, dict(rows=rows), lines)
        print(f"wrote {args.out}/{stem}.{{md,json}}")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- backward passes
PASS_KERNELS = {"dV": "hd512_dv_kernel", "dK": "hd512_dk_kernel", "dQ": "hd512_dq_kernel", "delta": "_delta_kernel"}


def score_regs_variants(arg: str) -> list[dict]:
    """``--score-regs "120:120,168:136"`` -> ``[{"dv": 120, "dk": 120}, {"dv": 168, "dk": 136}]``: the
    score warpgroup's registers of the dV and dK passes per variant; ``""`` -> ``[{}]`` (as shipped)."""
    if not arg:
        return [{}]
    out = []
    for item in arg.split(","):
        try:
            dv, dk = (int(x) for x in item.split(":"))
        except ValueError:
            raise SystemExit(f"--score-regs takes dV:dK register pairs such as 120:136, not {item!r}") from None
        out.append(dict(dv=dv, dk=dk))
    return out


def passes_cmd(args) -> int:
    """Each Gluon backward pass's device time (the PyTorch profiler's, mean over ``--profile-runs``
    calls) and the whole backward's (median of CUDA-event runs), after its gradients are checked
    against the triton backend's (``max |a - b| <= 2% of the largest + 1e-3``); with
    ``--score-regs``, once per variant of the dV/dK passes' score-warpgroup registers (set in
    ``host.BACKWARD_PASSES`` for the variant, restored after)."""
    import cases
    from bidiattn.kernels.sm90_wide import backward_sm90_hd512, host, plan_gluon

    meta = cases.meta()
    rows = []
    selected = TIME_CASES[:2] if not args.cases else [TIME_CASES[int(i)] for i in args.cases.split(",")]
    shipped = {name: host.BACKWARD_PASSES[name]["SCORE_REGS"] for name in ("dv", "dk")}
    for hq, hkv, t, rule in selected:
        spans = make_spans(rule, [t])
        q, k, v = inputs(t, t, hq, hkv, torch.bfloat16)
        dout = torch.randn_like(q)
        label = f"hd512 {hq}q/{hkv}kv {t // 1024}K {'causal' if rule == 'causal' else 'img1092/2048'}"
        plan = plan_gluon(spans, training=True)
        out, lse = forward_sm90_hd512(q, k, v, spans, config=plan.config, tiles=plan.tiles)
        tiles = plan.backward_tiles(spans)

        def backward():
            return backward_sm90_hd512(dout, q, k, v, out, lse, spans, tiles=tiles)

        leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
        want = torch.autograd.grad(bidiattn.attention(*leaves, spans, backend="triton"), leaves, dout)
        del leaves
        for variant in score_regs_variants(args.score_regs):
            regs = dict(shipped, **variant)
            row = dict(case=label, pairs=spans.num_pairs(), score_regs=regs)
            try:
                for name, n in regs.items():
                    host.BACKWARD_PASSES[name]["SCORE_REGS"] = n
                errs = [(max_err(a, b), 0.02 * b.abs().max().item() + 1e-3) for a, b in zip(backward(), want)]
                row.update(grad_err=[e for e, _ in errs], grad_bound=[b for _, b in errs])
                if not all(e <= b for e, b in errs):
                    row["error"] = f"gradients differ from triton's: {errs}"
                else:
                    ms = bench(backward, args.seconds)  # warm: the profiled calls compile nothing
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(args.profile_runs):
                            backward()
                        torch.cuda.synchronize()
                    seen = {e.key: e.device_time_total / 1e3 / args.profile_runs for e in prof.key_averages()
                            if e.device_time_total > 0}
                    per_pass = {name: seen.get(kernel, 0.0) for name, kernel in PASS_KERNELS.items()}
                    row.update(ms=ms, tflops=10 * row["pairs"] * D * hq / ms / 1e9, passes_ms=per_pass,
                               kernels_ms=seen)
            except Exception as e:  # a variant that does not compile or launch is recorded, the run goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                for name, n in shipped.items():
                    host.BACKWARD_PASSES[name]["SCORE_REGS"] = n
            rows.append(row)
            print(label, {k: v for k, v in row.items() if k not in ("case", "grad_err", "grad_bound", "kernels_ms")},
                  flush=True)
        del want
        torch.cuda.empty_cache()
    lines = [f"# Gluon backward passes ({meta['device']}, {meta['date']}, Triton {meta['triton']}, commit "
             f"{meta['commit']})", "", f"`{meta['command']}`", "",
             "| case | dV / dK score registers | backward ms (TFLOP/s) | "
             + " | ".join(f"{n} ms" for n in PASS_KERNELS) + " |",
             "|---|---|---|" + "---|" * len(PASS_KERNELS)]
    for r in rows:
        regs = f"{r['score_regs']['dv']} / {r['score_regs']['dk']}"
        if "error" in r:
            lines.append(f"| {r['case']} | {regs} | {r['error']} |" + " |" * len(PASS_KERNELS))
            continue
        lines.append(f"| {r['case']} | {regs} | {r['ms']:.2f} ({r['tflops']:.0f}) | "
                     + " | ".join(f"{r['passes_ms'][n]:.2f}" for n in PASS_KERNELS) + " |")
    if args.out:
        stem = cases.write_results(args.out, _prefix("hd512-passes", args), meta, dict(rows=rows), lines)
        print(f"wrote {args.out}/{stem}.{{md,json}}")
    print("\n".join(lines))
    return 1 if any("error" in r for r in rows) else 0


# ----------------------------------------------------------------------------- paged
PAGED_CASES = ([(16, 4, 16384, 2048, rule, page) for rule in ("causal", "images") for page in (16, 64)]
               + [(16, 4, 16384, chunk, "images", 16) for chunk in (256, 512, 1024)])  # where gluon stops paying


def paged_cmd(args) -> int:
    """The last prefill chunk of a long prompt read from pages (``serving.kvcache.paged_attention``,
    2048 rows, and shorter chunks: where auto's ``GLUON_PAGED_ROWS`` should sit):
    triton (page lookup in its key loads) against gluon (the keys gathered out of the pages, then
    the Gluon forward), the gather alone, and the Gluon forward over contiguous keys; each checked
    first on a row subset against fp32 (2x rule)."""
    import cases
    from bidiattn.serving.kvcache import PagedKVCache, append, gather, paged_attention

    t_start, meta, rows = time.time(), cases.meta(), []
    for hq, hkv, t, chunk, rule, page in PAGED_CASES:
        full = make_spans(rule, [t])
        spans = SpanMask(full.lo[-chunk:].contiguous(), full.hi[-chunk:].contiguous(),
                         torch.tensor([0, chunk], device="cuda"), cu_seqlens_k=torch.tensor([0, t], device="cuda"),
                         total_keys=t)
        q, k, v = inputs(chunk, t, hq, hkv, torch.bfloat16)
        pages = t // page + 1
        table = torch.randperm(pages, device="cuda")[: t // page].to(torch.int32)[None]
        cache = PagedKVCache.allocate(pages, page, hkv, D, dtype=torch.bfloat16, device="cuda")
        append(cache, k, v, table, spans.cu_seqlens_k, torch.zeros(1, dtype=torch.int64, device="cuda"))
        scale, pairs = D ** -0.5, spans.num_pairs()
        flop = 4 * pairs * D * hq
        sub = torch.cat([torch.arange(0, 64), torch.arange(chunk - 200, chunk)]).cuda()
        ref = rows_reference(q, k, v, spans, sub, scale, [0, hq - 1])
        label = f"hd512 {hq}q/{hkv}kv {chunk} rows over {t // 1024}K keys, {rule}, pages of {page}"
        row = dict(case=label, rule=rule, page_size=page, chunk=chunk, keys=t, pairs=pairs, columns={})
        plans = {b: bidiattn.plan(spans, hq, hkv, D, backend=b, paged=True) for b in ("triton", "gluon")}
        columns = [(f"paged {b}", lambda b=b: paged_attention(q, cache, table, spans, plan=plans[b], validate=False))
                   for b in plans]
        columns.append(("gluon, contiguous keys", lambda: forward_sm90_hd512(q, k, v, spans, scale)[0]))

        def check(out):
            torch.cuda.synchronize()
            for h in (0, hq - 1):
                err, low = max_err(out[sub, h], ref["f32", h][0]), max_err(ref["low", h][0], ref["f32", h][0])
                if not err <= 2 * low + FLOOR:
                    raise RuntimeError(f"wrong result: max abs err {err:.2e} > {2 * low + FLOOR:.2e}")

        for col, fn in columns:
            cell = {}
            measure(cell, fn, check, flop, args)
            row["columns"][col] = cell
        row["gather_ms"] = bench(lambda: gather(cache, table, spans.cu_seqlens_k, t), args.seconds)
        print(label, {c: round(x.get("tflops", 0)) for c, x in row["columns"].items()},
              f"gather {row['gather_ms']:.3f} ms", flush=True)
        rows.append(row)
    meta["seconds"] = round(time.time() - t_start, 1)
    cols = list(rows[0]["columns"])
    lines = [f"# hd512 paged prefill chunk, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}; `{meta['command']}`.", "",
             "TFLOP/s on allowed pairs (4 * pairs * D * Hq), median of CUDA-event-timed calls; every column checked "
             "first on a row subset against fp32 (2x rule). 'paged gluon' includes the gather.", "",
             "| case | " + " | ".join(cols) + " | gather ms |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        cells = [f"{r['columns'][c]['tflops']:.0f}" if "tflops" in r["columns"][c] else "fails" for c in cols]
        lines.append(f"| {r['case']} | " + " | ".join(cells) + f" | {r['gather_ms']:.3f} |")
    errors = [f"- {r['case']}, {c}: {x['error']}" for r in rows for c, x in r["columns"].items() if "error" in x]
    lines += ["", "Errors:", *errors] if errors else []
    if args.out:
        stem = cases.write_results(args.out, _prefix("hd512-paged", args), meta, dict(rows=rows), lines)
        print(f"wrote {args.out}/{stem}.{{md,json}}")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- compile
def compile_cmd(args) -> int:
    from bidiattn.kernels.sm90_wide.offline import main as offline_main

    return offline_main(list(variants(args.variants)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("check", "time", "paged", "passes", "compile"))
    parser.add_argument("--variants", default="n64", help=f"comma-separated kernel configs or 'all' ({', '.join(CONFIGS)})")
    parser.add_argument("--out", default=None, help="directory for the .md/.json results")
    parser.add_argument("--skip", default="", help="peers to leave out: default,triton,flex,sdpa,cudnn,cudnn-fe,ffpa,gluon-bwd")
    parser.add_argument("--backward", action="store_true", help="time: also fwd+bwd of default, triton, ffpa-attn")
    parser.add_argument("--cases", default="", help="time/passes: indices into the 8 cases (default all; passes: 0,1)")
    parser.add_argument("--profile-runs", type=int, default=5, help="passes: profiled backward calls")
    parser.add_argument("--score-regs", default="", help="passes: dV:dK score-warpgroup registers per variant, "
                        "e.g. 120:120,168:136 (default: as shipped)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time: timing budget per column")
    parser.add_argument("--budget", type=float, default=360.0, help="time: after this many seconds only gluon columns run")
    parser.add_argument("--label", default="", help="results file names: hd512[-check|-passes|-paged]-<label>-<device>-<date>")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.command == "compile":
        return compile_cmd(args)
    if not torch.cuda.is_available():
        raise SystemExit("check/time need a CUDA GPU (compile does not)")
    return {"check": check, "time": time_cmd, "paged": paged_cmd, "passes": passes_cmd}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
