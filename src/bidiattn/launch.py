"""Launch planning for every backend, and the one plan type the public calls take.

Before a kernel runs over a :class:`~bidiattn.spans.SpanMask`, its launcher derives launch data
from the mask and the head shape: tile tables and launch orders (Triton), row segments grouped
into FlashAttention-4 launches (FA4). :func:`plan` does that once and returns a :class:`Plan`,
which records the backend it chose and that backend's launch data; the layers that share a mask
share the plan. A call without a plan plans once per ``SpanMask`` object and head shape and
keeps the plan on the spans (:func:`planned`), so the default call is the planned call.

Sections: backend choice (capability checks, :func:`auto_backend`); Triton plans
(:class:`TileConfig`, :class:`LaunchPlan`, :class:`BackwardConfig`, :class:`BackwardPlan`); FA4
plans (:class:`SegmentPlan`); the :class:`Plan` type, :func:`plan` and :func:`planned`.

Importing this module imports no Triton and no FA4 (they are imported where a plan needs them).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from .spans import SpanMask, TileSummary, as_int, host_to_device

if TYPE_CHECKING:
    from .kernels.fa4_masked import MaskTables
    from .kernels.sm90_wide.plan import GluonPlan
    from .kernels.tiles import KeyTiles

__all__ = [
    "BACKENDS", "KINDS", "BackwardConfig", "BackwardPlan", "LaunchPlan", "Plan", "SegmentCall", "SegmentPlan",
    "TileConfig", "auto_backend", "fa4_unsupported", "pick_backward_config", "pick_config", "plan", "plan_backward",
    "plan_forward", "plan_segments", "planned", "triton_unsupported",
]

BACKENDS = ("auto", "reference", "triton", "flex", "fa4", "gluon")
HALF_DTYPES = (torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 512
DECODE_ROWS = 16  # query rows per sequence at or below which a call is decode-sized
# Query rows per sequence from which paged keys at head dim 512 run gluon (the keys gathered out of
# the pages, then the Gluon forward): ahead of triton's paged kernel from 256-row chunks on
# (PERF.md G8; the gather costs O(keys) per call, so shorter chunks, unmeasured, stay on triton).
GLUON_PAGED_ROWS = 256


# ============================================================================ backend choice
def interpreting() -> bool:
    """Whether Triton kernels run through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_missing() -> ImportError | None:
    """An ``ImportError`` with the install hint when Triton cannot be imported, else None."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        missing = ImportError("the triton backend needs Triton, which is not installed: "
                              "pip install 'bidiattn[triton]' (or pip install triton)")
        missing.__cause__ = err
        return missing
    return None


def triton_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> Exception | None:
    """Why the triton backend cannot take inputs of this device, dtype and head dim (no CUDA
    device or interpreter, Triton not installed, dtype, head dim), or None if it can."""
    if device.type != "cuda" and not interpreting():
        return ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    missing = triton_missing()
    if missing is not None:
        return missing
    if dtype not in HALF_DTYPES:
        return TypeError(f"backend='triton' takes float16 or bfloat16, got {dtype}")
    if head_dim % 16 or head_dim > TRITON_MAX_HEAD_DIM:
        return ValueError(f"backend='triton' supports head dims that are multiples of 16 up to "
                          f"{TRITON_MAX_HEAD_DIM}, got {head_dim}")
    return None


def fa4_import_error() -> ImportError | None:
    """The ``ImportError`` of FlashAttention-4's interface (``flash_attn.cute``), or None."""
    try:
        from flash_attn.cute import interface  # noqa: F401
    except ImportError as err:
        return err
    return None


