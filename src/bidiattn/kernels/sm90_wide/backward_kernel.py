"""Gluon kernels (Triton 3.6 and 3.9 APIs) of the head-dim-512 backward on SM90: the dV, dK and dQ passes.

The gluon backend's backward (launched by ``host.backward_sm90_hd512``); the CPU tests compile
them offline for sm_90a (registers, spills, shared memory), the GPU tests check them against
the fp32 reference.

Each pass is the forward's schedule (one score warpgroup, two output warpgroups that own 256 of
the 512 accumulator columns each, operands by TMA, the score tile handed over in shared memory)
with other roles. P is recomputed from the forward's lse (no running max, no rescale).

- dV, per 64-key tile of one K/V head (K resident): for every query block of 64 rows of the GQA
  group's heads, ``S^T = K Q^T``, ``P^T`` masked by the rows' spans; ``dV += P^T dO``.
- dK, per 64-key tile (K and V resident, so 32-row query blocks): also ``dP^T = V dO^T`` and
  ``dS^T = P^T (dP^T - delta)``; ``dK += dS^T Q``, times the softmax scale at the end.
- dQ, per 64-row query tile of one head (Q and dO resident, 32-key blocks from the span tile
  table, the mask only on partial blocks): ``dS = P (dP - delta)``; ``dQ += dS K``, times the scale.

Results leave through the resident buffer the score warpgroup no longer reads (K's or Q's).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .kernel import phase as _phase
from .kernel import cta_barrier, query_tile, store_rows, tma_load

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _barriers(STAGES: gl.constexpr):
    """``STAGES`` mbarriers (``[STAGES, 1]``), each initialized for one arrival."""
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    return bars


@gluon.jit
def _key_tile(tile, t_seq, t_key_start, t_q_first, t_q_last, cu_q_ptr, cu_k_ptr, kv_head,
              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr):
    """A key tile's fields for the key passes: key start (local), the rows that see it (local,
    inclusive), the sequence's first packed row, the tile's first packed key, the query-block count,
    the iteration count over the group's heads, K/V's column and the group's first head."""
    seq = gl.load(t_seq + tile)
    key_start = gl.load(t_key_start + tile)
    q_first = gl.load(t_q_first + tile)
    q_last = gl.load(t_q_last + tile)
    q_base = gl.load(cu_q_ptr + seq).to(gl.int32)
    k_row = (gl.load(cu_k_ptr + seq) + key_start).to(gl.int32)
    n_qblocks = gl.maximum(gl.cdiv(q_last + 1 - q_first, BLOCK_M), 0)
    return key_start, q_first, q_last, q_base, k_row, n_qblocks, GROUP * n_qblocks, kv_head * HEAD_DIM, kv_head * GROUP


@gluon.jit
def _block_coords(j, n_qblocks, head0, q_first, q_base, BLOCK_M: gl.constexpr):
    """Iteration ``j`` -> (query head, first local row of the block, its packed row)."""
    head = head0 + j // n_qblocks
    local = q_first + (j % n_qblocks) * BLOCK_M
    return head, local, q_base + local


