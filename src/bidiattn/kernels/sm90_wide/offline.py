"""Compile the kernel for sm_90a without a GPU (Triton's compile path and the ptxas in its wheel):
register use, spills and shared memory of a config, to check one before GPU time is spent on it.

    python -m bidiattn.kernels.sm90_wide.offline [config names... | dv | dk | dq]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .host import CONFIGS, HEAD_DIM, MAXNREG, NUM_WARPS, Sm90WideConfig, multicast_unavailable

__all__ = ["compile_backward_offline", "compile_offline"]

_TABLES = ("t_seq", "t_start", "t_rows", "t_lo_min", "t_lo_max", "t_hi_min", "t_hi_max", "order_ptr")


def _compile(fn, sig: dict, constants: dict, dtype: str, num_warps: int = NUM_WARPS, num_ctas: int = 1,
             span: tuple[str, str] | None = None) -> dict:
    """Compile a Gluon kernel for ``GPUTarget("cuda", 90, 128)`` and assemble it with Triton's own
    ptxas for sm_90 (:func:`_assemble`): registers, spill bytes, shared bytes, the per-partition register requests
    (``setmaxnreg`` in the PTX), the SASS's wgmma counts and, with ``span``, one stretch of its schedule
    (:func:`_sass_counts`), and the PTX itself."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = dict(sig, **{name: "constexpr" for name in constants})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    compiled = triton.compile(GluonASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", 90, 128),
                              options=dict(num_warps=num_warps, maxnreg=MAXNREG, num_ctas=num_ctas))
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        log = _assemble(path)
        sass = _sass_counts(Path(f"{path}.o"), span)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_stores, spill_loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return dict(dtype=dtype, registers=regs, spill_stores=spill_stores, spill_loads=spill_loads,
                shared=compiled.metadata.shared, warps=compiled.metadata.num_warps,
                setmaxnreg=sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}),
                sass=sass, ptx=ptx)


