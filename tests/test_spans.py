"""SpanMask: validation, dense view, pair counts and the per-tile summary."""

from __future__ import annotations

import random

import pytest
import torch

from bidiattn import SpanMask, rules
from conftest import assert_longest_first, random_packed_layout


def t(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


def test_dense_is_false_across_sequences_and_counts_pairs():
    spans = SpanMask(t([0, 0, 0, 0, 1]), t([0, 2, 2, 0, 1]), torch.tensor([0, 3, 5]))
    dense = spans.to_dense()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(dense, expected)
    assert spans.num_pairs() == 9 == int(dense.sum())


@pytest.mark.parametrize(
    "lo,hi,cu,exc,match",
    [
        ([0, 2, 1], [0, 2, 2], None, ValueError, "row 1 .*lo=2, hi=2; lo must be <= the row's own position"),
        ([0, 0, 0], [0, 0, 2], None, ValueError, "row 1 .*hi must be >= the row's own position"),
        ([0, 0, 0], [0, 1, 3], None, ValueError, "row 2 .*hi=3; hi must be inside the sequence"),
        ([0, 0, 0, 0], [0, 1, 3, 3], [0, 2, 4], ValueError, "row 2 .*sequence 1, position 0.*hi must be inside"),
        ([-1, 0, 0], [0, 1, 2], None, ValueError, "row 0 .*lo=-1"),
        ([0, 1, 0], [0, 1, 2], None, ValueError, "lo must be non-decreasing.*row 1 has lo=1 but row 2 has lo=0"),
        ([0, 0, 0], [2, 1, 2], None, ValueError, "hi must be non-decreasing.*row 0 has hi=2 but row 1 has hi=1"),
        ([0, 0], [0, 1, 2], None, ValueError, "same length"),
        ([0.0, 0.0], [0.0, 1.0], None, TypeError, "int32 or int64"),
        ([], [], None, ValueError, "at least one row"),
        ([0, 0, 0], [0, 1, 2], [0, 2], ValueError, "end at T=3"),
        ([0, 0, 0], [0, 1, 2], [1, 3], ValueError, "start at 0"),
    ],
)
def test_invalid_spans_name_the_offending_row(lo, hi, cu, exc, match):
    dtype = torch.float32 if lo and isinstance(lo[0], float) else torch.int32
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    with pytest.raises(exc, match=match):
        SpanMask(t(lo, dtype), t(hi, dtype), cu_t)


def test_type_errors():
    with pytest.raises(TypeError, match="share a dtype"):
        SpanMask(t([0, 0]), t([0, 1], torch.int64))
    with pytest.raises(TypeError, match="cu_seqlens must be int64"):
        SpanMask(t([0, 0]), t([0, 1]), torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        SpanMask([0, 0], t([0, 1]))


def test_validate_false_skips_the_data_checks():
    # Documented escape hatch for CUDA graphs: no data-dependent checks, so no host sync.
    spans = SpanMask(t([0, 5]), t([0, 1]), validate=False)
    assert spans.total_tokens == 2


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("block_m", [1, 3, 16, 64])
def test_tile_summary_matches_brute_force(seed, block_m):
    ids, cu = random_packed_layout(random.Random(seed), max_seqs=4, max_len=70)
    spans = rules.build("gemma3", "official", "sliding", block_ids=ids, window=5, cu_seqlens=cu)
    tiles = spans.tile_summary(block_m)
    expected = []
    for b in range(len(cu) - 1):
        start, end = int(cu[b]), int(cu[b + 1])
        for r in range(start, end, block_m):
            lo, hi = spans.lo[r : min(end, r + block_m)], spans.hi[r : min(end, r + block_m)]
            expected.append((b, r - start, len(lo), int(lo.min()), int(lo.max()), int(hi.min()), int(hi.max())))
    assert int(tiles.num_tiles) == len(expected)
    capacity = -(-spans.total_tokens // block_m) + spans.num_sequences
    assert tiles.rows.numel() == capacity
    got = list(zip(*(x.tolist() for x in (tiles.seq, tiles.row_start, tiles.rows, tiles.lo_min, tiles.lo_max, tiles.hi_min, tiles.hi_max))))
    assert got[: len(expected)] == expected
    assert all(row[2] == 0 for row in got[len(expected) :])


def test_tile_summary_rejects_bad_block_m():
    spans = SpanMask(t([0]), t([0]))
    with pytest.raises(ValueError, match="block_m must be a positive int, got 0"):
        spans.tile_summary(0)


@pytest.mark.gpu
def test_build_on_cuda_matches_cpu_without_sync():
    ids, cu = random_packed_layout(random.Random(3), max_seqs=4, max_len=300)
    cpu = rules.build("gemma4", "official", "sliding", block_ids=ids, window=17, cu_seqlens=cu)
    ids, cu = ids.cuda(), cu.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = rules.build("gemma4", "official", "sliding", block_ids=ids, window=17, cu_seqlens=cu, validate=False)
        tiles = gpu.tile_summary(64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(gpu.lo.cpu(), cpu.lo) and torch.equal(gpu.hi.cpu(), cpu.hi)
    assert torch.equal(tiles.hi_max.cpu(), cpu.tile_summary(64).hi_max)


@pytest.mark.parametrize("seed", range(8))
def test_query_tiles_equal_the_spec(seed):
    pytest.importorskip("triton", reason="triton is not installed")
    from bidiattn.kernels.tiles import query_tiles

    rng = random.Random(seed)
    ids, cu = random_packed_layout(rng, max_seqs=rng.choice([1, 3, 9]), max_len=120)
    spans = rules.build("gemma3", "official", rng.choice(["sliding", "full"]), block_ids=ids,
                        window=rng.randint(1, 30), cu_seqlens=cu)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    longest = int((cu[1:] - cu[:-1]).max())
    for block in (16, 64, 128):
        want, (got, order) = spans.tile_summary(block), query_tiles(spans.to(device), block)
        for name in ("seq", "row_start", "rows", "lo_min", "lo_max", "hi_min", "hi_max", "num_tiles"):
            assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), (name, block)
        work = torch.where(want.rows > 0, want.hi_max - want.lo_min + 1, 0)
        assert_longest_first(order.cpu(), work, longest)
