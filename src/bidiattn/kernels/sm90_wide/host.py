"""Host side of the head-dim-512 SM90 kernels: the forward's configs and :func:`default_config`,
argument checks, tile tables, the forward's and the backward's launches.

Importing this module imports neither Triton nor Gluon (the checks run on any machine); the
kernel modules are imported by :func:`forward_sm90_hd512` / :func:`backward_sm90_hd512` when
they launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...inputs import check_attention_inputs
from ...spans import SpanMask, TileSummary

__all__ = ["CONFIGS", "Sm90WideConfig", "check_inputs", "backward_sm90_hd512", "default_config",
           "forward_sm90_hd512", "gluon_unavailable"]

HEAD_DIM = 512
BLOCK_M = 64
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on SM90 (227 KiB)
# The kernel runs 12 warps (8: output warpgroups, the default partition; 4: softmax warpgroup), one
# block per SM: 65536 registers / 384 threads = 170, rounded down to a multiple of 8.
MAXNREG = 168
NUM_WARPS = 8
HALF_DTYPES = (torch.float16, torch.bfloat16)
SCHEDULES = ("output", "split")


@dataclass(frozen=True)
class Sm90WideConfig:
    """One kernel configuration.

    - ``block_n``: keys per block (32 or 64; a power of two from 16 to 128).
    - ``k_stages``/``v_stages``: K and V ring depths (tiles of ``block_n x 512``).
    - ``p_stages``: buffers of P and of the row rescale factors between the warpgroups.
    - ``softmax_regs``: registers per thread of the softmax warpgroup (a multiple of 8); the
      output warpgroups get the rest of the 168 x 12 warps budget.
    - ``store_cols``: columns per masked store chunk of the epilogue.
    - ``schedule``: ``"output"`` (a softmax warpgroup and two output warpgroups, 12 warps) or
      ``"split"`` (the softmax warpgroup also owns output columns 0-255 with P from its registers,
      a second warpgroup columns 256-511, a load warp: 9 warps, launched as 12; ``softmax_regs`` is
      then the second warpgroup's share).
    - ``cluster``: CTAs per program (1 or 2; 2 with the split schedule, and a Triton whose Gluon
      multicasts TMA loads: 3.9): two CTAs over 2 x 64 query rows of one head, each K/V block read
      from L2 once and multicast into both.
    - ``fused_softmax``: the online softmax's row maximum taken on the unscaled scores and the scale
      applied inside the exponent (one FMA an element), in-thread maxima and sums as trees, the row
      sum kept per quad lane until the end (the kernel's ``FUSED``).
    - ``lag`` (split schedule, one CTA): the first warpgroup publishes a key block's P only after
      issuing the next block's ``Q K^T``, so the second warpgroup's ``P V`` runs during the first
      one's softmax rather than ahead of its ``P V``; V's halves get their own stages (the second
      warpgroup loads its half), the kernel's ``LAG``.
    """

    block_n: int = 64
    k_stages: int = 1
    v_stages: int = 1
    p_stages: int = 2
    softmax_regs: int = 144
    store_cols: int = 64
    schedule: str = "output"
    cluster: int = 1
    fused_softmax: bool = False
    lag: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Sm90WideConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("block_n", "k_stages", "v_stages", "p_stages", "softmax_regs", "store_cols", "cluster"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Sm90WideConfig.{name} must be an int, got {value!r}")
        for name in ("fused_softmax", "lag"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Sm90WideConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.lag and not (self.split and self.cluster == 1):
            raise ValueError(f"Sm90WideConfig.lag needs schedule='split' and cluster=1, got "
                             f"schedule={self.schedule!r}, cluster={self.cluster}")
        if self.cluster not in (1, 2):
            raise ValueError(f"Sm90WideConfig.cluster must be 1 or 2, got {self.cluster!r}")
        if self.cluster == 2 and not self.split:
            raise ValueError(f"Sm90WideConfig.cluster=2 needs schedule='split', got schedule={self.schedule!r}")
        if self.block_n not in (16, 32, 64, 128):
            raise ValueError(f"Sm90WideConfig.block_n must be 16, 32, 64 or 128, got {self.block_n}")
        for name in ("k_stages", "v_stages", "p_stages"):
            if not 1 <= getattr(self, name) <= 8:
                raise ValueError(f"Sm90WideConfig.{name} must be in 1..8, got {getattr(self, name)}")
        if self.softmax_regs % 8 or not 24 <= self.softmax_regs <= 256:
            raise ValueError(f"Sm90WideConfig.softmax_regs must be a multiple of 8 in 24..256, got {self.softmax_regs}")
        if self.split and self.softmax_regs < 160:
            raise ValueError(f"Sm90WideConfig.softmax_regs={self.softmax_regs} is the split schedule's second "
                             f"warpgroup's share; its accumulator alone takes 128 (need >= 160)")
        if self.output_regs < 160:
            raise ValueError(f"Sm90WideConfig.softmax_regs={self.softmax_regs} leaves the output warpgroups "
                             f"{self.output_regs} registers a thread; their accumulator alone takes 128 (need >= 160)")
        if self.store_cols not in (32, 64, 128) :
            raise ValueError(f"Sm90WideConfig.store_cols must be 32, 64 or 128, got {self.store_cols}")
        if self.shared_bytes > SMEM_LIMIT:
            raise ValueError(f"Sm90WideConfig {self} needs {self.shared_bytes} bytes of shared memory, "
                             f"more than SM90's {SMEM_LIMIT}")

    @property
    def split(self) -> bool:
        """The split schedule (the kernel's ``SPLIT``)."""
        return self.schedule == "split"

    @property
    def block_m(self) -> int:
        """Query rows of a program (a tile of the tile table): 64 a CTA."""
        return BLOCK_M * self.cluster

    @property
    def num_warps(self) -> int:
        """Warps of the default partition (the launch's ``num_warps``)."""
        return 4 if self.split else NUM_WARPS

    @property
    def output_regs(self) -> int:
        """Registers a thread of the warpgroups that own the softmax's leftovers: the output
        warpgroups (8 warps), or the split schedule's first warpgroup (beside a load warpgroup at 24)."""
        if self.split:
            return (MAXNREG * 12 - 4 * 24 - 4 * self.softmax_regs) // 4 // 8 * 8
        return (MAXNREG * 12 - 4 * self.softmax_regs) // 8 // 8 * 8

    @property
    def shared_bytes(self) -> int:
        """Shared memory the kernel allocates (Q, the K/V rings, P, rescale factors, barriers)."""
        tile = self.block_n * HEAD_DIM * 2
        return (BLOCK_M * HEAD_DIM * 2 + (self.k_stages + self.v_stages) * tile
                + self.p_stages * (BLOCK_M * self.block_n * 2 + BLOCK_M * 4) + BLOCK_M * 4 + 1024)

    @property
    def name(self) -> str:
        return (f"n{self.block_n}-k{self.k_stages}v{self.v_stages}p{self.p_stages}-r{self.softmax_regs}"
                + ("" if self.store_cols == 64 else f"-s{self.store_cols}")
                + ("" if self.schedule == "output" else f"-{self.schedule}") + ("" if self.cluster == 1 else "-c2")
                + ("-f" if self.fused_softmax else "") + ("-lag" if self.lag else ""))


# Named configs the benchmark's --variants compares (all compile for sm_90a without spills).
CONFIGS = {
    "n64": Sm90WideConfig(),
    "n32": Sm90WideConfig(block_n=32, k_stages=2, v_stages=2, softmax_regs=120),
    "split": Sm90WideConfig(softmax_regs=240, schedule="split"),
    "split-c2": Sm90WideConfig(softmax_regs=240, schedule="split", cluster=2),
    "split-f": Sm90WideConfig(softmax_regs=240, schedule="split", fused_softmax=True),
    "split-c2-f": Sm90WideConfig(softmax_regs=240, schedule="split", cluster=2, fused_softmax=True),
    "split-lag": Sm90WideConfig(softmax_regs=240, schedule="split", lag=True),
    "split-f-lag": Sm90WideConfig(softmax_regs=240, schedule="split", fused_softmax=True, lag=True),
}


def default_config() -> Sm90WideConfig:
    """The forward's config where a call names none: ``CONFIGS["split-c2"]`` where this Triton's
    Gluon multicasts TMA loads (3.9), ``CONFIGS["split"]`` otherwise (benchmarks/PERF.md, G13: the
    fastest config of each release, in every case of one run)."""
    return CONFIGS["split"] if multicast_unavailable() else CONFIGS["split-c2"]


# Triton releases whose Gluon the kernels are checked with on an SM90 GPU (output and gradients
# against the reference, paged keys, CUDA graphs, the vLLM step): 3.6 (torch 2.11's) and 3.9
# (torch 2.13's); any other release takes the triton backend.
GPU_CHECKED_TRITON = ("3.6", "3.9")


def gluon_unavailable() -> Exception | None:
    """Why the Gluon kernel cannot run here (no Triton, a Triton release it is not checked with on
    a GPU (:data:`GPU_CHECKED_TRITON`: Gluon is experimental and changes between releases), or an
    import failure), or None."""
    try:
        import triton
    except ImportError as err:
        return err
    if ".".join(triton.__version__.split(".")[:2]) not in GPU_CHECKED_TRITON:
        return ImportError(f"the Gluon kernel is checked on a GPU with Triton {', '.join(GPU_CHECKED_TRITON)} only "
                           f"(Gluon's API changes between releases); this is Triton {triton.__version__}")
    try:
        from . import kernel  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means the kernel is unavailable
        return err
    return None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float | None,
                 config: Sm90WideConfig | None = None, *, need_device: bool = True) -> tuple[float, Sm90WideConfig]:
    """Checked ``(scale, config)`` of a call; ``TypeError``/``ValueError`` naming the bad value.
    ``need_device=False`` skips the CUDA/SM90 check (host-side tests)."""
    scale = check_attention_inputs(q, k, v, spans, scale, None)
    if q.dtype not in HALF_DTYPES:
        raise TypeError(f"forward_sm90_hd512 takes float16 or bfloat16, got {q.dtype}")
    if q.shape[-1] != HEAD_DIM:
        raise ValueError(f"forward_sm90_hd512 takes head dim {HEAD_DIM}, got {q.shape[-1]}")
    if config is None:
        config = default_config()
    elif not isinstance(config, Sm90WideConfig):
        raise TypeError(f"config must be a Sm90WideConfig, got {type(config).__name__}")
    if q.shape[0] >= 2**31 // (q.shape[1] * HEAD_DIM) or k.shape[0] >= 2**31:
        raise ValueError(f"forward_sm90_hd512 takes fewer than 2**31 elements per tensor row index, got {tuple(q.shape)}")
    if need_device:
        _check_device(q)
    return scale, config


def _check_device(q: torch.Tensor) -> None:
    if q.device.type != "cuda":
        raise ValueError(f"the hd512 Gluon kernels need CUDA tensors, got {q.device}")
    capability = torch.cuda.get_device_capability(q.device)
    if capability != (9, 0):
        raise ValueError(f"the hd512 Gluon kernels run on SM90 (H100/H200), this GPU is sm_{capability[0]}{capability[1]}")


def _tables(spans: SpanMask, tiles: tuple[TileSummary, torch.Tensor] | None,
            block_m: int) -> tuple[TileSummary, torch.Tensor]:
    if tiles is None:
        from ..tiles import query_tiles

        return query_tiles(spans, block_m)
    summary, order = tiles
    if not isinstance(summary, TileSummary) or not isinstance(order, torch.Tensor):
        raise TypeError(f"tiles must be (TileSummary, order tensor) from kernels.tiles.query_tiles, got "
                        f"({type(summary).__name__}, {type(order).__name__})")
    if summary.block_m != block_m:
        raise ValueError(f"tiles must have block_m={block_m} (the config's block_m), got {summary.block_m}")
    return summary, order


def multicast_unavailable() -> str | None:
    """Why a cluster config (``Sm90WideConfig.cluster=2``) cannot build here, or None: it multicasts
    its K/V loads with Gluon's ``tma.async_load(..., multicast=True)`` (Triton 3.9; 3.6's TMA load
    has no multicast; without Triton's Gluon, the import's error). Runs at every cluster launch and
    in :func:`default_config`, so it reads the parameter names off the function's code object
    rather than building an ``inspect.signature``."""
    import inspect

    try:
        import triton
        from triton.experimental.gluon.language.nvidia.hopper import tma
    except ImportError as err:
        return f"Sm90WideConfig.cluster=2 needs Gluon's multicast TMA load (Triton 3.9): {err}"
    load = getattr(tma, "async_load", None)
    code = None if load is None else inspect.unwrap(load).__code__
    if code is None or "multicast" not in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
        return (f"Sm90WideConfig.cluster=2 needs Gluon's multicast TMA load (Triton 3.9); this is Triton "
                f"{triton.__version__}")
    return None


def _check_multicast(config: Sm90WideConfig) -> None:
    """``ValueError`` where ``config`` is a cluster config that this Triton cannot build."""
    why = config.cluster > 1 and multicast_unavailable()
    if why:
        raise ValueError(why)


def v_box(config: Sm90WideConfig) -> list[int]:
    """The V descriptor's box: a whole ``[block_n, 512]`` tile, or with ``lag`` half of one (the load
    warp loads the first warpgroup's columns, the second warpgroup its own)."""
    return [config.block_n, HEAD_DIM // 2 if config.lag else HEAD_DIM]


def tile_layouts(config: Sm90WideConfig, gdtype) -> tuple:
    """Shared layouts of the kernel's Q tile ``[block_m, 512]``, K tiles ``[block_n, 512]`` and V
    boxes (:func:`v_box`), their TMA descriptors': in a cluster the CTAs split Q's rows and each
    receives every K/V tile whole (multicast)."""
    from triton.experimental.gluon import language as gl

    rows_cga, whole_cga = ([[1, 0]], [[0, 0]]) if config.cluster == 2 else (None, None)
    return (gl.NVMMASharedLayout.get_default_for([config.block_m, HEAD_DIM], gdtype, cga_layout=rows_cga),
            gl.NVMMASharedLayout.get_default_for([config.block_n, HEAD_DIM], gdtype, cga_layout=whole_cga),
            gl.NVMMASharedLayout.get_default_for(v_box(config), gdtype, cga_layout=whole_cga))


def _output(x: torch.Tensor | None, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if x is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if tuple(x.shape) != shape or x.dtype != dtype or x.device != device or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, got "
                         f"{x.dtype} {list(x.shape)} on {x.device}{'' if x.is_contiguous() else ' (not contiguous)'}")
    return x


def forward_sm90_hd512(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, scale: float | None = None,
                       *, config: Sm90WideConfig | None = None,
                       tiles: tuple[TileSummary, torch.Tensor] | None = None, out: torch.Tensor | None = None,
                       lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Span-mask attention forward at head dim 512 on SM90: ``(out [T, Hq, 512], lse [Hq, T] fp32)``,
    lse in natural log as :func:`bidiattn.reference.attention` returns it.

    Args:
        q: ``[T, Hq, 512]``; k, v: ``[T_keys, Hkv, 512]`` (``Hq % Hkv == 0``), fp16 or bf16, CUDA (SM90).
        spans: the mask (self-attention or extend spans).
        scale: softmax scale, default ``1/sqrt(512)``.
        config: a :class:`Sm90WideConfig` (default :func:`default_config`); a cluster config
            (``cluster=2``) needs Triton 3.9's multicast TMA load (``ValueError`` naming the Triton
            otherwise).
        tiles: ``kernels.tiles.query_tiles(spans, config.block_m)`` (64 rows; 128 for a cluster
            config), where the caller keeps it (a plan); computed here otherwise.
        out, lse: preallocated outputs (contiguous ``[T, Hq, 512]`` in q's dtype, ``[Hq, T]`` fp32).
    """
    scale, config = check_inputs(q, k, v, spans, scale, config)
    _check_multicast(config)
    from . import kernel as gk  # Gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    total, hq, d = q.shape
    t_keys, hkv, _ = k.shape
    q2, k2, v2 = (x.contiguous().view(x.shape[0], x.shape[1] * d) for x in (q, k, v))
    summary, order = _tables(spans, tiles, config.block_m)
    out = _output(out, "out", (total, hq, d), q.dtype, q.device)
    lse = _output(lse, "lse", (hq, total), torch.float32, q.device)
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout, k_layout, v_layout = tile_layouts(config, gdtype)
    q_desc = TensorDescriptor.from_tensor(q2, [config.block_m, d], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [config.block_n, d], k_layout)
    v_desc = TensorDescriptor.from_tensor(v2, v_box(config), v_layout)
    args = (q_desc, k_desc, v_desc, out, lse, spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k,
            summary.seq, summary.row_start, summary.rows, summary.lo_min, summary.lo_max, summary.hi_min,
            summary.hi_max, order, total, hq // hkv, scale * math.log2(math.e))
    common = dict(HEADS=hq, HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, K_STAGES=config.k_stages,
                  V_STAGES=config.v_stages, P_STAGES=config.p_stages, STORE_COLS=config.store_cols,
                  num_warps=config.num_warps, maxnreg=MAXNREG)
    if config.cluster > 1:
        common.update(CLUSTER=config.cluster, num_ctas=config.cluster)
    if config.fused_softmax:
        common.update(FUSED=True)
    if config.lag:
        common.update(LAG=True)
    grid = (hq, order.numel())
    gk.hd512_forward_kernel[grid](*args, **common, SOFTMAX_REGS=config.softmax_regs,
                                  SPLIT=config.split)
    return out, lse


# The backward's passes (kernels in backward_kernel.py); dV and dK: 64 keys a program. dV: query blocks of 64
# rows, one Q and one dO stage (K resident). dK: K and V resident, so query blocks of 32 rows. dQ:
# 64 query rows of one head (Q and dO resident), key blocks of 32; its score warpgroup at 168
# registers, where Triton 3.9's code does not spill (PERF G12).
BACKWARD_PASSES = {
    "dv": dict(BLOCK_M=64, BLOCK_N=64, Q_STAGES=1, DO_STAGES=1, P_STAGES=2, SCORE_REGS=120, STORE_COLS=64),
    "dk": dict(BLOCK_M=32, BLOCK_N=64, Q_STAGES=1, DO_STAGES=1, P_STAGES=2, SCORE_REGS=120, STORE_COLS=64),
    "dq": dict(BLOCK_M=64, BLOCK_N=32, K_STAGES=1, V_STAGES=1, P_STAGES=2, SCORE_REGS=168, STORE_COLS=64),
}


def backward_key_tiles(spans: SpanMask):
    """The key-tile table and launch order of the dV and dK passes (:func:`~..tiles.key_tiles` at
    their 64 keys): what a training plan keeps, built in the backward otherwise."""
    from ..tiles import key_tiles

    return key_tiles(spans, BACKWARD_PASSES["dv"]["BLOCK_N"])


def backward_sm90_hd512(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, spans: SpanMask, scale: float | None = None, *,
                        dlse: torch.Tensor | None = None, tiles=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` (q's dtype) of the span-mask attention whose forward gave ``out``
    and the natural-log ``lse``, in three Gluon passes (``backward_kernel.py``): dV and dK per
    64-key tile (the GQA group's heads summed in the program, deterministic), dQ per 64-row query
    tile, after ``delta = rowsum(dO * out) - dlse`` (the Triton backward's row-term launch). The
    gluon backend's backward.

    Args:
        do, q, out: ``[T, Hq, 512]``; k, v: ``[T_keys, Hkv, 512]``; fp16 or bf16, CUDA (SM90).
        lse, dlse: fp32 ``[Hq, T]`` (``dlse``: the gradient of the returned lse, or None).
        tiles: ``(key_tiles(spans, 64), query_tiles(spans, 64))`` where the caller keeps them; built
            here otherwise.
    """
    scale, _ = check_inputs(q, k, v, spans, scale, None, need_device=False)
    total, hq, d = q.shape
    t_keys, hkv, _ = k.shape
    for name, x in (("do", do), ("out", out)):
        if not isinstance(x, torch.Tensor) or x.shape != q.shape or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must be a {q.dtype} tensor of q's shape {list(q.shape)} on {q.device}, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    for name, x in (("lse", lse), ("dlse", dlse)):
        if x is None and name == "dlse":
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (hq, total) or x.dtype != torch.float32 or \
                x.device != q.device:
            raise ValueError(f"{name} must be a float32 tensor of shape {[hq, total]} on {q.device}, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    _check_device(q)
    from . import backward_kernel as bk
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if tiles is None:
        from ..tiles import query_tiles

        tiles = backward_key_tiles(spans), query_tiles(spans, BACKWARD_PASSES["dq"]["BLOCK_M"])
    (ktab, korder), (qtab, qorder) = tiles
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    flat = {n: x.contiguous().view(x.shape[0], x.shape[1] * d) for n, x in (("q", q), ("do", do), ("k", k), ("v", v))}

    def desc(name: str, rows: int):
        layout = gl.NVMMASharedLayout.get_default_for([rows, d], gdtype)
        return TensorDescriptor.from_tensor(flat[name], [rows, d], layout)

    from ..delta import row_delta

    lse = lse.contiguous()
    delta = row_delta(out.contiguous(), do.contiguous(), None if dlse is None else dlse.contiguous())
    # contiguous whatever q/k/v's strides: the passes write rows of Hq*512 / Hkv*512 elements
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    qk_scale = scale * math.log2(math.e)
    span_args = (spans.lo, spans.hi, spans.cu_seqlens, spans.cu_seqlens_k)
    key_table = (ktab.seq, ktab.key_start, ktab.keys, ktab.q_first, ktab.q_last, korder)
    common = dict(HEAD_DIM=d, num_warps=NUM_WARPS, maxnreg=MAXNREG)
    cfg = BACKWARD_PASSES["dv"]
    bk.hd512_dv_kernel[(hkv, korder.numel())](
        desc("k", cfg["BLOCK_N"]), desc("q", cfg["BLOCK_M"]), desc("do", cfg["BLOCK_M"]), dv, lse, *span_args,
        *key_table, total, qk_scale, KV_HEADS=hkv, GROUP=hq // hkv, **cfg, **common)
    cfg = BACKWARD_PASSES["dk"]
    bk.hd512_dk_kernel[(hkv, korder.numel())](
        desc("k", cfg["BLOCK_N"]), desc("v", cfg["BLOCK_N"]), desc("q", cfg["BLOCK_M"]), desc("do", cfg["BLOCK_M"]),
        dk, lse, delta, *span_args, *key_table, total, qk_scale, scale, KV_HEADS=hkv, GROUP=hq // hkv, **cfg,
        **common)
    cfg = BACKWARD_PASSES["dq"]
    bk.hd512_dq_kernel[(hq, qorder.numel())](
        desc("q", cfg["BLOCK_M"]), desc("do", cfg["BLOCK_M"]), desc("k", cfg["BLOCK_N"]), desc("v", cfg["BLOCK_N"]),
        dq, lse, delta, *span_args, qtab.seq, qtab.row_start, qtab.rows, qtab.lo_min, qtab.lo_max, qtab.hi_min,
        qtab.hi_max, qorder, total, hq // hkv, qk_scale, scale, HEADS=hq, **cfg, **common)
    return dq, dk, dv
