"""Gluon kernels (Triton 3.6 API) of the head-dim-512 backward on SM90: the dV pass.

Not yet launched by the library: compiled offline for sm_90a in the tests (registers, spills,
shared memory); checked on a GPU before the gluon backend's backward switches to it (its
backward is the Triton kernels' until then).

The dV pass is the forward's schedule with the roles turned: one program holds 64 keys of one
K/V head (``K`` resident in shared memory) and walks the query blocks that see them, for every
query head of the GQA group; per block the score warpgroup computes ``S^T = K Q^T`` and
``P^T = exp2(S^T * scale * log2 e - lse * log2 e)`` (the forward's ``lse``: no running max, no
rescale), masked by the rows' spans, and hands ``P^T`` over in shared memory; the two output
warpgroups own 256 columns each of ``dV [64, 512]`` and accumulate ``P^T dO``. Q and dO arrive
by TMA into rings; dV leaves through K's buffer once the score warpgroup is done with it.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _phase(i, stages: gl.constexpr):
    return (i // stages) & 1


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
    tma.async_copy_global_to_shared(k_desc, [k_row, kv_col], k_bar, k_smem)
    for i in gl.static_range(Q_STAGES):
        if i < n_iters:
            head, local, q_row = _block_coords(i, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(q_ready.index(i), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row, head * HEAD_DIM], q_ready.index(i), q_smem.index(i))

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
            gl.thread_barrier()
            head_n, local_n, q_row_n = _block_coords(j + Q_STAGES, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(q_ready.index(sq), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row_n, head_n * HEAD_DIM], q_ready.index(sq),
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
def _dv_output_partition(do_desc, k_smem, do_smem, p_smem, do_ready, p_ready, p_free, done_bar, dv_ptr, k_row,
                         keys, kv_col, dv_row_stride, q_first, q_base, head0, n_qblocks, n_iters,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                         DO_STAGES: gl.constexpr, P_STAGES: gl.constexpr, STORE_COLS: gl.constexpr):
    # These warpgroups load the dO ring (they are dO's only readers).
    for i in gl.static_range(DO_STAGES):
        if i < n_iters:
            head, local, q_row = _block_coords(i, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(do_ready.index(i), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [q_row, head * HEAD_DIM], do_ready.index(i), do_smem.index(i))

    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, HEAD_DIM // 2, 16])
    acc = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, o_layout)
    for j in range(n_iters):
        sp = j % P_STAGES
        sd = j % DO_STAGES
        mbarrier.wait(p_ready.index(sp), _phase(j, P_STAGES))
        mbarrier.wait(do_ready.index(sd), _phase(j, DO_STAGES))
        acc = warpgroup_mma(p_smem.index(sp), do_smem.index(sd), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(p_free.index(sp), count=1)
        if j + DO_STAGES < n_iters:
            gl.thread_barrier()
            head_n, local_n, q_row_n = _block_coords(j + DO_STAGES, n_qblocks, head0, q_first, q_base, BLOCK_M)
            mbarrier.expect(do_ready.index(sd), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [q_row_n, head_n * HEAD_DIM], do_ready.index(sd),
                                            do_smem.index(sd))

    # The score warpgroup has finished every K Q^T (done_bar): K's buffer stages dV.
    mbarrier.wait(done_bar, 0)
    k_smem.store(acc.to(k_smem.dtype))
    gl.thread_barrier()
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, store_layout))
    cols = gl.arange(0, STORE_COLS, layout=gl.SliceLayout(0, store_layout))
    base = dv_ptr + (k_row + r).to(gl.int64)[:, None] * dv_row_stride + kv_col + cols[None, :]
    ok = (r < keys)[:, None]
    for i in gl.static_range(HEAD_DIM // STORE_COLS):
        chunk = k_smem.slice(i * STORE_COLS, STORE_COLS, dim=1).load(store_layout)
        gl.store(base + i * STORE_COLS, chunk, mask=ok)


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
        seq = gl.load(t_seq + tile)
        key_start = gl.load(t_key_start + tile)
        q_first = gl.load(t_q_first + tile)
        q_last = gl.load(t_q_last + tile)
        q_base = gl.load(cu_q_ptr + seq).to(gl.int32)
        k_row = (gl.load(cu_k_ptr + seq) + key_start).to(gl.int32)
        n_qblocks = gl.maximum(gl.cdiv(q_last + 1 - q_first, BLOCK_M), 0)
        n_iters = GROUP * n_qblocks
        kv_col = kv_head * HEAD_DIM
        head0 = kv_head * GROUP

        dtype: gl.constexpr = k_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [DO_STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        p_smem = gl.allocate_shared_memory(dtype, [P_STAGES, BLOCK_N, BLOCK_M], p_layout)

        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        k_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        done_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], bar_layout)
        do_ready = gl.allocate_shared_memory(gl.int64, [DO_STAGES, 1], bar_layout)
        p_ready = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], bar_layout)
        p_free = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], bar_layout)
        mbarrier.init(k_bar, count=1)
        mbarrier.init(done_bar, count=1)
        for i in gl.static_range(Q_STAGES):
            mbarrier.init(q_ready.index(i), count=1)
        for i in gl.static_range(DO_STAGES):
            mbarrier.init(do_ready.index(i), count=1)
        for i in gl.static_range(P_STAGES):
            mbarrier.init(p_ready.index(i), count=1)
            mbarrier.init(p_free.index(i), count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_dv_output_partition, (do_desc, k_smem, do_smem, p_smem, do_ready, p_ready, p_free, done_bar, dv_ptr,
                                    k_row, keys, kv_col, KV_HEADS * HEAD_DIM, q_first, q_base, head0, n_qblocks,
                                    n_iters, BLOCK_M, BLOCK_N, HEAD_DIM, DO_STAGES, P_STAGES, STORE_COLS)),
            (_dv_score_partition, (k_desc, q_desc, k_smem, q_smem, p_smem, k_bar, q_ready, p_ready, p_free,
                                   done_bar, lo_ptr, hi_ptr, lse_ptr, total, k_row, kv_col, key_start, keys, q_first,
                                   q_last, q_base, head0, n_qblocks, n_iters, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM,
                                   Q_STAGES, P_STAGES)),
        ], [4], [SCORE_REGS])
