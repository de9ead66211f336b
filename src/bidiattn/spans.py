"""Span masks: one contiguous key interval per query row.

Every mask bidiattn supports is stored as two integer arrays, ``lo`` and ``hi``: query row
``i`` of a sequence may attend exactly the keys ``lo[i] <= k <= hi[i]`` of the same sequence.
For the masks of causal and prefix/bidirectional-block models both arrays are non-decreasing
along a sequence, which is what lets a kernel skip whole tiles and what makes the per-key-tile
query ranges of a backward pass contiguous. Memory is O(T) instead of O(T^2).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

__all__ = ["SpanMask", "TileSummary", "sequence_index"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _first_true(flags: torch.Tensor) -> int | None:
    """Index of the first True of a 1-D bool tensor, or None (host sync: validation only)."""
    hits = torch.nonzero(flags)
    return int(hits[0, 0]) if hits.numel() else None


def as_int(value: object, name: str) -> int:
    """``value`` as a Python int: ints and integer scalars such as ``numpy.int64`` (anything with
    ``__index__``) pass; bools, floats and the rest raise ``TypeError`` naming the value."""
    if type(value) is int:  # the common case, first: plans check several sizes per call
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` with no host sync: to a GPU through pinned memory, which the
    caching host allocator keeps until the copy has run (a plain ``.to("cuda")`` of pageable
    memory waits for the stream, so for every kernel queued before it)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def sequence_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence number (int64 ``[total]``) of every packed token, computed on device.

    ``cu_seqlens`` is the int64 ``[B+1]`` prefix sum of sequence lengths. No host sync.
    """
    rows = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], rows, right=True)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, validate: bool, name: str = "cu_seqlens",
                      total_name: str = "T") -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape [B+1] with B >= 1, got {tuple(cu_seqlens.shape)}")
    if not validate:
        return
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(f"{name} must start at 0 and end at {total_name}={total}, got first={first}, last={last}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    bad = _first_true(lengths < 0)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing: sequence {bad} has length {int(lengths[bad])}")