def _assemble(ptx: Path) -> str:
    """ptxas -v's report for ``ptx`` on sm_90a, from the ptxas Triton itself assembles sm_90 with
    (3.6: the wheel's ``ptxas``; 3.9: its ``ptxas-blackwell``, which takes the PTX 9.x 3.9 writes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(ptx), "-o", f"{ptx}.o"],
                          capture_output=True, text=True, check=True).stderr


def _sass_schedule(dump: str) -> list[tuple[str, int]]:
    """``(instruction, stall cycles)`` of each instruction in ``cuobjdump --dump-sass`` output: the
    stall count is bits 41-44 of the instruction's second (control) word, the cycles ptxas has the
    warp wait before issuing its next instruction (a static lower bound: no memory or barrier waits)."""
    lines = dump.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        ins = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line)
        ctl = re.search(r"/\* (0x[0-9a-f]{16}) \*/", lines[i + 1])
        if ins and ctl:
            out.append((re.sub(r"^@!?U?P\w+\s+", "", ins.group(1)), (int(ctl.group(1), 16) >> 41) & 0xF))
    return out


def _sass_counts(cubin: Path, span: tuple[str, str] | None = None) -> dict:
    """How many ``HGMMA`` instructions the assembled kernel holds, and how many of them follow an ``R2UR``
    within four instructions (Triton's ``cuobjdump``). Triton 3.6's PTX forms wgmma shared-memory
    descriptors with 64-bit adds that ptxas keeps on the uniform datapath; Triton 3.9's forms them from
    32-bit words that ptxas keeps in vector registers and moves with ``R2UR`` before nearly every
    ``HGMMA`` (NOTES.md, head dim 512: where 3.9's backward passes lose time). With ``span = (a, b)``
    (two ``HGMMA`` shapes, e.g. ``("64x64x16", "64x256x16")``) also ``span_instructions`` and
    ``span_stall_cycles``: from the last ``HGMMA`` of shape ``a`` to the first of shape ``b`` after it
    (:func:`_sass_schedule`), the split schedule's front warpgroup from a key block's last ``Q K^T``
    wgmma to its ``P V`` wgmma."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = Path(get_ptxas(90).path).with_name("cuobjdump")
    dump = subprocess.run([str(tool), "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    schedule = _sass_schedule(dump)
    ops = [ins.split()[0].split(".")[0] for ins, _ in schedule]
    at = [i for i, op in enumerate(ops) if op == "HGMMA"]
    counts = dict(hgmma=len(at), hgmma_after_r2ur=sum("R2UR" in ops[max(0, i - 4):i] for i in at))
    if span is not None:
        first = max(i for i in at if f".{span[0]}." in schedule[i][0])
        last = min(i for i in at if f".{span[1]}." in schedule[i][0] and i > first)
        counts.update(span_instructions=last - first, span_stall_cycles=sum(c for _, c in schedule[first:last]))
    return counts


def _desc(dtype: str, rows: int, gdtype, layout=None, cols: int = HEAD_DIM) -> str:
    from triton.experimental.gluon import language as gl

    layout = layout or gl.NVMMASharedLayout.get_default_for([rows, cols], gdtype)
    return f"tensordesc<{dtype}[{rows},{cols}],{layout!r}>"


def compile_offline(config: Sm90WideConfig, dtype: str = "bf16", heads: int = 16, index_dtype: str = "i32") -> dict:
    """The forward kernel of ``config`` compiled for sm_90a (see :func:`_compile`); a cluster config
    needs a Triton whose Gluon multicasts TMA loads (``ValueError`` otherwise)."""
    from triton.experimental.gluon import language as gl

    from . import kernel
    from .host import _check_multicast, tile_layouts, v_box

    _check_multicast(config)
    gdtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    fn = kernel.hd512_forward_kernel
    sig = {name: "i32" for name in fn.arg_names}
    q_layout, k_layout, v_layout = tile_layouts(config, gdtype)
    sig.update(q_desc=_desc(dtype, config.block_m, gdtype, q_layout),
               k_desc=_desc(dtype, config.block_n, gdtype, k_layout),
               v_desc=_desc(dtype, config.block_n, gdtype, v_layout, cols=v_box(config)[1]),
               out_ptr=f"*{dtype}", lse_ptr="*fp32", lo_ptr=f"*{index_dtype}", hi_ptr=f"*{index_dtype}",
               cu_q_ptr="*i64", cu_k_ptr="*i64", qk_scale="fp32", **{n: "*i32" for n in _TABLES})
    constants = dict(HEADS=heads, HEAD_DIM=HEAD_DIM, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                     K_STAGES=config.k_stages, V_STAGES=config.v_stages, P_STAGES=config.p_stages,
                     SOFTMAX_REGS=config.softmax_regs, STORE_COLS=config.store_cols,
                     SPLIT=config.split, CLUSTER=config.cluster, FUSED=config.fused_softmax,
                     LAG=config.lag)
    span = (f"64x{config.block_n}x16", f"64x{HEAD_DIM // 2}x16") if config.split else None
    return dict(config=config.name, **_compile(fn, sig, constants, dtype, config.num_warps, config.cluster, span))


def compile_backward_offline(name: str, dtype: str = "bf16", kv_heads: int = 4, group: int = 4,
                             index_dtype: str = "i32") -> dict:
    """A backward pass kernel (``"dv"``, ``"dk"`` or ``"dq"``, :data:`.host.BACKWARD_PASSES`) compiled for
    sm_90a (see :func:`_compile`)."""
    from triton.experimental.gluon import language as gl

    from . import backward_kernel
    from .host import BACKWARD_PASSES

    cfg = BACKWARD_PASSES[name]
    gdtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    fn = getattr(backward_kernel, f"hd512_{name}_kernel")
    rows, keys = _desc(dtype, cfg["BLOCK_M"], gdtype), _desc(dtype, cfg["BLOCK_N"], gdtype)
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(k_desc=keys, v_desc=keys, q_desc=rows, do_desc=rows, dv_ptr=f"*{dtype}", dk_ptr=f"*{dtype}",
               dq_ptr=f"*{dtype}", lse_ptr="*fp32", delta_ptr="*fp32", lo_ptr=f"*{index_dtype}",
               hi_ptr=f"*{index_dtype}", cu_q_ptr="*i64", cu_k_ptr="*i64", qk_scale="fp32", scale="fp32",
               **{n: "*i32" for n in _TABLES + ("t_key_start", "t_keys", "t_q_first", "t_q_last")})
    sig = {n: sig[n] for n in fn.arg_names}
    heads = dict(HEADS=kv_heads * group) if name == "dq" else dict(KV_HEADS=kv_heads, GROUP=group)
    constants = dict(**heads, HEAD_DIM=HEAD_DIM, **cfg)
    return dict(config=name, **_compile(fn, sig, constants, dtype))


def main(argv: list[str]) -> int:
    names = argv or list(CONFIGS)
    bad = 0
    for name in names:
        why = name in CONFIGS and CONFIGS[name].cluster > 1 and multicast_unavailable()
        if why:
            print(f"{name:10s} skipped: {why}")
            continue
        for dtype in ("bf16", "fp16"):
            r = compile_backward_offline(name, dtype) if name in ("dv", "dk", "dq") else compile_offline(CONFIGS[name], dtype)
            ok = r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["shared"] <= 232448
            bad += not ok
            print(f"{name:10s} {r['config']:22s} {dtype}  regs {r['registers']}  spills {r['spill_stores']}/"
                  f"{r['spill_loads']}  shared {r['shared']}  warps {r['warps']}  setmaxnreg {r['setmaxnreg']}"
                  f"  hgmma {r['sass']['hgmma']} ({r['sass']['hgmma_after_r2ur']} after R2UR)"
                  + (f"  QK->PV {r['sass']['span_instructions']} instructions / {r['sass']['span_stall_cycles']} "
                     f"stall cycles" if "span_instructions" in r["sass"] else "") + f"  {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
