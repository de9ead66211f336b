"""Probe forward tile configs for correctness on small odd-length inputs (GPU)."""
import math
import torch
from bidiattn import reference, rules
from bidiattn.kernels.forward import TileConfig, span_attention_forward

ids = torch.zeros(101, dtype=torch.int64)
ids[13:80] = 1
for layer, window in (("sliding", 24), ("full", None)):
    sp = rules.build("gemma4", "official", layer, block_ids=ids, window=window).to("cuda")
    for d in (64, 128, 256):
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(101, h, d, generator=g).half().cuda() for h in (4, 2, 2))
        want = reference.attention(q.float(), k.float(), v.float(), sp)
        for cfg in (TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 1), TileConfig(64, 64, 8, 2), TileConfig(64, 32, 4, 2),
                    TileConfig(32, 64, 4, 2), TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 3)):
            try:
                out, _ = span_attention_forward(q, k, v, sp, 1 / math.sqrt(d), None, config=cfg)
                err = (out.float() - want).abs().max().item()
                rows = ((out.float() - want).abs().amax((1, 2)) > 1e-2).nonzero().flatten().tolist()
                print(layer, d, cfg, f"err {err:.3e}", "bad rows", rows[:10], len(rows))
            except Exception as e:
                print(layer, d, cfg, "FAIL", type(e).__name__, str(e)[:80])
