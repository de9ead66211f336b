"""Bidirectional blocks as a list of intervals per sequence: the compact layout a serving step
builds its spans from.

Per-token ``block_ids`` (what :func:`bidiattn.rules.build` takes) need a scan to find each
token's block, about 40 PyTorch ops (benchmarks/PERF.md, row L4). An engine already knows
where its images are: a request's blocks as ``(start, end)`` pairs. Given those, each query row
finds its block with a binary search, so a step's spans come out of one kernel launch
(:func:`bidiattn.rules.build_from_blocks`) with no host sync, from buffers of fixed size.

Layout (packed over the ``B`` sequences of a step, positions local to each sequence)::

    starts, ends   int32 [capacity]   block j covers key positions starts[j] .. ends[j] - 1
    cu_blocks      int64 [B + 1]      sequence b owns entries cu_blocks[b] .. cu_blocks[b+1] - 1

Entries past ``cu_blocks[-1]`` are ignored (spare capacity of a static buffer). A sequence may
list blocks that lie beyond the keys of the current step (a request's whole layout, passed
unchanged at every step): rows never reach them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .spans import _first_true, host_to_device

__all__ = ["BlockList"]


@dataclass(frozen=True)
class BlockList:
    """Blocks of each packed sequence as sorted, non-overlapping ``[start, end)`` intervals.

    Args:
        starts, ends: int32 ``[capacity]``, local key positions, ``end`` exclusive.
        cu_blocks: int64 ``[B+1]``, ``cu_blocks[0] == 0``, non-decreasing, at most ``capacity``.

    Checked at construction: types, shapes, one device (no host sync). :meth:`check` reads the
    values (host sync on CUDA).
    """

    starts: torch.Tensor
    ends: torch.Tensor
    cu_blocks: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("starts", "ends"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"BlockList.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32 or t.dim() != 1:
                raise TypeError(f"BlockList.{name} must be int32 [capacity], got {t.dtype} {tuple(t.shape)}")
        if self.starts.shape != self.ends.shape:
            raise ValueError(f"BlockList.starts and ends differ in length: {self.starts.numel()} vs {self.ends.numel()}")
        if not isinstance(self.cu_blocks, torch.Tensor) or self.cu_blocks.dtype != torch.int64 or self.cu_blocks.dim() != 1:
            raise TypeError("BlockList.cu_blocks must be an int64 tensor of shape [B+1]")
        if self.cu_blocks.numel() < 2:
            raise ValueError(f"BlockList.cu_blocks must have shape [B+1] with B >= 1, got {tuple(self.cu_blocks.shape)}")
        devices = {self.starts.device, self.ends.device, self.cu_blocks.device}
        if len(devices) != 1:
            raise ValueError(f"BlockList tensors must be on one device, got {sorted(map(str, devices))}")

    @property
    def capacity(self) -> int:
        return self.starts.numel()

    @property
    def num_sequences(self) -> int:
        return self.cu_blocks.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.starts.device

    @classmethod
    def from_pairs(cls, blocks: Sequence[Sequence[tuple[int, int]]], device: torch.device | str = "cpu",
                   capacity: int | None = None) -> BlockList:
        """From Python lists: ``blocks[b]`` = the ``(start, end)`` pairs of sequence ``b``.
        ``capacity`` pads the buffers (default: the number of blocks, at least 1)."""
        flat = [pair for seq in blocks for pair in seq]
        for b, seq in enumerate(blocks):
            for pair in seq:
                if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
                    raise ValueError(f"sequence {b}: a block must be a (start, end) pair of ints, got {pair!r}")
        size = max(1, len(flat)) if capacity is None else capacity
        if isinstance(size, bool) or not isinstance(size, int) or size < max(1, len(flat)):
            raise ValueError(f"capacity must be an int >= the {len(flat)} blocks given, got {capacity!r}")
        starts = torch.zeros(size, dtype=torch.int32)
        ends = torch.zeros(size, dtype=torch.int32)
        if flat:
            starts[: len(flat)] = torch.tensor([s for s, _ in flat], dtype=torch.int32)
            ends[: len(flat)] = torch.tensor([e for _, e in flat], dtype=torch.int32)
        cu = torch.tensor([0, *[len(seq) for seq in blocks]], dtype=torch.int64).cumsum(0)
        return cls(*(host_to_device(x, device) for x in (starts, ends, cu)))

    def check(self, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor) -> None:
        """Check the blocks against a step's rows (host sync): ``ValueError`` naming the block.

        ``cu_seqlens``/``cu_seqlens_k`` are the step's query and key offsets; the query rows of
        sequence ``b`` are the last ``q_len`` of its ``k_len`` keys. Blocks must be sorted and
        non-overlapping with ``0 <= start < end``; a block may lie wholly past ``k_len`` (not
        reached yet) but may not straddle ``k_len`` (the step would end inside it) nor the
        step's first row (the block's earlier rows, computed in an earlier step, missed keys).
        """
        if self.cu_blocks.numel() != cu_seqlens.numel():
            raise ValueError(f"BlockList has {self.num_sequences} sequences, the step {cu_seqlens.numel() - 1}")
        cu = self.cu_blocks.cpu()
        if int(cu[0]) != 0 or int(cu[-1]) > self.capacity:
            raise ValueError(f"cu_blocks must start at 0 and end at most at capacity {self.capacity}, got "
                             f"{int(cu[0])} .. {int(cu[-1])}")
        b = _first_true(cu[1:] < cu[:-1])
        if b is not None:
            raise ValueError(f"cu_blocks must be non-decreasing: sequence {b} has {int(cu[b + 1] - cu[b])} blocks")
        n = int(cu[-1])
        if n == 0:
            return
        starts, ends = self.starts[:n].cpu().long(), self.ends[:n].cpu().long()
        seq = torch.searchsorted(cu[1:], torch.arange(n), right=True)
        k_len = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).cpu()[seq]
        first_row = k_len - (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()[seq]

        def where(j: int) -> str:
            return f"block {j} = [{int(starts[j])}, {int(ends[j])}) of sequence {int(seq[j])}"

        j = _first_true((starts < 0) | (ends <= starts))
        if j is not None:
            raise ValueError(f"{where(j)} must satisfy 0 <= start < end")
        same = seq[1:] == seq[:-1]
        j = _first_true(same & (starts[1:] < ends[:-1]))
        if j is not None:
            raise ValueError(f"{where(j + 1)} overlaps or precedes {where(j)}: blocks must be sorted, non-overlapping")
        j = _first_true((starts < k_len) & (ends > k_len))
        if j is not None:
            raise ValueError(f"{where(j)} straddles the end of the step's {int(k_len[j])} keys: "
                             "a step must not end inside a block (see bidiattn.serving.prefill)")
        j = _first_true((starts < first_row) & (ends > first_row))
        if j is not None:
            raise ValueError(f"{where(j)} straddles the step's first row {int(first_row[j])}: its earlier rows "
                             "were computed without its later keys (see bidiattn.serving.prefill)")

    def token_extents(self, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, total: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(position, start, end, in_block)`` of every query row, int64 ``[T]`` (``end``
        inclusive; a row outside any block gets its own position). Vectorized, no host sync.

        The blocks' packed key positions (start + the sequence's key offset) are sorted across
        the whole pack, so one ``searchsorted`` finds every row's candidate block.
        """
        device = cu_seqlens.device
        rows = torch.arange(total, device=device, dtype=torch.int64)
        seq = torch.searchsorted(cu_seqlens[1:], rows, right=True)
        k_len = cu_seqlens_k[seq + 1] - cu_seqlens_k[seq]
        pos = rows - cu_seqlens[seq] + k_len - (cu_seqlens[seq + 1] - cu_seqlens[seq])
        slots = torch.arange(self.capacity, device=device, dtype=torch.int64)
        used = slots < self.cu_blocks[-1]
        block_seq = torch.searchsorted(self.cu_blocks[1:], slots, right=True).clamp_max(self.num_sequences - 1)
        # Sorted over the pack: blocks past their sequence's keys are clamped to its end (they
        # may tie with the next sequence's first block, which then wins: searchsorted takes the
        # last tie) and unused slots sort past every real key position.
        block_k_len = cu_seqlens_k[block_seq + 1] - cu_seqlens_k[block_seq]
        past = cu_seqlens_k[-1] + 1
        g_start = torch.where(used, torch.minimum(self.starts.long(), block_k_len) + cu_seqlens_k[block_seq], past)
        g_end = self.ends.long() + cu_seqlens_k[block_seq]
        g_pos = pos + cu_seqlens_k[seq]
        j = torch.searchsorted(g_start, g_pos, right=True) - 1
        jc = j.clamp_min(0)
        in_block = (j >= 0) & (g_pos < g_end[jc]) & (block_seq[jc] == seq) & used[jc]
        start = torch.where(in_block, self.starts.long()[jc], pos)
        end = torch.where(in_block, self.ends.long()[jc] - 1, pos)
        return pos, start, end, in_block