def fa4_limits(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> Exception | None:
    """Why FA4 (4.0.0b36) cannot take a dtype and head dim on a GPU of this compute capability,
    or None: SM90 takes head dims that are multiples of 8 up to 256, SM100/SM110 multiples of 8
    up to 128 and 256; fp16/bf16."""
    major, minor = capability
    if dtype not in HALF_DTYPES:
        return TypeError(f"backend='fa4' takes float16 or bfloat16, got {dtype}")
    if major == 9:
        ok, limit = head_dim % 8 == 0 and 8 <= head_dim <= 256, "multiples of 8 up to 256"
    elif major in (10, 11):
        ok, limit = (head_dim % 8 == 0 and 8 <= head_dim <= 128) or head_dim == 256, "multiples of 8 up to 128, and 256"
    else:
        return ValueError(f"backend='fa4' runs on SM90/SM100 GPUs (Hopper, Blackwell), this is sm_{major}{minor}")
    if not ok:
        return ValueError(f"backend='fa4' on sm_{major}{minor} supports head dims {limit}, got {head_dim}")
    return None


def fa4_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> Exception | None:
    """Why FA4 cannot take inputs of this device, dtype and head dim here, or None if it can
    (imports FA4 and reads the GPU's compute capability: call it when planning, not at import)."""
    err = fa4_import_error()
    if err is not None:
        return ValueError(f"backend='fa4' needs FlashAttention-4 (pip install 'bidiattn[fa4]'): {err}")
    if device.type != "cuda":
        return ValueError(f"backend='fa4' needs CUDA tensors, got {device}")
    return fa4_limits(torch.cuda.get_device_capability(device), dtype, head_dim)


def gluon_import_error() -> Exception | None:
    """Why the Gluon head-dim-512 kernel (:mod:`bidiattn.kernels.sm90_wide`) cannot be imported
    (no Triton, or a Triton whose Gluon lacks the Hopper API it uses), or None."""
    from .kernels.sm90_wide import gluon_unavailable

    return gluon_unavailable()


def gluon_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> Exception | None:
    """Why the gluon backend (bidiattn's head-dim-512 SM90 forward) cannot take inputs of this
    device, dtype and head dim, or None if it can (reads the GPU's compute capability and imports
    the kernel: call it when planning, not at import)."""
    if head_dim != 512:
        return ValueError(f"backend='gluon' takes head dim 512 only, got {head_dim}")
    if dtype not in HALF_DTYPES:
        return TypeError(f"backend='gluon' takes float16 or bfloat16, got {dtype}")
    if device.type != "cuda":
        return ValueError(f"backend='gluon' needs CUDA tensors, got {device}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return ValueError(f"backend='gluon' runs on SM90 GPUs (H100/H200), this is sm_{major}{minor}")
    err = gluon_import_error()
    if err is not None:
        return ValueError(f"backend='gluon' is unavailable here: {err}")
    return None


def auto_backend(device: torch.device, dtype: torch.dtype, head_dim: int, rows_per_sequence: float, *,
                 paged: bool = False) -> str:
    """The backend ``backend="auto"`` runs: the fastest exact backend that takes the call.

    Checked in this order (figures: benchmarks/PERF.md rows, one H200, bf16)::

        call                                              backend    decided by
        inside torch.compile                              triton     the only one that traces (custom op);
                                                                     the reference where triton cannot take it
        CPU (or any non-CUDA device)                      triton     under TRITON_INTERPRET=1 (the tests);
                                                                     else the reference
        CUDA, paged keys, hd 512, SM90, Gluon imports,    gluon      the keys gathered, then the Gluon forward:
          >= GLUON_PAGED_ROWS rows per sequence                      chunks over 16K keys (H100, G8): 106 vs 90
                                                                     TFLOP/s at 256 rows, 360 vs 195 at 1K,
                                                                     364-396 vs 195-214 at 2K
        CUDA, paged keys (serving.kvcache)                triton     decode D1/D2 (FA4 decode 4-9x the time),
                                                                     sliding 2K chunks A11 (226 vs 137 TFLOP/s)
        CUDA, <= 16 query rows per sequence (decode)      triton     D1/D2 (split-KV decode)
        CUDA, fp16/bf16, hd 512, SM90, Gluon imports      gluon      forward G1: 481-506 vs triton 266-273
                                                                     TFLOP/s; fwd+bwd (H100) G13: 292-298,
                                                                     G14 (Triton 3.9): 192-209 vs triton
                                                                     139-141 / 119-120
        CUDA, fp16/bf16, FA4 imports, SM90/SM100,         fa4        forward A1-A4 vs F1-F4: 603/702/721/458 vs
          FA4 takes the head dim (SM90: <= 256)                      511/517/527/398 TFLOP/s; fwd+bwd A16-A18
                                                                     (H100): 573/380/279 vs triton 402/359/270;
                                                                     SM90: one masked launch (A21, A25-A26);
                                                                     else segments (masked_layers)
        CUDA, triton takes it (fp16/bf16, hd % 16 == 0,   triton     F1-F5: 1.28-2.08x FlexAttention; hd512
          hd <= 512)                                                 off SM90 or without Gluon (F5)
        anything else (fp32 on CUDA, odd head dims)       reference  exact; no kernel takes it

    The Gluon and FA4 imports are tried last, so calls that never reach their rows pay nothing
    for them.
    """
    if torch.compiler.is_compiling():
        return "triton" if triton_unsupported(device, dtype, head_dim) is None else "reference"
    if device.type != "cuda":
        return "triton" if interpreting() and triton_unsupported(device, dtype, head_dim) is None else "reference"
    triton_ok = triton_unsupported(device, dtype, head_dim) is None
    if paged and head_dim == 512 and rows_per_sequence >= GLUON_PAGED_ROWS and \
            gluon_unsupported(device, dtype, head_dim) is None:
        return "gluon"
    if paged or rows_per_sequence <= DECODE_ROWS:
        if triton_ok:
            return "triton"
    elif head_dim == 512 and gluon_unsupported(device, dtype, head_dim) is None:
        return "gluon"
    elif fa4_unsupported(device, dtype, head_dim) is None:
        return "fa4"
    return "triton" if triton_ok else "reference"


# ============================================================================ Triton plans
def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch parameters of the forward kernel; :func:`pick_config` gives the
    default per head dim and call shape. Each option is used by some default:

    - ``split_dv``: programs per query tile, each producing ``D / split_dv`` output columns and
      recomputing q·k; hd512, where a full fp32 accumulator does not fit in registers.
    - ``kv_splits``: programs per query tile's key range (flash-decoding), merged by one more
      launch; ``None`` picks it from the launch size (more than 1 only for decode-sized calls
      whose grid would leave multiprocessors idle).
    - ``pack_gqa``: a tile's rows hold the query heads of one K/V group (where ``block_m`` is a
      multiple of the group size), so each K/V tile is read once per group; prefill and decode.
    - ``edge_stages``: the pipeline depth of the loops over the masked key tiles at the two ends
      of a tile's key range (``None``: ``num_stages``, the mask-free middle loop's depth). Each
      loop has its own shared-memory buffers, so shallow edges leave room for a deeper middle;
      hd256, and hd128 at two query heads per K/V head.
    - ``tma``: K/V tiles through tensor descriptors where the call allows it (keys in rows of a
      tensor, or in pages of a multiple of ``block_n`` keys; a power-of-two head dim whose box,
      the head dim or its half with ``column_halves``, spans 16 to 256 columns; 16-byte-aligned
      rows), pointer loads elsewhere (same results); hd128 and hd256.
    - ``column_halves``: q, k, v and the output in two column halves inside one program (q·k as
      the sum of two dots, one accumulator per half of V), so a TMA box spans D/2 columns; hd256.

    A config whose tiles do not fit in shared memory raises ``ValueError`` at launch.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_dv: int = 1
    kv_splits: int | None = None
    pack_gqa: bool = False
    edge_stages: int | None = None
    tma: bool = False
    column_halves: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "split_dv"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two, got {value}")
        if self.kv_splits is not None and (isinstance(self.kv_splits, bool) or not isinstance(self.kv_splits, int)
                                           or not 1 <= self.kv_splits <= 256):
            raise ValueError(f"TileConfig.kv_splits must be None (automatic) or an int in 1..256, got {self.kv_splits!r}")
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"TileConfig tiles must be at least 16x16, got {self.block_m}x{self.block_n}")
        for name in ("num_warps", "num_stages", "edge_stages"):
            value = getattr(self, name)
            if not (value is None and name == "edge_stages") and (isinstance(value, bool) or not isinstance(value, int)
                                                                   or value < 1):
                raise ValueError(f"TileConfig.{name} must be a positive int, got {value!r}")


