"""The softmax backward's row term ``delta = rowsum(out * dout) - dlse``, one launch; shared by the
Triton backward and the hd512 Gluon backward (imports no other kernel module and no planner)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["row_delta"]


@triton.jit
def _delta_kernel(o, do, dlse, delta, t_len, stride_ot, stride_oh, stride_dt, stride_dh, stride_lh,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    i_h, i_m = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    ok = (o_m[:, None] < t_len) & (o_d[None, :] < D)
    rows = o_m.to(tl.int64)[:, None]
    b_o = tl.load(o + rows * stride_ot + i_h * stride_oh + o_d[None, :], mask=ok, other=0.0).to(tl.float32)
    b_do = tl.load(do + rows * stride_dt + i_h * stride_dh + o_d[None, :], mask=ok, other=0.0).to(tl.float32)
    b_dlse = tl.load(dlse + i_h * stride_lh + o_m, mask=o_m < t_len, other=0.0)
    tl.store(delta + i_h * stride_lh + o_m, tl.sum(b_o * b_do, 1) - b_dlse, mask=o_m < t_len)


def row_delta(out: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """``delta [Hq, T]`` (fp32) ``= sum_d out * do - dlse``, the softmax backward's row term, in
    one launch (``out``/``do`` ``[T, Hq, D]`` with unit stride along D; ``dlse`` ``[Hq, T]`` or None)."""
    t_len, hq, d = out.shape
    delta = torch.empty(hq, t_len, dtype=torch.float32, device=out.device)
    dlse = torch.zeros_like(delta) if dlse is None else dlse.float().contiguous()
    _delta_kernel[(hq, triton.cdiv(t_len, 64))](
        out, do, dlse, delta, t_len, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        D=d, BLOCK_M=64, BLOCK_D=triton.next_power_of_2(d))
    return delta