def _tile_layout(cu_seqlens: torch.Tensor, total: int, block: int):
    """Tiles of ``block`` consecutive rows of one sequence over a fixed capacity
    ``ceil(total / block) + B``: int32 ``(seq, start, rows)`` (``rows == 0`` past the real
    tiles), the bool ``real`` mask and the 0-d tile count."""
    block = as_int(block, "block_m")
    if block < 1:
        raise ValueError(f"block_m must be a positive int, got {block!r}")
    num_seq = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    tiles_per_seq = (lengths + block - 1) // block
    tile_offsets = torch.nn.functional.pad(torch.cumsum(tiles_per_seq, 0), (1, 0))
    capacity = -(-total // block) + num_seq
    idx = torch.arange(capacity, device=cu_seqlens.device, dtype=torch.int64)
    seq = torch.searchsorted(tile_offsets[1:], idx, right=True).clamp_max(num_seq - 1)
    start = (idx - tile_offsets[seq]) * block
    real = idx < tile_offsets[-1]
    rows = torch.where(real, (lengths[seq] - start).clamp(0, block), 0)
    return (torch.where(real, seq, 0).to(torch.int32), torch.where(real, start, 0).to(torch.int32),
            rows.to(torch.int32), real, tile_offsets[-1].clone())


@dataclass(frozen=True)
class TileSummary:
    """Per-query-tile bounds of a :class:`SpanMask`, the metadata a tiled kernel reads.

    Tiles are ``block_m`` consecutive rows of one sequence (a tile never crosses a sequence
    boundary). The arrays have a fixed length ``capacity = ceil(T / block_m) + B`` (an upper
    bound of the real tile count that needs no host sync); entries past ``num_tiles`` have
    ``rows == 0`` and zero bounds, so a kernel launched over ``capacity`` programs exits early
    on them and the same launch can be captured in a CUDA graph.

    All bounds are local key positions within the tile's sequence (int32 ``[capacity]``):

    - ``seq``: sequence of the tile; ``row_start``: its first local row; ``rows``: rows in it.
    - ``lo_min``/``lo_max``/``hi_min``/``hi_max``: min/max of ``lo`` and ``hi`` over its rows.
      Keys in ``[lo_max, hi_min]`` are allowed for every row of the tile (no mask math needed
      there); keys outside ``[lo_min, hi_max]`` are allowed for none (skip them).
    - ``num_tiles``: 0-d int64 tensor, the number of real tiles.
    """

    block_m: int
    seq: torch.Tensor
    row_start: torch.Tensor
    rows: torch.Tensor
    lo_min: torch.Tensor
    lo_max: torch.Tensor
    hi_min: torch.Tensor
    hi_max: torch.Tensor
    num_tiles: torch.Tensor


@dataclass(frozen=True)
class SpanMask:
    """An attention mask stored as one inclusive key interval per query row.

    Row ``i`` (packed index) of sequence ``b`` may attend keys ``lo[i] <= k <= hi[i]``, where
    positions are local to the sequence (0 is its first token). Packed sequences never see each
    other. Example, one sequence of 8 tokens with an image block at positions 2..4::

        row  lo hi   keys 0..7
          0   0  0   x.......
          1   0  1   xx......
          2   0  4   xxxxx...     <- image rows see the whole block
          3   0  4   xxxxx...
          4   0  4   xxxxx...
          5   0  5   xxxxxx..
          6   0  6   xxxxxxx.
          7   0  7   xxxxxxxx

    Args:
        lo: int32 or int64 ``[T]``, first allowed key of each row.
        hi: same dtype and shape as ``lo``, last allowed key of each row (inclusive).
        cu_seqlens: int64 ``[B+1]``, prefix sums of the sequence lengths; ``None`` means one
            sequence of ``T`` tokens. Must be on the same device as ``lo``. A length may be 0
            (an engine's empty batch slot): that sequence has no rows.
        validate: check the invariants below. It reads the data, so on CUDA it synchronizes
            the host; pass ``False`` inside CUDA-graph capture or a hot loop when the spans come
            from :func:`bidiattn.rules.build`, which produces valid spans by construction.
        cu_seqlens_k, total_keys: extend/decode spans, where each sequence's query rows are
            the *last* ``q_len`` of its ``k_len`` keys (a prefill chunk or decode step over a
            cache): int64 ``[B+1]`` key offsets and their total (an int, so that no host sync
            is needed to size buffers; with ``validate=False`` an upper bound of it also works,
            as in a captured step whose key counts change between replays: it sizes the key
            tiles and the split-KV count, and ``to_dense`` gets all-False columns past the end).
            ``lo``/``hi`` are then key positions local to the sequence, and row ``i`` of a
            sequence sits at position ``k_len - q_len + i``.
            ``None`` (the default): keys are the query rows themselves.
        window: the sliding window the spans were cut with, if any (:func:`bidiattn.rules.build`
            records the window its rule applied). A hint, never the mask (``lo``/``hi`` are):
            plans read it to pick tile shapes, e.g. the FA4 masked launch's key tile at head
            dim 256. ``None``: no window, or not known (the plans then pick full-layer tiles).

    Invariants (checked when ``validate``): ``lo <= position <= hi``, ``hi`` inside the
    sequence's keys, ``lo`` and ``hi`` non-decreasing inside each sequence, ``k_len >= q_len``.
    A violation raises ``ValueError`` naming the first offending row and its values; wrong
    types raise ``TypeError``.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    validate: bool = True
    cu_seqlens_k: torch.Tensor | None = None
    total_keys: int | None = None
    window: int | None = field(default=None, compare=False)
    # Launch plans of calls made without one (bidiattn.launch.planned), by head shape and
    # backend; spans never change, so a plan stays valid for the object's lifetime.
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.validate, bool):
            raise TypeError(f"SpanMask.validate must be a bool, got {self.validate!r}")
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"SpanMask.{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dtype not in _INDEX_DTYPES:
                raise TypeError(f"SpanMask.{name} must be int32 or int64, got {value.dtype}")
            if value.dim() != 1:
                raise ValueError(f"SpanMask.{name} must have shape [T], got {tuple(value.shape)}")
        if self.lo.dtype != self.hi.dtype:
            raise TypeError(f"SpanMask.lo and hi must share a dtype, got {self.lo.dtype} and {self.hi.dtype}")
        if self.lo.shape != self.hi.shape:
            raise ValueError(f"SpanMask.lo and hi must have the same length, got {self.lo.numel()} and {self.hi.numel()}")
        if self.lo.device != self.hi.device:
            raise ValueError(f"SpanMask.lo and hi must be on one device, got {self.lo.device} and {self.hi.device}")
        if self.lo.numel() == 0:
            raise ValueError("SpanMask needs at least one row (T >= 1)")
        if self.window is not None:
            window = as_int(self.window, "SpanMask.window")
            if window < 1:
                raise ValueError(f"SpanMask.window must be None or a positive int, got {self.window!r}")
            object.__setattr__(self, "window", window)
        if self.cu_seqlens is None:
            object.__setattr__(
                self, "cu_seqlens", torch.tensor([0, self.lo.numel()], dtype=torch.int64, device=self.lo.device)
            )
        _check_cu_seqlens(self.cu_seqlens, self.lo.numel(), self.validate)
        if self.cu_seqlens.device != self.lo.device:
            raise ValueError(f"SpanMask.cu_seqlens is on {self.cu_seqlens.device}, lo/hi on {self.lo.device}")
        self._init_keys()
        if self.validate:
            self._check_invariants()

    def _init_keys(self) -> None:
        if self.cu_seqlens_k is None:
            if self.total_keys is not None and self.total_keys != self.lo.numel():
                raise ValueError(f"SpanMask.total_keys={self.total_keys} needs cu_seqlens_k (self-attention has T keys)")
            object.__setattr__(self, "cu_seqlens_k", self.cu_seqlens)
            object.__setattr__(self, "total_keys", self.lo.numel())
            return
        total_keys = None if self.total_keys is None else as_int(self.total_keys, "SpanMask.total_keys")
        if total_keys is None or total_keys < 1:
            raise ValueError(f"SpanMask.total_keys must be a positive int with cu_seqlens_k, got {self.total_keys!r}")
        object.__setattr__(self, "total_keys", total_keys)
        _check_cu_seqlens(self.cu_seqlens_k, self.total_keys, self.validate, "cu_seqlens_k", "total_keys")
        if self.cu_seqlens_k.shape != self.cu_seqlens.shape:
            raise ValueError(
                f"cu_seqlens_k has {self.cu_seqlens_k.numel() - 1} sequences, cu_seqlens {self.cu_seqlens.numel() - 1}"
            )
        if self.cu_seqlens_k.device != self.lo.device:
            raise ValueError(f"SpanMask.cu_seqlens_k is on {self.cu_seqlens_k.device}, lo/hi on {self.lo.device}")
        if self.validate:
            q_len = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
            k_len = self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]
            b = _first_true(k_len < q_len)
            if b is not None:
                raise ValueError(f"sequence {b} has {int(q_len[b])} query rows but only {int(k_len[b])} keys")

    @property
    def is_self_attention(self) -> bool:
        """True when the keys are the query rows themselves (no ``cu_seqlens_k``)."""
        return self.cu_seqlens_k is self.cu_seqlens

    # ------------------------------------------------------------------ properties
    @property
    def total_tokens(self) -> int:
        """T, the number of packed rows."""
        return self.lo.numel()

    @property
    def num_sequences(self) -> int:
        """B, the number of packed sequences."""
        return self.cu_seqlens.numel() - 1

    def local_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence index, position, key count) of every query row, int64 ``[T]``; no host sync.

        The position is the row's key position in its sequence (its local row for
        self-attention; ``k_len - q_len + row`` for extend spans).
        """
        seq = sequence_index(self.cu_seqlens, self.total_tokens)
        start = self.cu_seqlens[seq]
        rows = torch.arange(self.total_tokens, device=self.lo.device, dtype=torch.int64)
        k_len = self.cu_seqlens_k[seq + 1] - self.cu_seqlens_k[seq]
        q_len = self.cu_seqlens[seq + 1] - start
        return seq, rows - start + (k_len - q_len), k_len

    def packed_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``lo``/``hi`` as int64 positions on the packed key axis (``[T]`` each); no host sync.

        Row ``t`` of the sequence starting at ``bos`` sees packed keys ``[bos + lo[t], bos + hi[t]]``.
        These are non-decreasing over the whole pack, not just inside each sequence: every key
        of a later sequence comes after every key of an earlier one. So the rows that see any
        given key range form one contiguous range (what a backward pass over key tiles needs).
        """
        bos = self.cu_seqlens_k[sequence_index(self.cu_seqlens, self.total_tokens)]
        return self.lo.long() + bos, self.hi.long() + bos

    def _check_invariants(self) -> None:
        seq, row, length = self.local_rows()
        lo, hi = self.lo.long(), self.hi.long()
        checks = (
            (lo < 0, "lo must be >= 0"),
            (lo > row, "lo must be <= the row's own position"),
            (hi < row, "hi must be >= the row's own position"),
            (hi >= length, "hi must be inside the sequence (hi < sequence length)"),
        )
        for bad, what in checks:
            i = _first_true(bad)
            if i is not None:
                raise ValueError(
                    f"invalid span at row {i} (sequence {int(seq[i])}, position {int(row[i])}, "
                    f"sequence length {int(length[i])}): lo={int(lo[i])}, hi={int(hi[i])}; {what}"
                )
        same_seq = seq[1:] == seq[:-1]
        for name, arr in (("lo", lo), ("hi", hi)):
            i = _first_true(same_seq & (arr[1:] < arr[:-1]))
            if i is not None:
                raise ValueError(
                    f"{name} must be non-decreasing inside each sequence: row {i} has {name}={int(arr[i])} "
                    f"but row {i + 1} has {name}={int(arr[i + 1])} (sequence {int(seq[i])})"
                )

    # ------------------------------------------------------------------ derived views
    def to_dense(self) -> torch.Tensor:
        """Bool ``[T, T_keys]`` mask over packed rows and keys; False across sequences.
        O(T * T_keys): tests/reference only."""
        glo, ghi = self.packed_bounds()
        keys = torch.arange(self.total_keys, device=self.lo.device, dtype=torch.int64)
        return (keys[None, :] >= glo[:, None]) & (keys[None, :] <= ghi[:, None])

    def num_pairs(self) -> int:
        """Exact number of allowed (query, key) pairs, for FLOP accounting (one host sync)."""
        return int((self.hi.long() - self.lo.long() + 1).sum())

    def tile_summary(self, block_m: int) -> TileSummary:
        """Per-tile min/max of ``lo`` and ``hi`` for tiles of ``block_m`` rows (see :class:`TileSummary`).

        Vectorized, no host sync: since ``lo``/``hi`` are non-decreasing inside a sequence, the
        minimum is the tile's first row and the maximum its last.
        """
        block_m = as_int(block_m, "block_m")
        seq, row_start, rows, real, num_tiles = _tile_layout(self.cu_seqlens, self.total_tokens, block_m)
        first = (self.cu_seqlens[seq.long()] + row_start.long()).clamp(0, self.total_tokens - 1)
        last = (first + rows.long() - 1).clamp(0, self.total_tokens - 1)

        def pick(values: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
            return torch.where(real, values[at].to(torch.int32), 0)

        return TileSummary(
            block_m=block_m,
            seq=seq,
            row_start=row_start,
            rows=rows,
            lo_min=pick(self.lo, first),
            lo_max=pick(self.lo, last),
            hi_min=pick(self.hi, first),
            hi_max=pick(self.hi, last),
            num_tiles=num_tiles,
        )

    def key_tiles(self, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tiles of ``block_n`` keys of one sequence: int32 ``(seq, key_start, keys)``, fixed
        capacity ``ceil(T_keys / block_n) + B`` with ``keys == 0`` padding; no host sync."""
        seq, start, keys, _, _ = _tile_layout(self.cu_seqlens_k, self.total_keys, block_n)
        return seq, start, keys

    def to(self, device: torch.device | str) -> SpanMask:
        """The same spans on another device (no re-validation)."""
        if self.is_self_attention:
            return SpanMask(self.lo.to(device), self.hi.to(device), self.cu_seqlens.to(device), validate=False,
                            window=self.window)
        return SpanMask(self.lo.to(device), self.hi.to(device), self.cu_seqlens.to(device), validate=False,
                        cu_seqlens_k=self.cu_seqlens_k.to(device), total_keys=self.total_keys, window=self.window)
