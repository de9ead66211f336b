"""End-to-end runner: chunked prefill and decode over paged caches equal one-shot runs.

Both sides run the kernels in bf16 through 3 residual layers, so they may differ by a couple of
bf16 ulps of the hidden states (rtol 2e-2); a wrong mask or page moves whole rows."""

from __future__ import annotations

import random

import pytest
import torch

from bidiattn.serving.runner import AttentionStack, ServingSession, StackConfig

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def prompt(rng, length):
    ids, pos, n = torch.zeros(length, dtype=torch.int64), 0, 1
    while pos < length:
        pos += rng.randint(1, 9)
        size = rng.choice([2, 7, 15, 26])  # some longer than the window, some than the budget
        ids[pos : pos + size] = n
        n, pos = n + 1, pos + size
    return ids


@pytest.mark.parametrize("seed,budget", [(0, 10), (1, 24), (2, 64)])
def test_chunked_prefill_then_decode_equals_one_shot(seed, budget):
    rng = random.Random(seed)
    config = StackConfig(layer_types=("sliding", "full", "sliding"), window=6)
    stack = AttentionStack(config, seed=seed, device=DEVICE)
    prompts = [prompt(rng, rng.randint(8, 60)) for _ in range(3)]
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(p.numel(), config.hidden, generator=g).to(DEVICE, config.dtype) for p in prompts]
    session = ServingSession(stack, prompts, page_size=8, max_tokens_per_request=80)
    got = session.prefill(xs, budget)
    for x, ids, out in zip(xs, prompts, got):
        torch.testing.assert_close(out.float(), stack.one_shot(x, ids).float(), atol=3e-2, rtol=2e-2)
    # Decode 5 steps; each new row must equal the last row of a one-shot run over the longer prompt.
    for _ in range(5):
        new = torch.randn(len(xs), config.hidden, generator=g).to(DEVICE, config.dtype)
        h = session.decode(new)
        for r in range(len(xs)):
            xs[r] = torch.cat([xs[r], new[r : r + 1]])
            prompts[r] = torch.cat([prompts[r], prompts[r].new_zeros(1)])
            torch.testing.assert_close(h[r].float(), stack.one_shot(xs[r], prompts[r])[-1].float(), atol=3e-2, rtol=2e-2)


def test_limits_are_errors():
    stack = AttentionStack(StackConfig(), device=DEVICE)
    session = ServingSession(stack, [torch.zeros(10, dtype=torch.int64)], max_tokens_per_request=8)
    with pytest.raises(ValueError, match="longer than max_tokens_per_request=8"):
        session.prefill([torch.randn(10, 64).to(DEVICE, torch.bfloat16)], budget=4)
    session = ServingSession(stack, [torch.zeros(4, dtype=torch.int64)])
    session.prefill([torch.randn(4, 64).to(DEVICE, torch.bfloat16)], budget=4)
    with pytest.raises(ValueError, match=r"x must be \[B=1, hidden=64\], got \(2, 64\)"):
        session.decode(torch.randn(2, 64).to(DEVICE, torch.bfloat16))
    with pytest.raises(ValueError, match="prefill got 2 prompts for 1 requests"):
        session.prefill([torch.randn(4, 64).to(DEVICE, torch.bfloat16)] * 2, budget=4)
    with pytest.raises(ValueError, match=r"request 0: x must be \[T=4, hidden=64\] \(the length of its block ids\), "
                                         r"got \(5, 64\)"):
        session.prefill([torch.randn(5, 64).to(DEVICE, torch.bfloat16)], budget=4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads=3"):
        StackConfig(num_q_heads=4, num_kv_heads=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA notion")
def test_serving_steps_issue_no_host_sync():
    """A step's offsets reach the GPU through pinned memory and the kernels run unvalidated (the
    session checked its inputs on the host), so the host can queue the next step's work while the
    GPU runs this one."""
    rng = random.Random(7)
    config = StackConfig(layer_types=("sliding", "full"), window=6)
    stack = AttentionStack(config, device="cuda")
    prompts = [prompt(rng, 40), prompt(rng, 33)]
    xs = [torch.randn(p.numel(), config.hidden, device="cuda", dtype=config.dtype) for p in prompts]
    session = ServingSession(stack, prompts, page_size=8, max_tokens_per_request=64)
    new = torch.randn(2, config.hidden, device="cuda", dtype=config.dtype)
    session.prefill(xs, 16)  # compiles the kernels first
    session.decode(new)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        session.prefill(xs, 16)
        session.decode(new)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graphs_need_a_cuda_stack():
    stack = AttentionStack(StackConfig(), device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs needs the stack on a CUDA device, it is on cpu"):
        ServingSession(stack, [torch.zeros(4, dtype=torch.int64)], cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_steps_equal_one_shot_and_decode_replays_one_graph():
    """Each step shape is captured once, then replayed with the step's hidden states and offsets
    copied in: prefill twice (the second run replays every chunk's graph), then decode steps whose
    cache lengths change at every replay of their one graph."""
    rng = random.Random(3)
    config = StackConfig(layer_types=("sliding", "full", "sliding"), window=6)
    stack = AttentionStack(config, seed=3, device="cuda")
    prompts = [prompt(rng, rng.randint(20, 60)) for _ in range(3)]
    xs = [torch.randn(p.numel(), config.hidden, device="cuda", dtype=config.dtype) for p in prompts]
    session = ServingSession(stack, prompts, page_size=8, max_tokens_per_request=80, cuda_graphs=True)
    for _ in range(2):
        got = session.prefill(xs, 24)
        for x, ids, out in zip(xs, prompts, got):
            torch.testing.assert_close(out.float(), stack.one_shot(x, ids).float(), atol=3e-2, rtol=2e-2)
    prefill_graphs = len(session.graphs)
    for _ in range(4):
        new = torch.randn(len(xs), config.hidden, device="cuda", dtype=config.dtype)
        h = session.decode(new)
        for r in range(len(xs)):
            xs[r] = torch.cat([xs[r], new[r : r + 1]])
            prompts[r] = torch.cat([prompts[r], prompts[r].new_zeros(1)])
            torch.testing.assert_close(h[r].float(), stack.one_shot(xs[r], prompts[r])[-1].float(), atol=3e-2, rtol=2e-2)
    assert len(session.graphs) == prefill_graphs + 1