def pick_config(head_dim: int, rows_per_sequence: float | None = None, gqa_group: int = 1) -> TileConfig:
    """Default tiles per head dim, from the sweeps of benchmarks/tune_forward.py on an H200
    (figures in benchmarks/NOTES.md). Shared memory (227 KB per block) is the binding limit from
    hd256 up.

    ``rows_per_sequence`` (query rows over sequences, known on the host): at 16 or fewer
    (decode, speculative decode) 16-row tiles, so a one-row query does not pay for the scores
    of a full tile. ``gqa_group`` (query heads per K/V head): tiles hold the query heads of one
    group where the group divides ``block_m``."""
    if isinstance(gqa_group, bool) or not isinstance(gqa_group, int) or gqa_group < 1:
        raise ValueError(f"gqa_group must be a positive int, got {gqa_group!r}")
    if rows_per_sequence is not None and rows_per_sequence <= DECODE_ROWS:
        if head_dim <= 256:
            return TileConfig(16, 64, 4, 2, pack_gqa=True)
        # hd512: one program per row tile over all 512 columns (a split would read K twice),
        # 32-key steps so that two stages of K and V fit in shared memory.
        return TileConfig(16, 32, 4, 2, pack_gqa=True)
    if head_dim <= 64:
        return TileConfig(128, 64, 4, 3)  # not tuned
    if head_dim <= 128:
        # At two query heads per K/V head, 1-stage edge loops beat the 3-stage default; at other
        # group sizes they are slower.
        if gqa_group == 2:
            return TileConfig(128, 64, 8, 3, edge_stages=1, pack_gqa=True, tma=True)
        return TileConfig(128, 64, 8, 3, pack_gqa=True, tma=True)
    if head_dim <= 256:
        # The column halves pay only with packed GQA tiles and TMA; a 2-stage middle loop fits
        # in shared memory only with 1-stage edges.
        return TileConfig(128, 64, 8, 2, edge_stages=1, pack_gqa=True, tma=True, column_halves=True)
    # A 128x512 fp32 accumulator does not fit in registers: two programs of 256 output columns
    # each recompute q·k. No TMA: a 512-column K row fits a TMA box only in column halves,
    # which are slower here than the split.
    return TileConfig(128, 64, 8, 1, split_dv=2)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the Triton forward launcher derives from the spans before it launches: the
    tile config, the tile summary, the longest-first tile order and the key-range split count
    (``backward``: the gradient kernels' plan, for training). Built by :func:`plan_forward` with
    no host sync; the ``triton`` part of a :class:`Plan`. Tied to its :class:`SpanMask` object
    (held by weak reference, so a plan kept on its spans never keeps them alive)."""

    spans_ref: weakref.ref
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    config: TileConfig
    pack: int
    tiles: TileSummary
    order: torch.Tensor
    kv_splits: int
    backward: BackwardPlan | None = None

    @property
    def spans(self) -> SpanMask | None:
        """The spans this plan was made for (``None`` once they are gone)."""
        return self.spans_ref()

    def check(self, q: torch.Tensor, k: torch.Tensor, spans: SpanMask) -> None:
        """ValueError unless this plan was made for these spans and head shape."""
        if spans is not self.spans:
            raise ValueError("this LaunchPlan was made for another SpanMask object; plan each step's spans")
        got = (q.shape[1], k.shape[1], q.shape[2])
        want = (self.num_q_heads, self.num_kv_heads, self.head_dim)
        if got != want:
            raise ValueError(f"this LaunchPlan is for (Hq, Hkv, D) = {want}, the call has {got}")
        if self.backward is not None:
            self.backward.check(q, spans)


def _check_heads(num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """The head shape as ints (any integer type; bools, floats and strings raise ``TypeError``),
    positive, with ``num_q_heads`` a multiple of ``num_kv_heads`` (``ValueError`` naming them)."""
    values = tuple(as_int(v, n) for v, n in ((num_q_heads, "num_q_heads"), (num_kv_heads, "num_kv_heads"),
                                               (head_dim, "head_dim")))
    for name, value in zip(("num_q_heads", "num_kv_heads", "head_dim"), values):
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if values[0] % values[1]:
        raise ValueError(f"num_q_heads={values[0]} must be a multiple of num_kv_heads={values[1]}")
    return values


def _check_window(window: object) -> int | None:
    if window is None:
        return None
    window = as_int(window, "window")
    if window < 1:
        raise ValueError(f"window must be None or a positive int, got {window!r}")
    return window


def plan_forward(spans: SpanMask, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 config: TileConfig | None = None, window: int | None = None) -> LaunchPlan:
    """The :class:`LaunchPlan` of a Triton forward call over ``spans`` (no host sync): for ``q
    [T, Hq, D]`` and ``k``/``v [T_keys, Hkv, D]`` with ``Hq = num_q_heads``, ``Hkv =
    num_kv_heads``, ``D = head_dim``, under the mask ``spans`` (self-attention or extend spans).

    ``window``: the layer's sliding window, if it has one; validated, and bounding the keys a
    decode row sees when the split-KV count is chosen (the tiles themselves are the same for
    sliding and full layers, which run best on them). ``config`` overrides the choice.
    Needs the spans on a CUDA device or Triton's interpreter (two Triton launches build the tile
    table and its order).
    """
    from .kernels.tiles import query_tiles

    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if config is not None and not isinstance(config, TileConfig):
        raise TypeError(f"config must be a TileConfig or None, got {type(config).__name__}")
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")
    rows_per_sequence = spans.total_tokens / spans.num_sequences
    cfg = config or pick_config(head_dim, rows_per_sequence, gqa_group=num_q_heads // num_kv_heads)
    block_d = _next_power_of_2(head_dim)
    if block_d % cfg.split_dv or block_d // cfg.split_dv < 16:
        raise ValueError(f"split_dv={cfg.split_dv} leaves fewer than 16 of the {block_d} padded head-dim columns per program")
    if cfg.column_halves and block_d // cfg.split_dv < 32:
        raise ValueError(f"column_halves needs at least 32 output columns per program; head_dim={head_dim} with "
                         f"split_dv={cfg.split_dv} leaves {block_d // cfg.split_dv}")
    group = num_q_heads // num_kv_heads
    # Decode: pack the query heads of a K/V group into the tile's rows (see the kernel).
    pack = group if (cfg.pack_gqa and group > 1 and cfg.block_m % group == 0) else 1
    # Longest tiles first: image blocks make the key ranges uneven, and tiles launched last
    # should be the short ones so the tail of the grid stays full.
    tiles, order = query_tiles(spans, cfg.block_m // pack)
    splits = cfg.kv_splits or _auto_kv_splits(spans, (num_q_heads // pack) * cfg.split_dv, cfg.block_m // pack,
                                              cfg.block_n, window)
    return LaunchPlan(weakref.ref(spans), num_q_heads, num_kv_heads, head_dim, cfg, pack, tiles, order, splits)


def _auto_kv_splits(spans: SpanMask, heads: int, block_m: int, block_n: int, window: int | None = None) -> int:
    """Key-range slices per query tile when the real tiles alone are fewer than one wave of the
    GPU: a power of two near eight waves of programs, at most 32, each slice at least 4 key
    tiles of the keys a row sees (a sequence's keys; with a sliding ``window``, at most the
    window and the tile's rows); decode only (16 or fewer query rows per sequence). From sizes
    only, no host sync; 1 off CUDA.

    The real tile count is estimated from sizes (``T / block_m``, or one per sequence when
    sequences are shorter than a tile), not from the grid, whose padding capacity would hide a
    small decode batch's idle multiprocessors. The window matters where the key count is far
    above it (a sliding layer's decode over a long cache; vLLM's steps, whose key count is the
    bound ``max_model_len`` per request): sliced by that count, a window's key tiles would be
    spread one per slice or fewer.
    """
    rows_per_seq = spans.total_tokens / spans.num_sequences
    device = spans.lo.device
    if device.type != "cuda" or rows_per_seq > DECODE_ROWS:
        # Only decode-sized queries: the merge moves splits x T x Hq x D fp32 values, more than
        # a prefill chunk gains from the extra programs.
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = spans.num_sequences if rows_per_seq <= block_m else -(-spans.total_tokens // block_m)
    programs = heads * tiles
    if programs >= sms:
        return 1
    keys_per_seq = spans.total_keys // spans.num_sequences
    if window is not None:
        keys_per_seq = min(keys_per_seq, window + block_m)
    waves = 1 << ((-(-8 * sms // programs)).bit_length() - 1)
    return max(1, min(waves, keys_per_seq // (4 * block_n), 32))


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the two gradient kernels: ``block_m`` query rows x ``block_n`` keys per step.

    - ``dq``: the dQ pass's own tiles where they differ from the dK/dV pass's (its ``dq`` must be
      ``None``); kept for hd512, whose dQ pass needs smaller key steps than its dK/dV pass.
    - ``separate_dk_dv``: dV and dK by two launches instead of one, so a program holds one
      ``[block_n, D]`` accumulator instead of two and the dV launch skips do·vᵀ; kept for hd512,
      where two accumulators do not fit.
    - ``mask_free_tiles`` (dQ pass only): key tiles inside every row's span skip the mask math,
      at the price of a branch per key tile; kept for hd512, where it lowers register spills.
    - ``tma``: the tiles a pass walks over (Q/dO in the dK/dV pass, K/V in the dQ pass) come
      through tensor descriptors, unmasked, where they lie wholly inside the rows (keys) the
      program needs; the one partial tile at the end of each walk loads through masked
      pointers, so no value outside a sequence enters a product. Used where the head dim is a
      power of two from 16 to 256, pointer loads elsewhere (same results); the default up to hd256.

    :func:`pick_backward_config` gives the default per head dim.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dq: BackwardConfig | None = None
    separate_dk_dv: bool = False
    mask_free_tiles: bool = False
    tma: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BackwardConfig.{name} must be a power of two, got {value}")
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"BackwardConfig tiles must be at least 16x16, got {self.block_m}x{self.block_n}")
        if self.dq is not None and (not isinstance(self.dq, BackwardConfig) or self.dq.dq is not None):
            raise ValueError(f"BackwardConfig.dq must be None or a BackwardConfig without its own dq, got {self.dq!r}")

    @property
    def dq_pass(self) -> BackwardConfig:
        """The tiles the dQ pass runs with."""
        return self.dq or self


def pick_backward_config(head_dim: int) -> BackwardConfig:
    """Default tiles per head dim, chosen by the sweeps of benchmarks/backward.py and
    backward_passes.py on an H200 (figures in benchmarks/NOTES.md). Up to hd256: one dK/dV
    launch and TMA loads. hd512: a ``[block_n, 512]`` fp32 pair of dK/dV accumulators does not
    fit, so dV and dK run as two launches; the dQ pass uses 64-row tiles (wgmma's M), 32-key
    steps and mask-free key tiles to keep its spills down."""
    if head_dim <= 128:
        return BackwardConfig(64, 64, 4, 2, tma=True)
    if head_dim <= 256:
        return BackwardConfig(128, 64, 8, 1, tma=True)
    return BackwardConfig(32, 64, 8, 1, separate_dk_dv=True, dq=BackwardConfig(64, 32, 8, 1, mask_free_tiles=True))


@dataclass(frozen=True)
class BackwardPlan:
    """What the Triton backward launcher derives from the spans before it launches: the tile
    config, the key tiles of the dK/dV pass with the query rows that see them, the query tiles
    of the dQ pass, and both longest-first launch orders. Built by :func:`plan_backward` (no
    host sync). Tied to its :class:`SpanMask` object (by weak reference)."""

    spans_ref: weakref.ref
    head_dim: int
    config: BackwardConfig
    key_tiles: KeyTiles
    key_order: torch.Tensor
    query_tiles: TileSummary
    query_order: torch.Tensor

    @property
    def spans(self) -> SpanMask | None:
        return self.spans_ref()

    def check(self, q: torch.Tensor, spans: SpanMask) -> None:
        """ValueError unless this plan was made for these spans and head dim."""
        if spans is not self.spans:
            raise ValueError("this BackwardPlan was made for another SpanMask object; plan each step's spans")
        if q.shape[2] != self.head_dim:
            raise ValueError(f"this BackwardPlan is for head_dim={self.head_dim}, the call has {q.shape[2]}")


def plan_backward(spans: SpanMask, head_dim: int, config: BackwardConfig | None = None) -> BackwardPlan:
    """The :class:`BackwardPlan` of a Triton backward call over ``spans`` at ``head_dim`` (no
    host sync); ``config`` overrides :func:`pick_backward_config`."""
    from .kernels.tiles import key_tiles, query_tiles

    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if config is not None and not isinstance(config, BackwardConfig):
        raise TypeError(f"config must be a BackwardConfig or None, got {type(config).__name__}")
    cfg = config or pick_backward_config(head_dim)
    # Longest first in both passes, as in the forward: the rows (keys) a tile walks vary with
    # the image blocks.
    kt, key_order = key_tiles(spans, cfg.block_n)
    qt, query_order = query_tiles(spans, cfg.dq_pass.block_m)
    return BackwardPlan(weakref.ref(spans), head_dim, cfg, kt, key_order, qt, query_order)


# ============================================================================ FA4 plans
# A span mask as a few window-attention launches over row segments.
#
# Kernels that only know causal / sliding-window masks (FlashAttention's varlen interface, FA4)
# can still run any SpanMask exactly: cut each sequence's query rows into runs whose intervals
# follow one *shape*, and give each run its own key range. In a varlen launch with window
# ``(L, R)`` (``None`` = unbounded), a run of rows at key positions ``[p_first, p_end)`` over keys
# ``[k0, k1)`` lets the row at position ``p`` see
#
#     k0 <= k < k1,   p + (k1 - p_end) - L <= k <= p + (k1 - p_end) + R
#
# (query ``i`` of a run is aligned with key ``i + k_len - q_len``, FlashAttention's convention for
# ``seqlen_k > seqlen_q``). Four shapes cover every rule of bidiattn.rules; two adjacent rows of a
# sequence (``lo``/``hi`` step by ``dlo``/``dhi``) can share a run of exactly one of them:
#
#     kind     rows of the run (dlo, dhi)        keys [k0, k1)              window (L, R)
#     full     same lo, same hi      (0, 0)      [lo, hi + 1)               (None, None)
#     causal   same lo, hi - p fixed (0, 1)      [lo, p_end + hi - p)       (None, 0)
#     window   lo - p, hi - p fixed  (1, 1)      [lo_0, p_end + hi - p)     (hi - lo, 0)
#     open     lo - p fixed, same hi (1, 0)      [lo_0, hi + 1)             (hi + 1 - p_end - (lo_0 - p_0), None)
#
# Example, gemma3 full layer, one sequence of 8 tokens with an image at 2..4: text rows 0..1 are
# one causal run, the image rows one full run over keys [0, 5), text rows 5..7 one causal run
# over keys [0, 8):
#
#     row  lo hi   kind     keys 0..7
#       0   0  0   causal   x.......
#       1   0  1   causal   xx......
#       2   0  4   full     xxxxx...
#       3   0  4   full     xxxxx...
#       4   0  4   full     xxxxx...
#       5   0  5   causal   xxxxxx..
#       6   0  6   causal   xxxxxxx.
#       7   0  7   causal   xxxxxxxx
#
# From each segment start, the segment takes the shape whose run reaches farthest (a row whose
# next step fits no shape is a one-row full segment): the fewest segments. Runs of one kind and
# one window form one launch; the segments of a launch never share query rows, and the launches
# together cover every row once, so they write one output without a merge. Keys are not copied:
# segments point into the packed keys (``k_start``), several segments may read the same keys.
# Any row is exact on its own as a one-row ``full`` run, which is where rows go when a mask would
# need more than ``max_calls`` launches.

KINDS = ("full", "causal", "window", "open")
_FULL, _CAUSAL, _WINDOW, _OPEN = range(4)
# A link joins rows r and r + 1 of one sequence; its code is 2 * dlo + dhi where both steps are 0
# or 1 (0 full, 1 causal, 2 open, 3 window), else _BREAK (no shape holds both rows).
_BREAK = 4
_KIND_OF_CODE = (_FULL, _CAUSAL, _OPEN, _WINDOW)
_SEGMENT_CAPACITY = 1024  # segment starts read back in the planning sync; more take a second read
_GRAD_KEYS = 2  # FA4 backward: gathered keys per launch at most this many times the keys


class GradChunk(NamedTuple):
    """Segments ``[first, end)`` of a launch (in its order) that one FA4 backward call takes:
    their rows and keys in total and the longest of each (host ints)."""

    first: int
    end: int
    rows: int
    keys: int
    max_q_len: int
    max_k_len: int


@dataclass(frozen=True)
class SegmentCall:
    """One varlen window-attention launch over ``S`` row segments (FlashAttention layout).

    Segment ``j`` holds query rows ``q_start[j] : q_start[j] + q_len[j]`` (packed rows) over
    packed keys ``k_start[j] : k_start[j] + k_len[j]``. ``q_start``/``k_start`` are int32
    ``[S+1]`` (the last entry is the total row / key count, so they read as ``cu_seqlens`` of a
    launch whose lengths come from ``q_len``/``k_len``, int32 ``[S]``, FlashAttention's
    ``seqused_q``/``seqused_k``). ``seq`` (int32 ``[S]``) is each segment's sequence: a paged
    launch gives segment ``j`` the page-table row of sequence ``seq[j]``. Segments are in the
    order a kernel schedules them: most rows x keys first.

    ``pack_gqa``: FA4's option for this launch (``None``: FA4's own heuristic), chosen per
    kind by :func:`_fa4_pack_gqa`. ``grad_chunks``: how the FA4 backward splits the launch
    (:class:`GradChunk`, host ints).
    """

    kind: str
    window_left: int | None
    window_right: int | None
    q_start: torch.Tensor
    q_len: torch.Tensor
    k_start: torch.Tensor
    k_len: torch.Tensor
    max_q_len: int
    max_k_len: int
    seq: torch.Tensor
    pack_gqa: bool | None = None
    grad_chunks: tuple[GradChunk, ...] = ()

    @property
    def num_segments(self) -> int:
        return self.q_len.numel()

    @property
    def causal(self) -> bool:
        """True for the ``(None, 0)`` window: FlashAttention's plain ``causal=True``."""
        return self.window_left is None and self.window_right == 0


@dataclass(frozen=True)
class SegmentPlan:
    """The FA4 launches that together compute a span mask (the ``segments`` part of a
    :class:`Plan`); see the FA4 section of this module.

    ``paged``: every segment's keys start at its sequence's first key (``k_start`` is the
    sequence's offset, ``k_len`` the key end), so a launch can read them through the
    sequence's page-table row, which has no start offset; the window alone bounds each row's
    first key.

    ``fa4_backward``: the backward runs FA4's own, per launch over copies of the segments' keys
    (:mod:`bidiattn.kernels.fa4`), where those copies move each key at most once: no two segments
    read the same key (text-only packed sequences). Where segments share keys (every image
    layout: each text run reads the prefix before it, 3-33x the keys on the benchmark layouts)
    bidiattn's Triton backward runs instead: the copies' traffic would cost about what FA4's
    backward saves over it (benchmarks/NOTES.md, "fa4 backend").
    """

    calls: tuple[SegmentCall, ...]
    total_rows: int
    total_keys: int
    paged: bool = False
    fa4_backward: bool = False

    @property
    def num_segments(self) -> int:
        return sum(c.num_segments for c in self.calls)

    def to_dense(self) -> torch.Tensor:
        """Bool ``[T, T_keys]``: the mask the launches compute, read with FlashAttention's window
        rule (the executable statement of what a launch does; tests compare it with
        :meth:`SpanMask.to_dense`). Raises if two segments write the same row."""
        device = self.calls[0].q_len.device if self.calls else torch.device("cpu")
        mask = torch.zeros(self.total_rows, self.total_keys, dtype=torch.bool, device=device)
        written = torch.zeros(self.total_rows, dtype=torch.int64, device=device)
        keys = torch.arange(self.total_keys, device=device)
        for c in self.calls:
            q_len, k_len = c.q_len.long(), c.k_len.long()
            seg = torch.repeat_interleave(torch.arange(c.num_segments, device=device), q_len)
            first = torch.cumsum(q_len, 0) - q_len
            i = torch.arange(seg.numel(), device=device) - first[seg]
            row = c.q_start[:-1].long()[seg] + i
            k0 = c.k_start[:-1].long()[seg]
            centre = k0 + i + k_len[seg] - q_len[seg]
            ok = (keys[None] >= k0[:, None]) & (keys[None] < (k0 + k_len[seg])[:, None])
            if c.window_left is not None:
                ok &= keys[None] >= (centre - c.window_left)[:, None]
            if c.window_right is not None:
                ok &= keys[None] <= (centre + c.window_right)[:, None]
            mask[row] = ok
            written.index_add_(0, row, torch.ones_like(row))
        if bool((written != 1).any()):
            bad = int(torch.nonzero(written != 1)[0])
            raise AssertionError(f"row {bad} is written by {int(written[bad])} segments")
        return mask


def _fa4_pack_gqa(kind: str) -> bool | None:
    """FA4's ``pack_gqa`` for a launch of this kind: off for the sliding-window kinds (``window``,
    ``open``: a finite left window), FA4's own heuristic (``None``) for ``full`` and ``causal``.
    Issue 24's measurement: the sliding layer's launches ran at 377 TFLOP/s with FA4's choice and
    437 with packing off (FA4's own window kernel: 450); benchmarks/fa4.py re-measures it."""
    return False if kind in ("window", "open") else None


def plan_segments(spans: SpanMask, max_calls: int = 8, paged: bool = False) -> SegmentPlan:
    """Cut ``spans`` into row segments and group them into at most ``max_calls`` FA4 launches.

    Works for self-attention and extend spans, packed sequences, every rule. Built vectorized
    on the spans' device with one host sync (the segments' few numbers are read back to size
    the launches; a mask of more than 1024 segments reads twice, one over ``max_calls`` launch
    kinds re-cuts once more); the plan's tensors live on the spans' device. Rows whose shape
    would need a launch beyond ``max_calls`` become one-row ``full`` segments (exact; the
    benchmark layouts need two to five launches).

    ``paged``: plan for keys read through page tables (see :attr:`SegmentPlan.paged`). A
    ``full`` or ``causal`` run whose first key is not the sequence's first cannot start its
    keys there, so its rows become one-row ``window`` segments (``L = hi - lo``): exact, but a
    one-row segment fills a whole query tile. No rule of :mod:`bidiattn.rules` makes such runs
    except around blocks longer than the window under ``(c ∧ win_left) ∨ blk`` (paligemma-style
    sliding layers with a block that is not the prefix).
    """
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if not isinstance(paged, bool):
        raise TypeError(f"paged must be a bool, got {type(paged).__name__}")
    if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
        raise ValueError(f"max_calls must be a positive int, got {max_calls!r}")
    seg = _read_segments(spans, paged, None)
    members = _group(seg)
    if len(members) > max_calls:
        # Over budget: keep the launches that cover the most rows, one launch left for full
        # rows; the other rows become one-row full segments (re-cut: one more sync).
        q_start, q_len = seg[1], seg[2]
        rows = {g: sum(q_len[i] for i in m) for g, m in members.items()}
        by_rows = sorted(members, key=lambda g: (-rows[g], g))
        full = [g for g in by_rows if g[0] == _FULL]
        others = [g for g in by_rows if g[0] != _FULL]
        keep = set(full + others[: max_calls - 1])
        demoted = [i for g, m in members.items() if g not in keep for i in m]
        seg = _read_segments(spans, paged, ([q_start[i] for i in demoted], [q_start[i] + q_len[i] for i in demoted]))
        members = _group(seg)
    return _launches(spans, seg, members, paged)


def _group(seg: list[list[int]]) -> dict[tuple[int, int], list[int]]:
    """Segments (indices, in row order) by launch: kind and, for window/open, the window's L."""
    members: dict[tuple[int, int], list[int]] = {}
    for i, (code, left) in enumerate(zip(seg[0], seg[5])):
        kind = _KIND_OF_CODE[code]
        members.setdefault((kind, left if kind in (_WINDOW, _OPEN) else 0), []).append(i)
    return members


# Rows up to which CUDA spans take the one-launch segment-starts kernel: one program walks every
# row, so it beats the PyTorch ops at 16K rows and loses at 128K (PERF.md L6); 32K lies between.
SEGMENT_KERNEL_ROWS = 32768


def _read_segments(spans: SpanMask, paged: bool, demoted: tuple[list[int], list[int]] | None) -> list[list[int]]:
    """The greedy segments of ``spans`` as seven host lists ``(code, q_start, q_len, k_start,
    k_len, left, seq)``, one entry per segment in row order (``code`` as ``_KIND_OF_CODE`` reads
    it, ``left`` the window/open launch's ``L``). The starts come, with one read-back, from
    :func:`bidiattn.kernels.segments.segment_starts` (one Triton launch, equal to its spec in
    the interpreter tests and on the GPU) for CUDA spans of up to ``SEGMENT_KERNEL_ROWS`` rows,
    else from its spec :func:`segment_starts_spec` (PyTorch ops);
    lengths and windows follow on the host from consecutive starts.

    ``demoted``: row ranges ``[start, end)`` that become one-row full segments.
    """
    t = spans.total_tokens
    if t == 0:
        return [[] for _ in range(7)]
    mask = None
    if demoted is not None:
        dev = spans.lo.device
        bounds = host_to_device(torch.tensor(demoted[0] + demoted[1], dtype=torch.int64), dev)
        n = bounds.numel() // 2
        step = torch.zeros(t + 1, dtype=torch.int64, device=dev)
        step.index_add_(0, bounds[:n], torch.ones(n, dtype=torch.int64, device=dev))
        step.index_add_(0, bounds[n:], torch.full((n,), -1, dtype=torch.int64, device=dev))
        mask = (step.cumsum(0)[:t] > 0).to(torch.int8)
    if spans.lo.is_cuda and t <= SEGMENT_KERNEL_ROWS and triton_missing() is None:
        from .kernels.segments import segment_starts

        code, s, seq, lo0, hi0, k_base = segment_starts(spans, paged, mask, cap=1024)
    else:
        code, s, seq, lo0, hi0, k_base = segment_starts_spec(spans, paged, mask)
    ends = s[1:] + [t]
    q_len = [e - a for a, e in zip(s, ends)]
    # Causal and window runs end their keys q_len - 1 past the first row's hi.
    k1 = [h + (n if c & 1 else 1) for c, h, n in zip(code, hi0, q_len)]
    k0 = [0] * len(s) if paged else lo0
    left = [h - lo + (1 - n if c == 2 else 0) for c, h, lo, n in zip(code, hi0, lo0, q_len)]
    return [code, s, q_len, [b + a for b, a in zip(k_base, k0)], [e - a for e, a in zip(k1, k0)], left, seq]


def segment_starts_spec(spans: SpanMask, paged: bool, demoted: torch.Tensor | None) -> list[list[int]]:
    """The segment starts in PyTorch ops, the spec of :func:`bidiattn.kernels.segments.segment_starts`
    (same six lists: code, row, sequence, lo, hi, the sequence's first key).

    The greedy cut (from each segment start, the shape whose run reaches farthest) is a scan:
    a segment that starts at row ``r`` on a link of code ``c`` runs to the end of that link's
    run of ``c``; one that starts on a break is one row. So row ``r + 1`` starts a segment iff
    link ``r`` is a break, or row ``r`` is no start and link ``r`` differs from link ``r - 1``.
    Along a stretch of links that each differ from the one before, the flags alternate; a link
    equal to its predecessor or a break fixes the next flag (false / true). That gives the flags
    in closed form from the last fixing link, with a cumulative max instead of a loop.
    """
    t = spans.total_tokens
    dev = spans.lo.device
    lo, hi = spans.lo, spans.hi
    pad = torch.nn.functional.pad
    dlo, dhi = lo.diff(), hi.diff()
    code = pad(torch.where(((dlo | dhi) & -2) == 0, dhi.add(dlo, alpha=2), _BREAK), (0, 1), value=_BREAK)
    code[spans.cu_seqlens[1:-1] - 1] = _BREAK  # links into a sequence's first row (-1: the last link)
    brk = code == _BREAK
    # Per link r, the last fixing link j <= r (a break, a link equal to the one before it, or
    # link 0, after which row 1 is no start) as 2 j + brk[j]: row r + 1 starts iff brk[j]
    # differs from the parity of r - j, the two low bits of (2 j + brk[j]) ^ 2 r.
    two_r = torch.arange(0, 2 * t, 2, device=dev)
    fixing = torch.ones(t, dtype=torch.bool, device=dev)
    fixing[1:] = code[1:] == code[:-1]
    fixing |= brk
    last = torch.where(fixing, two_r + brk, -1).cummax(0).values ^ two_r
    start = pad(((last ^ (last >> 1)) & 1)[:-1], (1, 0), value=1)
    # A segment's kind is its first link's; one that starts on a break is one full row.
    seg_code = code.masked_fill(brk, 0)
    if demoted is not None:
        rows = demoted.bool()
        start = start.masked_fill(rows, 1)
        seg_code = seg_code.masked_fill(rows, 0)
    if paged:
        # Full and causal segments keep lo fixed; where it is not the sequence's first key,
        # their rows become one-row windows. A row's segment has its first row's code, and a
        # row that starts none is joined to the row before by a link of its segment's code.
        own = torch.where(start == 1, seg_code, pad(code[:-1], (1, 0)))
        bad = (own <= 1) & (lo > 0)
        start = start.masked_fill(bad, 1)
        seg_code = seg_code.masked_fill(bad, 3)
    # One read-back of the count and the first `cap` starts (a fixed size: no sync before it);
    # more starts than that are read again, all of them.
    count = start.sum().view(1)
    cap = min(t, _SEGMENT_CAPACITY)
    while True:
        s = torch.nonzero_static(start, size=cap, fill_value=t).squeeze(1).clamp(max=t - 1)
        seq = torch.searchsorted(spans.cu_seqlens[1:], s, right=True)
        table = torch.stack([seg_code[s].long(), s, seq, lo[s].long(), hi[s].long(), spans.cu_seqlens_k[seq]])
        host = torch.cat([count, table.flatten()]).cpu()
        n = int(host[0])
        if n <= cap:
            return host[1:].view(6, cap)[:, :n].tolist()
        cap = n


def _launches(spans: SpanMask, seg: list[list[int]], members: dict[tuple[int, int], list[int]],
              paged: bool) -> SegmentPlan:
    """The launches of grouped segments (host lists), their tensors moved in one copy."""
    _, q_start, q_len, k_start, k_len, _, seq = seg
    t, tk = spans.total_tokens, spans.total_keys
    flat: list[int] = []
    order = sorted(members)
    picked = []
    for g in order:
        # Most rows x keys first (a stable sort): a launch should not end on its longest tiles.
        sel = sorted(members[g], key=lambda i: -q_len[i] * k_len[i])
        picked.append(sel)
        for column, total in ((q_start, t), (q_len, None), (k_start, tk), (k_len, None), (seq, None)):
            flat += [column[i] for i in sel] + ([total] if total is not None else [])
    moved = host_to_device(torch.tensor(flat, dtype=torch.int32), spans.lo.device)
    calls, at = [], 0
    for (kind, left), sel in zip(order, picked):
        n = len(sel)
        views = []
        for size in (n + 1, n, n + 1, n, n):
            views.append(moved[at : at + size])
            at += size
        window = {_FULL: (None, None), _CAUSAL: (None, 0), _WINDOW: (left, 0), _OPEN: (left, None)}[kind]
        lengths = [q_len[i] for i in sel], [k_len[i] for i in sel]
        calls.append(SegmentCall(KINDS[kind], *window, views[0], views[1], views[2], views[3], max(lengths[0]),
                                 max(lengths[1]), views[4], pack_gqa=_fa4_pack_gqa(KINDS[kind]),
                                 grad_chunks=_grad_chunks(*lengths, _GRAD_KEYS * tk)))
    # FA4's backward where no key is read by two segments (see SegmentPlan.fa4_backward).
    ranges = sorted(zip(k_start, k_len))
    disjoint = all(a + n <= b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    return SegmentPlan(tuple(calls), t, tk, paged, fa4_backward=disjoint)


def _grad_chunks(q_len: list[int], k_len: list[int], budget: int) -> tuple[GradChunk, ...]:
    """Consecutive segments of a launch, as few chunks as keep each chunk's keys within
    ``budget`` (a segment longer than the budget takes a chunk of its own)."""
    bounds, first, keys = [], 0, 0
    for j, n in enumerate(k_len):
        if j > first and keys + n > budget:
            bounds.append((first, j))
            first, keys = j, 0
        keys += n
    bounds.append((first, len(k_len)))
    return tuple(GradChunk(a, b, sum(q_len[a:b]), sum(k_len[a:b]), max(q_len[a:b]), max(k_len[a:b])) for a, b in bounds)


# ============================================================================ the plan type
@dataclass(frozen=True, eq=False)
class Plan:
    """What one backend needs to launch over one :class:`SpanMask` and head shape, built once
    and shared by the layers that use them: ``bidiattn.attention(..., plan=)`` and
    ``bidiattn.serving.kvcache.paged_attention(..., plan=)``.

    - ``backend``: the backend it chose (``"triton"``, ``"fa4"``, ``"gluon"``, ``"flex"`` or ``"reference"``).
    - ``triton``: for ``"triton"``, the :class:`LaunchPlan` (tile config, tile table, launch
      order; with ``training``, its ``backward`` :class:`BackwardPlan` too).
    - ``segments``: for ``"fa4"``, the :class:`SegmentPlan` (row segments, launch kinds and
      windows, per-launch FA4 options, which backward runs and its chunks).
    - ``gluon``: for ``"gluon"``, the :class:`~bidiattn.kernels.sm90_wide.GluonPlan` (the
      forward's kernel config and query-tile table; with ``training``, the backward's dQ and
      dK/dV tile tables).
    - ``masked``: for an ``"fa4"`` plan over contiguous self-attention keys where
      :func:`masked_layers` picks it, the :class:`~bidiattn.kernels.fa4_masked.MaskTables` of
      one FA4 launch with the spans as its mask function (its forward; FA4's backward with
      ``training``); the call runs it instead of the segment launches, and ``segments`` is
      then ``None``.
    - ``backward``: with ``training``, the Triton backward's :class:`BackwardPlan` where the
      backward runs Triton's kernels (a triton plan, the same as ``triton.backward``; an fa4
      plan whose ``segments.fa4_backward`` is false); ``None`` elsewhere.
    - the head shape ``num_q_heads``/``num_kv_heads``/``head_dim``, ``window``, ``training``,
      ``paged`` (keys through a page table) and ``dtype`` it was made for.

    Tied to its ``SpanMask`` object (held by weak reference: a plan kept on its spans never
    keeps them alive): a call with other spans, even equal ones, or another head shape raises
    ``ValueError``.
    """

    spans_ref: weakref.ref = field(repr=False)
    backend: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    window: int | None = None
    training: bool = False
    paged: bool = False
    dtype: torch.dtype = torch.bfloat16
    triton: LaunchPlan | None = field(default=None, repr=False)
    segments: SegmentPlan | None = field(default=None, repr=False)
    gluon: GluonPlan | None = field(default=None, repr=False)
    masked: MaskTables | None = field(default=None, repr=False)
    backward: BackwardPlan | None = field(default=None, repr=False)

    @property
    def spans(self) -> SpanMask | None:
        """The spans this plan was made for (``None`` once they are gone)."""
        return self.spans_ref()

    def check(self, q: torch.Tensor, num_kv_heads: int, spans: SpanMask, *, paged: bool) -> None:
        """ValueError unless this plan was made for these spans, this head shape (``q [T, Hq,
        D]`` over ``num_kv_heads`` K/V heads) and this key layout (``paged``)."""
        if spans is not self.spans:
            raise ValueError("this plan was made for another SpanMask object (plans are tied to the object, not "
                             "its values); plan each step's spans: bidiattn.plan(spans, ...)")
        got = (q.shape[1], num_kv_heads, q.shape[2])
        want = (self.num_q_heads, self.num_kv_heads, self.head_dim)
        if got != want:
            raise ValueError(f"this plan is for (Hq, Hkv, D) = {want}, the call has {got}")
        if self.backend == "fa4" and self.paged != paged:
            where = "serving.kvcache.paged_attention" if paged else "bidiattn.attention"
            raise ValueError(f"this fa4 plan was made with paged={self.paged}; {where} needs "
                             f"bidiattn.plan(..., paged={paged})")
        if paged and self.backend not in ("triton", "fa4", "gluon"):
            raise ValueError(f"paged_attention runs 'triton', 'fa4' or 'gluon'; this plan runs "
                             f"backend={self.backend!r}")


def check_plan(plan: Plan, q: torch.Tensor, num_kv_heads: int, spans: SpanMask, *, paged: bool, backend: str) -> None:
    """A plan passed to a call: a :class:`Plan` (``TypeError`` otherwise), for these spans, head
    shape and key layout (:meth:`Plan.check`), and for the backend the call asks for."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a bidiattn.Plan from bidiattn.plan(), got {type(plan).__name__}")
    plan.check(q, num_kv_heads, spans, paged=paged)
    if backend not in ("auto", plan.backend):
        raise ValueError(f"this plan runs backend={plan.backend!r}; the call asks for backend={backend!r}")


def plan(spans: SpanMask, num_q_heads: int, num_kv_heads: int, head_dim: int, *, window: int | None = None,
         backend: str = "auto", training: bool = False, dtype: torch.dtype = torch.bfloat16,
         paged: bool = False) -> Plan:
    """The launch plan of ``spans`` for ``q [T, Hq, D]`` and ``k``/``v [T_keys, Hkv, D]`` with
    ``Hq = num_q_heads``, ``Hkv = num_kv_heads``, ``D = head_dim``: pass it to every layer that
    uses these spans (``bidiattn.attention(..., plan=)``, or
    ``serving.kvcache.paged_attention(..., plan=)`` with ``paged=True``).

    Args:
        backend: ``"auto"`` (the fastest exact backend that takes the call: see
            :func:`auto_backend`), or ``"triton"``, ``"fa4"``, ``"gluon"``, ``"flex"``,
            ``"reference"``.
        training: also plan the backward (the Triton backward's tile tables and orders, for
            triton and gluon plans and fa4 plans whose backward runs Triton's kernels).
        dtype: the inputs' dtype; ``"auto"`` takes the fast kernels for fp16/bf16 only.
        paged: keys read through a page table (FA4 launches then start every segment's keys
            at its sequence's first key; gluon copies the keys out of the pages first); auto
            picks triton for paged keys (gluon at head dim 512 for long prefill chunks).
        window: the layers' sliding window, if any (default: the spans' ``window`` hint);
            validated and recorded. The mask comes from the spans alone; the window picks tile
            shapes (the masked FA4 launch's key tile at head dim 256, decode's key slices).

    Cost: Triton and Gluon, two small launches per tile table, no host sync; FA4, one launch for
    the masked launch's tables (:func:`masked_layers`: SM90, contiguous keys) or, elsewhere
    (paged keys, SM100), the segments built on the spans' device with one host sync (the
    launch sizes depend on the data), and with ``training`` the Triton backward's tables
    where it runs. Bad sizes, a
    head count that is not a multiple of the K/V head count, a non-positive window or an
    unknown backend raise ``ValueError``; sizes may be any integer type (numpy's too; bools and
    floats raise ``TypeError``). A triton plan needs the spans on a CUDA device (or
    ``TRITON_INTERPRET=1``) and Triton installed (``ImportError`` naming the install); a
    backend named explicitly refuses a head dim or dtype it cannot run, as the call would.

    Example (a model's layers sharing one mask)::

        spans = rules.build("gemma3", "official", "full", block_ids=ids)
        p = bidiattn.plan(spans, 16, 8, 128)
        for layer in layers:
            out = bidiattn.attention(q, k, v, spans, plan=p)
    """
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    hq, hkv, d = _check_heads(num_q_heads, num_kv_heads, head_dim)
    window = _check_window(window)
    if window is None:
        window = spans.window  # the spans' own hint (rules.build records the window it cut with)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    for name, value in (("training", training), ("paged", paged)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r} ({type(dtype).__name__})")
    device = spans.lo.device
    if backend == "auto":
        backend = auto_backend(device, dtype, d, spans.total_tokens / spans.num_sequences, paged=paged)
    if paged and backend not in ("triton", "fa4", "gluon"):
        raise ValueError(f"paged keys run on backend 'triton', 'fa4' or 'gluon', got backend={backend!r}")
    tie = dict(spans_ref=weakref.ref(spans), backend=backend, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
               window=window, training=training, paged=paged, dtype=dtype)
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"a triton plan needs the spans on a CUDA device (or TRITON_INTERPRET=1), got {device}")
        unsupported = triton_unsupported(device, dtype, d)  # Triton installed, dtype, head dim
        if unsupported is not None:
            raise unsupported
        forward = plan_forward(spans, hq, hkv, d, window=window)
        if training:
            forward = dataclasses.replace(forward, backward=plan_backward(spans, d))
        return Plan(**tie, triton=forward, backward=forward.backward)
    if backend == "gluon":
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"a gluon plan needs the spans on a CUDA device, got {device}")
        if d != 512 or dtype not in HALF_DTYPES:
            raise gluon_unsupported(device, dtype, d)  # the head dim or the dtype
        from .kernels.sm90_wide.plan import plan_gluon

        return Plan(**tie, gluon=plan_gluon(spans, training=training))
    if backend == "fa4":
        from .kernels.fa4_masked import device_capability, mask_tables, masked_unsupported

        capability = device_capability(device)
        layers = "none" if paged or masked_unsupported(spans, d, capability) is not None else \
            masked_layers(capability)
        if layers == "all":  # no segments, so no host sync
            return Plan(**tie, masked=mask_tables(spans, d, backward=training, capability=capability,
                                                      window=window))
        segments = plan_segments(spans, paged=paged)
        backward = None
        triton_runs = (device.type == "cuda" or interpreting()) and triton_missing() is None
        if training and not segments.fa4_backward and triton_runs:
            backward = plan_backward(spans, d)
        return Plan(**tie, segments=segments, backward=backward)
    return Plan(**tie)


def masked_layers(capability: tuple[int, int] = (9, 0)) -> str:
    """Which layers an fa4 plan on a GPU of compute ``capability`` runs as one FA4 launch with the
    spans as its mask function (:mod:`bidiattn.kernels.fa4_masked`) rather than as segment
    launches, where that launch takes the call (self-attention keys, not paged): ``"all"`` or
    ``"none"``. On SM90 every layer, forward and training: it plans with one launch and no host
    sync, where the segments read their launch sizes back to the host; at hd256 the segments
    run a few percent faster once planned, less than their planning costs a step with new spans
    (benchmarks/NOTES.md, "hd256 plans take the masked launch too"). Elsewhere (SM100: not
    measured) the segments."""
    return "all" if capability[0] == 9 else "none"


def planned(spans: SpanMask, num_q_heads: int, num_kv_heads: int, head_dim: int, *, backend: str, training: bool,
            dtype: torch.dtype, paged: bool, softcap: bool = False) -> Plan:
    """The plan a call without ``plan=`` runs: :func:`plan` once per ``SpanMask`` object, head
    shape, backend, dtype, key layout and whether it trains, kept on the spans (their private
    ``_plans``; spans are immutable, so a plan never goes stale, and it dies with them). A
    training plan also serves calls that need no gradient. With ``softcap``, ``backend="auto"``
    plans triton where it would pick gluon (the Gluon kernel has no softcap)."""
    key = (num_q_heads, num_kv_heads, head_dim, backend, dtype, paged, interpreting())
    cache = spans._plans
    found = cache.get(key + (True,))
    if found is None and not training:
        found = cache.get(key + (False,))
    if found is None:
        found = cache[key + (training,)] = plan(spans, num_q_heads, num_kv_heads, head_dim, backend=backend,
                                                training=training, dtype=dtype, paged=paged)
    if found.backend == "gluon" and softcap and backend == "auto":
        return planned(spans, num_q_heads, num_kv_heads, head_dim, backend="triton", training=training, dtype=dtype,
                       paged=paged)
    return found
