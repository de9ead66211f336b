"""GPU only: spans built and attention run inside one captured CUDA graph, replayed with new
layouts; and a 128K-token prompt allocates nothing of N^2 size."""

from __future__ import annotations

import pytest
import torch

import bidiattn
from bidiattn import reference, rules
from bidiattn.serving.graphs import capture
from bidiattn.spans import SpanMask

pytest.importorskip("triton", reason="triton is not installed")


def layout(t: int, starts: list[int], length: int) -> torch.Tensor:
    ids = torch.zeros(t, dtype=torch.int64)
    for n, s in enumerate(starts, 1):
        ids[s : s + length] = n
    return ids


@pytest.mark.gpu
def test_prefill_and_decode_steps_replay_with_new_layouts():
    t, hq, hkv, d, window = 700, 8, 2, 128, 64
    cu = torch.tensor([0, 300, t], device="cuda")  # two packed sequences (static)
    ids = torch.zeros(t, dtype=torch.int64, device="cuda")
    q, k, v = (torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    # Decode: one new token per sequence over its whole prefix.
    cu_q1 = torch.tensor([0, 1, 2], device="cuda")
    lo1 = torch.zeros(2, dtype=torch.int32, device="cuda")
    hi1 = torch.zeros(2, dtype=torch.int32, device="cuda")
    q1 = torch.randn(2, hq, d, device="cuda", dtype=torch.bfloat16)

    def step():
        spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=window, cu_seqlens=cu, validate=False)
        prefill = bidiattn.attention(q, k, v, spans, backend="triton")
        dec = SpanMask(lo1, hi1, cu_q1, validate=False, cu_seqlens_k=cu, total_keys=t)
        return prefill, bidiattn.attention(q1, k, v, dec, backend="triton")

    graph, (out_prefill, out_decode) = capture(step)

    for starts_a, starts_b, n in (([10, 100], [320, 500], 40), ([0], [300], 250), ([50, 150, 250], [400], 90)):
        new_ids = torch.cat([layout(300, starts_a, n), layout(400, [s - 300 for s in starts_b], n) * 10])
        ids.copy_(new_ids)
        for x in (q, k, v, q1):
            x.copy_(torch.randn_like(x))
        lo1.copy_(torch.tensor([300 - window, 400 - window], dtype=torch.int32))  # text rows at the last position
        hi1.copy_(torch.tensor([299, 399], dtype=torch.int32))
        graph.replay()
        want_prefill, want_decode = step()
        assert torch.equal(out_prefill, want_prefill)
        assert torch.equal(out_decode, want_decode)
        spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=window, cu_seqlens=cu)
        torch.testing.assert_close(out_prefill.float(), reference.attention(q, k, v, spans).float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_128k_prompt_allocates_nothing_quadratic():
    t, hq, hkv, d = 131072, 8, 4, 128
    ids = layout(t, list(range(1000, t, 4096)), 1092).cuda()
    q, k, v = (torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for layer in ("full", "sliding"):
        spans = rules.build("gemma3", "official", layer, block_ids=ids, window=1024, validate=False)
        out = bidiattn.attention(q, k, v, spans, backend="triton")
        del out, spans
    extra = torch.cuda.max_memory_allocated() - base
    # The output (256 MiB) and O(T) metadata; a dense bool mask alone would be 16 GiB.
    assert extra < 512 * 2**20, extra


@pytest.mark.gpu
def test_serving_step_from_block_lists_replays_with_new_layouts():
    # One prefill-chunk step of 3 requests, as an engine captures it: static buffers for the
    # block lists (capacity 8), offsets and the query rows; spans built by the block-list kernel,
    # one launch plan, two layers over it. Replayed with layouts whose block counts, chunk sizes
    # and cache lengths all change; no host sync inside the step.
    from bidiattn.blocks import BlockList
    from bidiattn.kernels.forward import span_attention_forward
    from bidiattn.launch import plan_forward

    hq, hkv, d, total, keys_per_seq = 8, 2, 128, 96, 400
    starts = torch.zeros(8, dtype=torch.int32, device="cuda")
    ends = torch.zeros(8, dtype=torch.int32, device="cuda")
    cu_blocks = torch.zeros(4, dtype=torch.int64, device="cuda")
    cu_q = torch.zeros(4, dtype=torch.int64, device="cuda")
    cu_k = torch.zeros(4, dtype=torch.int64, device="cuda")
    blocks = BlockList(starts, ends, cu_blocks)
    q = torch.randn(total, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(3 * keys_per_seq, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def step():
        outs = []
        for layer in ("sliding", "full"):
            spans = rules.build_from_blocks("gemma3", "official", layer, blocks=blocks, cu_seqlens=cu_q,
                                            total_tokens=total, window=64, cu_seqlens_k=cu_k,
                                            total_keys=3 * keys_per_seq, validate=False)
            plan = plan_forward(spans, hq, hkv, d)
            outs += [span_attention_forward(q, k, v, spans, d**-0.5, None, plan=plan)[0] for _ in range(2)]
        return outs

    def load(pairs, q_lens, k_lens):
        flat = [p for seq in pairs for p in seq]
        starts.zero_(), ends.zero_()
        starts[: len(flat)] = torch.tensor([s for s, _ in flat], dtype=torch.int32)
        ends[: len(flat)] = torch.tensor([e for _, e in flat], dtype=torch.int32)
        cu_blocks.copy_(torch.tensor([0, *map(len, pairs)]).cumsum(0))
        cu_q.copy_(torch.tensor([0, *q_lens]).cumsum(0))
        # Keys of each sequence live in its own stretch of keys_per_seq rows; only k_len are used.
        cu_k.copy_(torch.tensor([0, *k_lens]).cumsum(0))

    # k_len sums to 3 * keys_per_seq in every layout, so total_keys is static.
    layouts = [
        ([[(10, 50)], [(0, 30), (100, 200)], []], [32, 32, 32], [300, 400, 500]),
        ([[], [(5, 9), (9, 20), (320, 390)], [(40, 60)]], [10, 80, 6], [350, 390, 460]),
        ([[(0, 300)], [], [(2, 3)]], [1, 94, 1], [399, 500, 301]),
    ]
    load(*layouts[0])
    graph, outs = capture(step, forbid_sync=True)
    for pairs, q_lens, k_lens in layouts:
        load(pairs, q_lens, k_lens)
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
        graph.replay()
        for got, want in zip(outs, step()):
            assert torch.equal(got, want)
        spans = rules.build_from_blocks("gemma3", "official", "sliding", blocks=blocks, cu_seqlens=cu_q,
                                        total_tokens=total, window=64, cu_seqlens_k=cu_k, total_keys=3 * keys_per_seq)
        torch.testing.assert_close(outs[0].float(), reference.attention(q, k, v, spans).float(), atol=2e-2, rtol=0)
