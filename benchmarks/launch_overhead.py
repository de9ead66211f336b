"""Where the fixed cost of a decode call goes (host time per call, 200 calls, GPU synchronized)."""
import time

import torch

from bidiattn import rules
from bidiattn.kernels import forward as fw
from bidiattn.kernels.tiles import query_tiles
from bidiattn.spans import SpanMask

ctx, hq, hkv, d = 8192, 16, 8, 128
k, v = (torch.randn(ctx, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
full = rules.build("gemma3", "official", "full", block_ids=torch.zeros(ctx, dtype=torch.int64, device="cuda"), validate=False)
spans = SpanMask(full.lo[-1:], full.hi[-1:], torch.tensor([0, 1], device="cuda"), validate=False,
                 cu_seqlens_k=torch.tensor([0, ctx], device="cuda"), total_keys=ctx)
cfg = fw.TileConfig(16, 64, 4, 2, kv_splits=1)


def timed(name, fn, n=200):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    print(f"{name:<28} {1e6 * (time.perf_counter() - t0) / n:8.1f} us/call")


plan = fw.plan_forward(spans, hq, hkv, d, config=cfg)
timed("spans.tile_summary (spec)", lambda: spans.tile_summary(16))
timed("query_tiles (planning)", lambda: query_tiles(spans, 16))
timed("plan_forward", lambda: fw.plan_forward(spans, hq, hkv, d, config=cfg))
timed("span_attention_forward, plan", lambda: fw.span_attention_forward(q, k, v, spans, d**-0.5, None, plan=plan))
timed("span_attention_forward", lambda: fw.span_attention_forward(q, k, v, spans, d**-0.5, None, config=cfg))
timed("cuda.get_device_properties", lambda: torch.cuda.get_device_properties(q.device).multi_processor_count)
