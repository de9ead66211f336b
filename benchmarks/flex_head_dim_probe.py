import torch, bidiattn
from bidiattn import rules
for d in (16, 32, 64):
    for t in (70, 256):
        ids = torch.zeros(t, dtype=torch.int64, device="cuda"); ids[10:30] = 1
        sp = rules.build("gemma3", "official", "full", block_ids=ids)
        q = torch.randn(t, 2, d, device="cuda", dtype=torch.bfloat16)
        try:
            bidiattn.attention(q, q[:, :1], q[:, :1], sp, backend="flex"); print("flex ok", d, t)
        except Exception as e:
            print("flex FAIL", d, t, type(e).__name__)