@gluon.jit
def _dv_score_partition(k_desc, q_desc, k_smem, q_smem, p_smem, k_bar, q_ready, p_ready, p_free, done_bar,
                        lo_ptr, hi_ptr, lse_ptr, total, k_row, kv_col, key_start, keys, q_first, q_last, q_base,
                        head0, n_qblocks, n_iters, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        HEAD_DIM: gl.constexpr, Q_STAGES: gl.constexpr, P_STAGES: gl.constexpr):
    # This warpgroup loads K (once) and the Q ring (it is Q's only reader).
    mbarrier.expect(k_bar, k_desc.block_type.nbytes)
    tma_load(k_desc, [k_row, kv_col], k_bar, k_smem)
    for i in gl.static_range(Q_STAGES):
        if i < n_iters:
            head, local, q_row = _block_coords(i, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(q_ready.index(i), q_desc.block_type.nbytes)
            tma_load(q_desc, [q_row, head * HEAD_DIM], q_ready.index(i), q_smem.index(i))

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    kk = key_start + gl.arange(0, BLOCK_N, layout=key_layout)  # local key positions
    key_ok = gl.arange(0, BLOCK_N, layout=key_layout) < keys
    c = gl.arange(0, BLOCK_M, layout=row_layout)
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)

    mbarrier.wait(k_bar, 0)
    for j in range(n_iters):
        head, local, q_row = _block_coords(j, n_qblocks, head0, q_first, q_base, BLOCK_M)
        sq = j % Q_STAGES
        mbarrier.wait(q_ready.index(sq), _phase(j, Q_STAGES))
        s = warpgroup_mma(k_smem, q_smem.index(sq).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        if j + Q_STAGES < n_iters:
            cta_barrier()
            head_n, local_n, q_row_n = _block_coords(j + Q_STAGES, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(q_ready.index(sq), q_desc.block_type.nbytes)
            tma_load(q_desc, [q_row_n, head_n * HEAD_DIM], q_ready.index(sq),
                                            q_smem.index(sq))

        rows = local + c
        row_ok = rows <= q_last
        lo = gl.load(lo_ptr + q_base + rows, mask=row_ok, other=1).to(gl.int32)
        hi = gl.load(hi_ptr + q_base + rows, mask=row_ok, other=0).to(gl.int32)
        lse2 = gl.load(lse_ptr + head.to(gl.int64) * total + q_base + rows, mask=row_ok, other=0.0) * LOG2E
        allowed = (kk[:, None] >= lo[None, :]) & (kk[:, None] <= hi[None, :]) & key_ok[:, None]
        p = gl.where(allowed, gl.exp2(s * qk_scale - lse2[None, :]), 0.0)

        sp = j % P_STAGES
        mbarrier.wait(p_free.index(sp), _phase(j, P_STAGES) ^ 1)
        p_smem.index(sp).store(p.to(p_smem.dtype))
        fence_async_shared()
        mbarrier.arrive(p_ready.index(sp), count=1)
    mbarrier.arrive(done_bar, count=1)


@gluon.jit
def _key_output_partition(x_desc, k_smem, x_smem, a_smem, x_ready, a_ready, a_free, done_bar, out_ptr, k_row, keys,
                          kv_col, out_row_stride, q_first, q_base, head0, n_qblocks, n_iters, scale,
                          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                          X_STAGES: gl.constexpr, A_STAGES: gl.constexpr, STORE_COLS: gl.constexpr):
    """The key passes' output warpgroups: ``acc [64 keys, 512] += A X`` per query block, ``A`` the
    score warpgroup's ``[keys, rows]`` tile from shared memory (P^T for dV, dS^T for dK), ``X`` the
    block's rows (dO for dV, Q for dK) from a ring these warpgroups load (they are its last readers:
    the score warpgroup is done with a block once its A is ready); then ``scale * acc`` out through
    K's buffer."""
    for i in gl.static_range(X_STAGES):
        if i < n_iters:
            head, local, q_row = _block_coords(i, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(x_ready.index(i), x_desc.block_type.nbytes)
            tma_load(x_desc, [q_row, head * HEAD_DIM], x_ready.index(i), x_smem.index(i))

    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, HEAD_DIM // 2, 16])
    acc = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, o_layout)
    for j in range(n_iters):
        sa = j % A_STAGES
        sx = j % X_STAGES
        mbarrier.wait(a_ready.index(sa), _phase(j, A_STAGES))
        mbarrier.wait(x_ready.index(sx), _phase(j, X_STAGES))
        acc = warpgroup_mma(a_smem.index(sa), x_smem.index(sx), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(a_free.index(sa), count=1)
        if j + X_STAGES < n_iters:
            cta_barrier()
            head_n, local_n, q_row_n = _block_coords(j + X_STAGES, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(x_ready.index(sx), x_desc.block_type.nbytes)
            tma_load(x_desc, [q_row_n, head_n * HEAD_DIM], x_ready.index(sx),
                                            x_smem.index(sx))

    # The score warpgroup has finished with K (done_bar): K's buffer stages the result.
    mbarrier.wait(done_bar, 0)
    k_smem.store((acc * scale).to(k_smem.dtype))
    cta_barrier()
    store_rows(k_smem, out_ptr, k_row, keys, kv_col, out_row_stride, BLOCK_N, HEAD_DIM, STORE_COLS)


@gluon.jit
def hd512_dv_kernel(
    k_desc, q_desc, do_desc, dv_ptr, lse_ptr, lo_ptr, hi_ptr, cu_q_ptr, cu_k_ptr,
    t_seq, t_key_start, t_keys, t_q_first, t_q_last, order_ptr,
    total, qk_scale,
    KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, Q_STAGES: gl.constexpr, DO_STAGES: gl.constexpr, P_STAGES: gl.constexpr,
    SCORE_REGS: gl.constexpr, STORE_COLS: gl.constexpr,
):
    kv_head = gl.program_id(0)
    tile = gl.load(order_ptr + gl.program_id(1))
    keys = gl.load(t_keys + tile)
    if keys > 0:
        key_start, q_first, q_last, q_base, k_row, n_qblocks, n_iters, kv_col, head0 = _key_tile(
            tile, t_seq, t_key_start, t_q_first, t_q_last, cu_q_ptr, cu_k_ptr, kv_head, GROUP, HEAD_DIM, BLOCK_M)

        dtype: gl.constexpr = k_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [DO_STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        p_smem = gl.allocate_shared_memory(dtype, [P_STAGES, BLOCK_N, BLOCK_M], p_layout)

        k_bar = _barriers(1).index(0)
        done_bar = _barriers(1).index(0)
        q_ready, do_ready = _barriers(Q_STAGES), _barriers(DO_STAGES)
        p_ready, p_free = _barriers(P_STAGES), _barriers(P_STAGES)
        fence_async_shared()

        gl.warp_specialize([
            (_key_output_partition, (do_desc, k_smem, do_smem, p_smem, do_ready, p_ready, p_free, done_bar, dv_ptr,
                                     k_row, keys, kv_col, KV_HEADS * HEAD_DIM, q_first, q_base, head0, n_qblocks,
                                     n_iters, 1.0, BLOCK_M, BLOCK_N, HEAD_DIM, DO_STAGES, P_STAGES, STORE_COLS)),
            (_dv_score_partition, (k_desc, q_desc, k_smem, q_smem, p_smem, k_bar, q_ready, p_ready, p_free,
                                   done_bar, lo_ptr, hi_ptr, lse_ptr, total, k_row, kv_col, key_start, keys, q_first,
                                   q_last, q_base, head0, n_qblocks, n_iters, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM,
                                   Q_STAGES, P_STAGES)),
        ], [4], [SCORE_REGS])


# ----------------------------------------------------------------------------- the dK pass
@gluon.jit
def _dk_score_partition(k_desc, v_desc, do_desc, k_smem, v_smem, q_smem, do_smem, ds_smem, kv_bar, q_ready, do_ready,
                        ds_ready, ds_free, done_bar, lo_ptr, hi_ptr, lse_ptr, delta_ptr, total, k_row, kv_col,
                        key_start, keys, q_first, q_last, q_base, head0, n_qblocks, n_iters, qk_scale,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        Q_STAGES: gl.constexpr, DO_STAGES: gl.constexpr, P_STAGES: gl.constexpr):
    # This warpgroup loads K and V (once) and the dO ring (it is dO's only reader).
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    tma_load(k_desc, [k_row, kv_col], kv_bar, k_smem)
    tma_load(v_desc, [k_row, kv_col], kv_bar, v_smem)
    for i in gl.static_range(DO_STAGES):
        if i < n_iters:
            head, local, q_row = _block_coords(i, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(do_ready.index(i), do_desc.block_type.nbytes)
            tma_load(do_desc, [q_row, head * HEAD_DIM], do_ready.index(i), do_smem.index(i))

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    kk = key_start + gl.arange(0, BLOCK_N, layout=key_layout)
    key_ok = gl.arange(0, BLOCK_N, layout=key_layout) < keys
    c = gl.arange(0, BLOCK_M, layout=row_layout)
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)

    mbarrier.wait(kv_bar, 0)
    for j in range(n_iters):
        head, local, q_row = _block_coords(j, n_qblocks, head0, q_first, q_base, BLOCK_M)
        sq = j % Q_STAGES
        sd = j % DO_STAGES
        # The block's row data first: its loads overlap the waits and the two matmuls.
        rows = local + c
        row_ok = rows <= q_last
        lo = gl.load(lo_ptr + q_base + rows, mask=row_ok, other=1).to(gl.int32)
        hi = gl.load(hi_ptr + q_base + rows, mask=row_ok, other=0).to(gl.int32)
        at = head.to(gl.int64) * total + q_base + rows
        lse2 = gl.load(lse_ptr + at, mask=row_ok, other=0.0) * LOG2E
        delta = gl.load(delta_ptr + at, mask=row_ok, other=0.0)
        mbarrier.wait(do_ready.index(sd), _phase(j, DO_STAGES))
        dp = warpgroup_mma(v_smem, do_smem.index(sd).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(q_ready.index(sq), _phase(j, Q_STAGES))
        s = warpgroup_mma(k_smem, q_smem.index(sq).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp, ))
        if j + DO_STAGES < n_iters:
            cta_barrier()
            head_n, local_n, q_row_n = _block_coords(j + DO_STAGES, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(do_ready.index(sd), do_desc.block_type.nbytes)
            tma_load(do_desc, [q_row_n, head_n * HEAD_DIM], do_ready.index(sd),
                                            do_smem.index(sd))
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

        allowed = (kk[:, None] >= lo[None, :]) & (kk[:, None] <= hi[None, :]) & key_ok[:, None]
        p = gl.exp2(s * qk_scale - lse2[None, :])
        ds = gl.where(allowed, p * (dp - delta[None, :]), 0.0)

        sp = j % P_STAGES
        mbarrier.wait(ds_free.index(sp), _phase(j, P_STAGES) ^ 1)
        ds_smem.index(sp).store(ds.to(ds_smem.dtype))
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(sp), count=1)
    mbarrier.arrive(done_bar, count=1)


@gluon.jit
def hd512_dk_kernel(
    k_desc, v_desc, q_desc, do_desc, dk_ptr, lse_ptr, delta_ptr, lo_ptr, hi_ptr, cu_q_ptr, cu_k_ptr,
    t_seq, t_key_start, t_keys, t_q_first, t_q_last, order_ptr,
    total, qk_scale, scale,
    KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, Q_STAGES: gl.constexpr, DO_STAGES: gl.constexpr, P_STAGES: gl.constexpr,
    SCORE_REGS: gl.constexpr, STORE_COLS: gl.constexpr,
):
    kv_head = gl.program_id(0)
    tile = gl.load(order_ptr + gl.program_id(1))
    keys = gl.load(t_keys + tile)
    if keys > 0:
        key_start, q_first, q_last, q_base, k_row, n_qblocks, n_iters, kv_col, head0 = _key_tile(
            tile, t_seq, t_key_start, t_q_first, t_q_last, cu_q_ptr, cu_k_ptr, kv_head, GROUP, HEAD_DIM, BLOCK_M)

        dtype: gl.constexpr = k_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [DO_STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [P_STAGES, BLOCK_N, BLOCK_M], ds_layout)

        kv_bar = _barriers(1).index(0)
        done_bar = _barriers(1).index(0)
        q_ready, do_ready = _barriers(Q_STAGES), _barriers(DO_STAGES)
        ds_ready, ds_free = _barriers(P_STAGES), _barriers(P_STAGES)
        fence_async_shared()

        gl.warp_specialize([
            (_key_output_partition, (q_desc, k_smem, q_smem, ds_smem, q_ready, ds_ready, ds_free, done_bar, dk_ptr,
                                     k_row, keys, kv_col, KV_HEADS * HEAD_DIM, q_first, q_base, head0, n_qblocks,
                                     n_iters, scale, BLOCK_M, BLOCK_N, HEAD_DIM, Q_STAGES, P_STAGES, STORE_COLS)),
            (_dk_score_partition, (k_desc, v_desc, do_desc, k_smem, v_smem, q_smem, do_smem, ds_smem, kv_bar, q_ready,
                                   do_ready, ds_ready, ds_free, done_bar, lo_ptr, hi_ptr, lse_ptr, delta_ptr, total,
                                   k_row, kv_col, key_start, keys, q_first, q_last, q_base, head0, n_qblocks, n_iters,
                                   qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, Q_STAGES, DO_STAGES, P_STAGES)),
        ], [4], [SCORE_REGS])


# ----------------------------------------------------------------------------- the dQ pass
@gluon.jit
def _dq_score_partition(q_desc, do_desc, v_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, row_bar, k_ready, v_ready,
                        ds_ready, ds_free, done_bar, lo_ptr, hi_ptr, lse_ptr, delta_ptr, q_row, rows, head, total,
                        k_row, kv_col, n_start, n_blocks, lo_max, hi_min, qk_scale, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr,
                        V_STAGES: gl.constexpr, P_STAGES: gl.constexpr):
    # This warpgroup loads Q and dO (once) and the V ring (it is V's only reader).
    mbarrier.expect(row_bar, 2 * q_desc.block_type.nbytes)
    tma_load(q_desc, [q_row, head * HEAD_DIM], row_bar, q_smem)
    tma_load(do_desc, [q_row, head * HEAD_DIM], row_bar, do_smem)
    for i in gl.static_range(V_STAGES):
        if i < n_blocks:
            mbarrier.expect(v_ready.index(i), v_desc.block_type.nbytes)
            tma_load(v_desc, [k_row + n_start + i * BLOCK_N, kv_col], v_ready.index(i),
                                            v_smem.index(i))

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    r = gl.arange(0, BLOCK_M, layout=row_layout)
    valid = r < rows
    lo = gl.load(lo_ptr + q_row + r, mask=valid, other=1).to(gl.int32)
    hi = gl.load(hi_ptr + q_row + r, mask=valid, other=0).to(gl.int32)
    at = head.to(gl.int64) * total + q_row + r
    lse2 = gl.load(lse_ptr + at, mask=valid, other=0.0) * LOG2E
    delta = gl.load(delta_ptr + at, mask=valid, other=0.0)
    kc = gl.arange(0, BLOCK_N, layout=col_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    mbarrier.wait(row_bar, 0)
    for j in range(n_blocks):
        k0 = n_start + j * BLOCK_N
        sk = j % K_STAGES
        sv = j % V_STAGES
        mbarrier.wait(v_ready.index(sv), _phase(j, V_STAGES))
        dp = warpgroup_mma(do_smem, v_smem.index(sv).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(k_ready.index(sk), _phase(j, K_STAGES))
        s = warpgroup_mma(q_smem, k_smem.index(sk).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp, ))
        if j + V_STAGES < n_blocks:
            cta_barrier()
            mbarrier.expect(v_ready.index(sv), v_desc.block_type.nbytes)
            tma_load(v_desc, [k_row + k0 + V_STAGES * BLOCK_N, kv_col], v_ready.index(sv),
                                            v_smem.index(sv))
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

        p = gl.exp2(s * qk_scale - lse2[:, None])
        ds = p * (dp - delta[:, None])
        if (k0 < lo_max) | (k0 + BLOCK_N - 1 > hi_min):
            key = k0 + kc
            allowed = (key[None, :] >= lo[:, None]) & (key[None, :] <= hi[:, None])
            ds = gl.where(allowed, ds, 0.0)
        ds = gl.where(valid[:, None], ds, 0.0)

        sp = j % P_STAGES
        mbarrier.wait(ds_free.index(sp), _phase(j, P_STAGES) ^ 1)
        ds_smem.index(sp).store(ds.to(ds_smem.dtype))
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(sp), count=1)
    mbarrier.arrive(done_bar, count=1)


@gluon.jit
def _dq_output_partition(k_desc, q_smem, k_smem, ds_smem, k_ready, ds_ready, ds_free, done_bar, dq_ptr, q_row, rows,
                         head, dq_row_stride, k_row, kv_col, n_start, n_blocks, scale, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr,
                         P_STAGES: gl.constexpr, STORE_COLS: gl.constexpr):
    # These warpgroups load the K ring: they are K's last readers (the score warpgroup's Q K^T of a
    # block is finished once its dS is ready).
    for i in gl.static_range(K_STAGES):
        if i < n_blocks:
            mbarrier.expect(k_ready.index(i), k_desc.block_type.nbytes)
            tma_load(k_desc, [k_row + n_start + i * BLOCK_N, kv_col], k_ready.index(i),
                                            k_smem.index(i))

    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, HEAD_DIM // 2, 16])
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    for j in range(n_blocks):
        sp = j % P_STAGES
        sk = j % K_STAGES
        mbarrier.wait(ds_ready.index(sp), _phase(j, P_STAGES))
        mbarrier.wait(k_ready.index(sk), _phase(j, K_STAGES))
        acc = warpgroup_mma(ds_smem.index(sp), k_smem.index(sk), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(ds_free.index(sp), count=1)
        if j + K_STAGES < n_blocks:
            cta_barrier()
            mbarrier.expect(k_ready.index(sk), k_desc.block_type.nbytes)
            tma_load(k_desc, [k_row + n_start + (j + K_STAGES) * BLOCK_N, kv_col],
                                            k_ready.index(sk), k_smem.index(sk))

    # The score warpgroup is done with Q (done_bar): Q's buffer stages dQ.
    mbarrier.wait(done_bar, 0)
    q_smem.store((acc * scale).to(q_smem.dtype))
    cta_barrier()
    store_rows(q_smem, dq_ptr, q_row, rows, head * HEAD_DIM, dq_row_stride, BLOCK_M, HEAD_DIM, STORE_COLS)


@gluon.jit
def hd512_dq_kernel(
    q_desc, do_desc, k_desc, v_desc, dq_ptr, lse_ptr, delta_ptr, lo_ptr, hi_ptr, cu_q_ptr, cu_k_ptr,
    t_seq, t_start, t_rows, t_lo_min, t_lo_max, t_hi_min, t_hi_max, order_ptr,
    total, group, qk_scale, scale,
    HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, P_STAGES: gl.constexpr,
    SCORE_REGS: gl.constexpr, STORE_COLS: gl.constexpr,
):
    head = gl.program_id(0)
    tile = gl.load(order_ptr + gl.program_id(1))
    rows = gl.load(t_rows + tile)
    if rows > 0:
        q_row, k_row, n_start, n_blocks, lo_max, hi_min, kv_col = query_tile(
            tile, head, group, t_seq, t_start, t_lo_min, t_lo_max, t_hi_min, t_hi_max, cu_q_ptr, cu_k_ptr,
            HEAD_DIM, BLOCK_N)

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [P_STAGES, BLOCK_M, BLOCK_N], ds_layout)

        row_bar = _barriers(1).index(0)
        done_bar = _barriers(1).index(0)
        k_ready, v_ready = _barriers(K_STAGES), _barriers(V_STAGES)
        ds_ready, ds_free = _barriers(P_STAGES), _barriers(P_STAGES)
        fence_async_shared()

        gl.warp_specialize([
            (_dq_output_partition, (k_desc, q_smem, k_smem, ds_smem, k_ready, ds_ready, ds_free, done_bar, dq_ptr,
                                    q_row, rows, head, HEADS * HEAD_DIM, k_row, kv_col, n_start, n_blocks, scale,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, K_STAGES, P_STAGES, STORE_COLS)),
            (_dq_score_partition, (q_desc, do_desc, v_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, row_bar,
                                   k_ready, v_ready, ds_ready, ds_free, done_bar, lo_ptr, hi_ptr, lse_ptr, delta_ptr,
                                   q_row, rows, head, total, k_row, kv_col, n_start, n_blocks, lo_max, hi_min,
                                   qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, K_STAGES, V_STAGES, P_STAGES)),
        ], [4], [SCORE_REGS])
