"""Forward benchmark: check correctness, then time (median of CUDA-event runs) on one GPU.

    python benchmarks/forward.py --out benchmarks/results

Writes forward-<device>-<date>.json and .md. TFLOP/s are counted on spans.num_pairs():
4 * pairs * D * Hq FLOPs (two matmuls, 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import bidiattn
from bidiattn import rules

CASES = [
    # name, tokens, Hq, Hkv, D, image len, image every, family, convention, layer, window
    ("hd128 16K img1092/2048", 16384, 16, 8, 128, 1092, 2048, "gemma3", "official", "full", None),
    ("hd256 16K img256/1024", 16384, 8, 4, 256, 256, 1024, "gemma3", "official", "full", None),
    ("hd256 32K img256/1024", 32768, 8, 4, 256, 256, 1024, "gemma3", "official", "full", None),
    ("hd256 16K sliding W1024", 16384, 8, 4, 256, 256, 1024, "gemma3", "official", "sliding", 1024),
    ("hd512 16K img1092/2048", 16384, 16, 4, 512, 1092, 2048, "gemma3", "official", "full", None),
]


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dev = torch.cuda.get_device_name()
    rows = []
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / ms(lambda: a @ a) / 1e9
    for name, t, hq, hkv, d, img, every, fam, conv, layer, window in CASES:
        ids = torch.zeros(t, dtype=torch.int64, device="cuda")
        for n, s in enumerate(range(every - img, t, every), 1):
            ids[s : s + img] = n
        spans = rules.build(fam, conv, layer, block_ids=ids, window=window)
        pairs = spans.num_pairs()
        flops = 4 * pairs * d * hq
        q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = spans.to_dense()
        qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)))
        ours = bidiattn.attention(q, k, v, spans, backend="triton")
        dense = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).squeeze(0).transpose(0, 1)
        err = ((ours.float() - dense.float()).norm() / dense.float().norm()).item()
        row = dict(case=name, tokens=t, hq=hq, hkv=hkv, head_dim=d, pairs=pairs, rel_err_vs_sdpa_dense=err)
        row["bidiattn_triton_ms"] = ms(lambda: bidiattn.attention(q, k, v, spans, backend="triton"))
        row["sdpa_dense_ms"] = ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask))
        causal_flops = 4 * (t * (t + 1) // 2) * d * hq
        sdpa_causal = ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        row["sdpa_causal_ms"] = sdpa_causal
        for key in ("bidiattn_triton", "sdpa_dense"):
            row[key + "_tflops"] = flops / row[key + "_ms"] / 1e9
        row["sdpa_causal_tflops"] = causal_flops / sdpa_causal / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
        del mask, qt, kt, vt
        torch.cuda.empty_cache()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # The GPU machine gets a copy of the tree without .git: pass the hash in BIDIATTN_COMMIT there.
    commit = commit or os.environ.get("BIDIATTN_COMMIT", "")
    meta = dict(device=dev, date=datetime.date.today().isoformat(), torch=torch.__version__, triton=triton.__version__,
                commit=commit or "unknown", bf16_matmul_tflops=peak, command="python benchmarks/forward.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"forward-{dev.replace(' ', '_')}-{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [f"# Forward, {dev}, {meta['date']}", "", f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, "
             f"bf16 matmul {peak:.0f} TFLOP/s. TFLOP/s on allowed pairs (SDPA causal: on causal pairs).", "",
             "| case | rel err | bidiattn triton | SDPA dense mask | SDPA causal |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['rel_err_vs_sdpa_dense']:.1e} | {r['bidiattn_triton_tflops']:.0f} ({r['bidiattn_triton_ms']:.2f} ms) "
                     f"| {r['sdpa_dense_tflops']:.0f} ({r['sdpa_dense_ms']:.2f} ms) | {r['sdpa_causal_tflops']:.0f} ({r['sdpa_causal_ms']:.2f} ms) |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
