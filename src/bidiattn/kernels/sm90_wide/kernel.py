"""The Gluon kernel (Triton 3.6 and 3.9 APIs): head-dim-512 span-mask attention forward on SM90.

One program: 64 query rows of one sequence and one query head, all 512 output columns.
Partitions (``gl.warp_specialize``):

- default, 8 warps (two warpgroups): the output. ``acc [64, 512]`` fp32 in an MMA layout whose
  warpgroups own 256 columns each (128 registers a thread). Per key block: wait for P and the
  row rescale factors in shared memory, rescale, ``acc += P @ V`` (wgmma, both operands in
  shared memory), release P and V. Epilogue: ``acc / l`` through the (by then free) Q buffer to
  masked row stores (a tile's rows never spill into the next sequence's rows).
- worker 0, 4 warps: the softmax warpgroup. ``S = Q K^T`` (wgmma from shared memory), the span
  mask on partial blocks only, the online softmax in base 2, P (bf16/fp16) and alpha to shared
  memory; at the end the lse and 1/l.

Each ring's readers issue its TMA loads (the softmax warpgroup Q's and K's, the output warpgroups
V's), a stage refilled once every warp of the group is past its reads.

The split schedule (``SPLIT``; ``Sm90WideConfig.schedule="split"``): a
front warpgroup (the default partition: ``Q K^T``, the softmax, P and alpha to shared memory, then
``P V`` of output columns 0-255 with P in registers), a back warpgroup (``P V`` of columns 256-511,
P from shared memory) and a load warp (Q, the K and V rings, each stage refilled when its free
barrier completes).

``CLUSTER=2`` (``Sm90WideConfig.cluster``, Triton 3.9's multi-CTA Gluon; the split schedule): a
program is a cluster of two CTAs, 64 query rows each, and the lead CTA's load warp multicasts every
K/V block into both once both CTAs' readers have freed its stage (a barrier of the pair), so each
block crosses L2 once for 128 rows.

Key blocks run from the tile's first allowed key (``lo_min``, rounded down to ``BLOCK_N``) to
its last (``hi_max``); a block lying inside ``[lo_max, hi_min]`` is allowed for every row and
skips the mask. Keys past a sequence's end (another sequence's, or TMA's zero fill past the
tensor) are always masked by the per-row bounds.
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

# Gluon builtins renamed after Triton 3.6 (3.9 removed the old names): Hopper's TMA load
# (``async_copy_global_to_shared`` -> ``async_load``) and the CTA barrier (``thread_barrier`` ->
# ``barrier``). The kernels call whichever this Triton has.
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# 3.9's allocator of per-CTA / per-pair barrier arrays (None with 3.6, whose Gluon has no multi-CTA
# barriers and whose TMA load no ``multicast``: only cluster configs reach either).
allocate_mbarrier = getattr(mbarrier, "allocate_mbarrier", None)

LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)


# Layouts of the tensors whose rows (dim 0) a cluster's CTAs split, 64 each (CTA bases only with
# ``cluster == 2``, so one CTA gets the plain layout).
@gluon.constexpr_function
def mma_layout(instr_n, cluster, warpgroups=1):
    """A wgmma accumulator of ``warpgroups`` warpgroups side by side, ``instr_n`` columns each."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, warpgroups], instr_shape=[16, instr_n, 16],
                                     cga_layout=[[1, 0]] if cluster == 2 else [])


@gluon.constexpr_function
def rows_shared_layout(block_m, block_n, dtype, cluster):
    """A ``[block_m, block_n]`` wgmma operand in shared memory (P)."""
    return gl.NVMMASharedLayout.get_default_for([block_m, block_n], dtype,
                                                cga_layout=[[1, 0]] if cluster == 2 else None)


@gluon.constexpr_function
def vector_shared_layout(cluster):
    """Per-row vectors in shared memory (alpha, 1/l)."""
    return gl.SwizzledSharedLayout(1, 1, 1, [0], cga_layout=[[1]] if cluster == 2 else [])


@gluon.constexpr_function
def store_layout_for(num_warps, cluster):
    """The epilogue's row stores: 8 elements a thread, rows over the warps."""
    return gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0], cga_layout=[[1, 0]] if cluster == 2 else [])


@gluon.jit
def phase(i, stages: gl.constexpr):
    """mbarrier parity of use ``i`` of a ring of ``stages`` buffers."""
    return (i // stages) & 1


@gluon.jit
def query_tile(tile, head, group, t_seq, t_start, t_lo_min, t_lo_max, t_hi_min, t_hi_max, cu_q_ptr, cu_k_ptr,
               HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr):
    """A query tile's launch data from the span tile table: its first packed row, its sequence's
    first packed key, the first key block and the block count (from the first allowed key to the
    last), the bounds of the mask-free range ``[lo_max, hi_min]`` and the K/V head's column."""
    seq = gl.load(t_seq + tile)
    row_start = gl.load(t_start + tile)
    lo_min = gl.load(t_lo_min + tile)
    lo_max = gl.load(t_lo_max + tile)
    hi_min = gl.load(t_hi_min + tile)
    hi_max = gl.load(t_hi_max + tile)
    q_row = (gl.load(cu_q_ptr + seq) + row_start).to(gl.int32)
    k_row = gl.load(cu_k_ptr + seq).to(gl.int32)
    n_start = (lo_min // BLOCK_N) * BLOCK_N
    n_blocks = gl.cdiv(hi_max + 1 - n_start, BLOCK_N)
    return q_row, k_row, n_start, n_blocks, lo_max, hi_min, (head // group) * HEAD_DIM


@gluon.jit
def store_rows(smem, ptr, row0, rows, col0, row_stride, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr,
               STORE_COLS: gl.constexpr, CLUSTER: gl.constexpr = 1):
    """Rows ``[0, rows)`` of a ``[BLOCK, HEAD_DIM]`` shared tile to ``ptr + (row0 + r) * row_stride +
    col0``, in masked chunks of ``STORE_COLS`` columns (a tile's rows never spill into the next
    sequence's), by the warps of the calling partition (of each CTA of a ``CLUSTER``, its rows)."""
    store_layout: gl.constexpr = store_layout_for(gl.num_warps(), CLUSTER)
    r = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, store_layout))
    c = gl.arange(0, STORE_COLS, layout=gl.SliceLayout(0, store_layout))
    base = ptr + (row0 + r).to(gl.int64)[:, None] * row_stride + col0 + c[None, :]
    ok = (r < rows)[:, None]
    for i in gl.static_range(HEAD_DIM // STORE_COLS):
        chunk = smem.slice(i * STORE_COLS, STORE_COLS, dim=1).load(store_layout)
        gl.store(base + i * STORE_COLS, chunk, mask=ok)


@gluon.jit
def _lane_split(x, BLOCK_N: gl.constexpr):
    """``x [BLOCK_M, BLOCK_N]`` in the wgmma accumulator layout viewed as ``[BLOCK_M, 2, BLOCK_N // 16,
    4, 2]``: a column is ``8 j + 2 t + e`` with ``t`` the lane within its row's quad, so reductions over
    the second, third and fifth axes stay within a thread (no shuffles)."""
    return gl.reshape(x, [x.shape[0], 2, BLOCK_N // 16, 4, 2])


@gluon.jit
def _row_lanes_max(x, BLOCK_N: gl.constexpr):
    """Per row and quad lane, the maximum of the thread's own columns of ``x``, as a tree (chains of
    ``BLOCK_N // 16``), not one chain: ``[BLOCK_M, 4]``."""
    y = gl.max(_lane_split(x, BLOCK_N), axis=2)
    return gl.max(gl.max(y, axis=3), axis=1)


@gluon.jit
def _row_lanes_sum(x, BLOCK_N: gl.constexpr):
    """:func:`_row_lanes_max` with a sum: per row and quad lane, ``[BLOCK_M, 4]``."""
    y = gl.sum(_lane_split(x, BLOCK_N), axis=2)
    return gl.sum(gl.sum(y, axis=3), axis=1)


@gluon.jit
def _row_sum_init(s_zero, row_layout: gl.constexpr, BLOCK_N: gl.constexpr, FUSED: gl.constexpr):
    """The running row sum's start: zeros, ``[BLOCK_M]`` in ``row_layout`` or, with ``FUSED`` softmax,
    ``[BLOCK_M, 4]`` (one partial sum per row and quad lane, added across the quad at the end)."""
    if FUSED:
        return _row_lanes_sum(s_zero, BLOCK_N)
    else:
        return gl.full([s_zero.shape[0]], 0.0, gl.float32, row_layout)


@gluon.jit
def _row_sum_total(l_i, row_layout: gl.constexpr, FUSED: gl.constexpr):
    """The running row sum as ``[BLOCK_M]`` in ``row_layout`` (the quad's partial sums added)."""
    if FUSED:
        return gl.convert_layout(gl.sum(l_i, axis=1), row_layout, assert_trivial=True)
    else:
        return l_i


@gluon.jit
def _softmax_block(s, k0, kc, lo, hi, lo_max, hi_min, m_i, l_i, qk_scale, BLOCK_N: gl.constexpr,
                   FUSED: gl.constexpr = False):
    """One key block's online softmax step in base 2: ``(p, alpha, m, l)``; the span mask only on
    partial blocks. ``FUSED``: the row maximum of the unscaled scores (the scale is positive), the
    scale applied inside the exponent (one FMA an element), the in-thread maxima and sums as trees,
    and ``l`` kept per quad lane (:func:`_row_sum_init`)."""
    if not FUSED:
        s = s * qk_scale
    if (k0 < lo_max) | (k0 + BLOCK_N - 1 > hi_min):
        key = k0 + kc
        allowed = (key[None, :] >= lo[:, None]) & (key[None, :] <= hi[:, None])
        s = gl.where(allowed, s, float("-inf"))
    if FUSED:
        m_blk = gl.convert_layout(gl.max(_row_lanes_max(s, BLOCK_N), axis=1), m_i.type.layout,
                                  assert_trivial=True) * qk_scale
    else:
        m_blk = gl.max(s, axis=1)
    m_new = gl.maximum(m_i, m_blk)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)
    if FUSED:
        p = gl.exp2(s * qk_scale - m_use[:, None])
        lane_layout: gl.constexpr = gl.SliceLayout(1, l_i.type.layout)
        l_new = l_i * gl.convert_layout(alpha, lane_layout, assert_trivial=True)[:, None] + _row_lanes_sum(p, BLOCK_N)
    else:
        p = gl.exp2(s - m_use[:, None])
        l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _hand_over(p, alpha, p_smem, alpha_smem, p_ready, p_free, j, P_STAGES: gl.constexpr, ARRIVE: gl.constexpr = True):
    """P (converted to P's buffer dtype once its stage is free) and alpha of key block ``j`` to shared
    memory for the warpgroups that accumulate ``P V``; ``ARRIVE=False`` leaves the ready barrier's
    arrival to the caller (the split schedule's ``LAG``)."""
    sp = j % P_STAGES
    mbarrier.wait(p_free.index(sp), phase(j, P_STAGES) ^ 1)
    p_smem.index(sp).store(p.to(p_smem.dtype))
    alpha_smem.index(sp).store(alpha)
    fence_async_shared()
    if ARRIVE:
        mbarrier.arrive(p_ready.index(sp), count=1)


@gluon.jit
def _release(free, local, i, CLUSTER: gl.constexpr):
    """A K/V stage's readers are done with it: its free barrier (in a cluster the pair's, on the
    lead CTA) and, in a cluster, this CTA's own."""
    mbarrier.arrive(free.index(i), count=1)
    if CLUSTER == 2:
        mbarrier.arrive(local.index(i), count=1)


@gluon.jit
def _load_rows(desc, row, col, bar, smem, CLUSTER: gl.constexpr):
    """TMA-load a block of query rows (in a cluster each CTA its own rows) onto ``bar``."""
    if CLUSTER == 2:
        mbarrier.expect(bar, desc.nbytes_per_cta)
    else:
        mbarrier.expect(bar, desc.block_type.nbytes)
    tma_load(desc, [row, col], bar, smem)


@gluon.jit
def _load_stage(desc, row, col, ready, smem, CLUSTER: gl.constexpr):
    """Expect a K/V block's bytes on this CTA's ready barrier and load it; in a cluster the lead
    CTA multicasts it into both CTAs and the other only expects it."""
    if CLUSTER == 2:
        mbarrier.expect(ready, desc.nbytes_per_cta)
        tma_load(desc, [row, col], ready, smem, multicast=True)
    else:
        mbarrier.expect(ready, desc.block_type.nbytes)
        tma_load(desc, [row, col], ready, smem)


@gluon.jit
def _refill(desc, row, col, ready, smem, free, local, parity, CLUSTER: gl.constexpr):
    """A load warp's refill of a K/V stage once its readers are done (``free``). In a cluster
    ``free`` is the pair's (both CTAs' readers; only the lead CTA waits on it) and each CTA first
    waits for its own readers (``local``), so it expects each block once."""
    if CLUSTER == 2:
        mbarrier.wait(local, parity)
    mbarrier.wait(free, parity)
    _load_stage(desc, row, col, ready, smem, CLUSTER)


@gluon.jit
def _softmax_partition(q_desc, k_desc, q_smem, k_smem, p_smem, alpha_smem, l_smem, q_bar, k_ready, p_ready, p_free,
                       done_bar, lo_ptr, hi_ptr, lse_ptr, q_row, rows, head, total, k_row, kv_col, n_start, n_blocks,
                       lo_max, hi_min, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr, P_STAGES: gl.constexpr, FUSED: gl.constexpr):
    # This warpgroup issues the loads of Q and of the K ring (it is K's only reader).
    _load_rows(q_desc, q_row, head * HEAD_DIM, q_bar, q_smem, 1)
    for i in gl.static_range(K_STAGES):
        if i < n_blocks:
            _load_stage(k_desc, k_row + n_start + i * BLOCK_N, kv_col, k_ready.index(i), k_smem.index(i), 1)

    s_layout: gl.constexpr = mma_layout(BLOCK_N, 1)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

    r = gl.arange(0, BLOCK_M, layout=row_layout)
    valid = r < rows
    lo = gl.load(lo_ptr + q_row + r, mask=valid, other=0).to(gl.int32)
    hi = gl.load(hi_ptr + q_row + r, mask=valid, other=-1).to(gl.int32)
    kc = gl.arange(0, BLOCK_N, layout=col_layout)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    l_i = _row_sum_init(s_zero, row_layout, BLOCK_N, FUSED)

    mbarrier.wait(q_bar, 0)
    for j in range(n_blocks):
        k0 = n_start + j * BLOCK_N
        sk = j % K_STAGES
        mbarrier.wait(k_ready.index(sk), phase(j, K_STAGES))
        s = warpgroup_mma(q_smem, k_smem.index(sk).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        if j + K_STAGES < n_blocks:
            # Every warp of the group is past its wgmma reads of this stage before it is refilled.
            cta_barrier()
            _load_stage(k_desc, k_row + k0 + K_STAGES * BLOCK_N, kv_col, k_ready.index(sk), k_smem.index(sk), 1)

        p, alpha, m_i, l_i = _softmax_block(s, k0, kc, lo, hi, lo_max, hi_min, m_i, l_i, qk_scale, BLOCK_N, FUSED)
        _hand_over(p, alpha, p_smem, alpha_smem, p_ready, p_free, j, P_STAGES)

    # lse in natural log; rows past the tile's end are not stored.
    l_i = _row_sum_total(l_i, row_layout, FUSED)
    lse = (m_i + gl.log2(l_i)) * LN2
    gl.store(lse_ptr + head.to(gl.int64) * total + q_row + r, lse, mask=valid)
    l_smem.store(1.0 / l_i)
    mbarrier.arrive(done_bar, count=1)


@gluon.jit
def _output_partition(v_desc, q_smem, v_smem, p_smem, alpha_smem, l_smem, v_ready, p_ready, p_free, done_bar,
                      out_ptr, q_row, rows, head, out_row_stride, k_row, kv_col, n_start, n_blocks,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, V_STAGES: gl.constexpr,
                      P_STAGES: gl.constexpr, STORE_COLS: gl.constexpr):
    # These warpgroups issue the loads of the V ring (they are V's only readers).
    for i in gl.static_range(V_STAGES):
        if i < n_blocks:
            _load_stage(v_desc, k_row + n_start + i * BLOCK_N, kv_col, v_ready.index(i), v_smem.index(i), 1)

    o_layout: gl.constexpr = mma_layout(HEAD_DIM // 2, 1, 2)
    row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    for j in range(n_blocks):
        sp = j % P_STAGES
        sv = j % V_STAGES
        mbarrier.wait(p_ready.index(sp), phase(j, P_STAGES))
        alpha = alpha_smem.index(sp).load(row_layout)
        acc = acc * alpha[:, None]
        mbarrier.wait(v_ready.index(sv), phase(j, V_STAGES))
        acc = warpgroup_mma(p_smem.index(sp), v_smem.index(sv), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(p_free.index(sp), count=1)
        if j + V_STAGES < n_blocks:
            cta_barrier()
            _load_stage(v_desc, k_row + n_start + (j + V_STAGES) * BLOCK_N, kv_col, v_ready.index(sv),
                        v_smem.index(sv), 1)

    mbarrier.wait(done_bar, 0)
    inv_l = l_smem.load(row_layout)
    o = (acc * inv_l[:, None]).to(q_smem.dtype)
    # The softmax warpgroup has finished every Q K^T (done_bar): Q's buffer stages the output.
    q_smem.store(o)
    cta_barrier()
    store_rows(q_smem, out_ptr, q_row, rows, head * HEAD_DIM, out_row_stride, BLOCK_M, HEAD_DIM, STORE_COLS)


# ----------------------------------------------------------------------------- the split schedule
@gluon.jit
def _front_partition(q_smem, k_smem, v_smem, p_smem, alpha_smem, l_smem, q_bar, k_ready, k_free, k_local, v_ready,
                     v_free, v_local, p_ready, p_free, done_bar, lo_ptr, hi_ptr, lse_ptr, out_ptr, q_row, rows, head,
                     total, out_row_stride, n_start, n_blocks, lo_max, hi_min, qk_scale, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                     P_STAGES: gl.constexpr, STORE_COLS: gl.constexpr, CLUSTER: gl.constexpr, FUSED: gl.constexpr,
                     LAG: gl.constexpr):
    # Q K^T, the mask and the online softmax; P and alpha to shared memory for the back warpgroup;
    # the P V of output columns [0, 256) with P from registers. LAG: block j's P is published to the
    # back warpgroup only once block j+1's Q K^T is issued, so the back warpgroup's P V runs on the
    # tensor cores during this warpgroup's softmax instead of ahead of its P V; V's stages here
    # hold the front half of V (the back warpgroup loads its half itself).
    HALF: gl.constexpr = HEAD_DIM // 2
    s_layout: gl.constexpr = mma_layout(BLOCK_N, CLUSTER)
    o_layout: gl.constexpr = mma_layout(HALF, CLUSTER)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    r = gl.arange(0, BLOCK_M, layout=row_layout)
    valid = r < rows
    lo = gl.load(lo_ptr + q_row + r, mask=valid, other=0).to(gl.int32)
    hi = gl.load(hi_ptr + q_row + r, mask=valid, other=-1).to(gl.int32)
    kc = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    l_i = _row_sum_init(s_zero, row_layout, BLOCK_N, FUSED)
    acc = gl.zeros([BLOCK_M, HALF], gl.float32, o_layout)

    mbarrier.wait(q_bar, 0)
    for j in range(n_blocks):
        sk = j % K_STAGES
        mbarrier.wait(k_ready.index(sk), phase(j, K_STAGES))
        s = warpgroup_mma(q_smem, k_smem.index(sk).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if LAG:
            if j > 0:
                mbarrier.arrive(p_ready.index((j - 1) % P_STAGES), count=1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        cta_barrier()
        _release(k_free, k_local, sk, CLUSTER)
        p, alpha, m_i, l_i = _softmax_block(s, n_start + j * BLOCK_N, kc, lo, hi, lo_max, hi_min, m_i, l_i,
                                            qk_scale, BLOCK_N, FUSED)
        p16 = p.to(p_smem.dtype)
        _hand_over(p16, alpha, p_smem, alpha_smem, p_ready, p_free, j, P_STAGES, not LAG)
        acc = acc * gl.convert_layout(alpha, o_row_layout)[:, None]
        sv = j % V_STAGES
        mbarrier.wait(v_ready.index(sv), phase(j, V_STAGES))
        if LAG:
            v_half = v_smem.index(sv)
        else:
            v_half = v_smem.index(sv).slice(0, HALF, dim=1)
        acc = warpgroup_mma(gl.convert_layout(p16, p_op_layout), v_half, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        cta_barrier()
        _release(v_free, v_local, sv, CLUSTER)
    if LAG:
        if n_blocks > 0:
            mbarrier.arrive(p_ready.index((n_blocks - 1) % P_STAGES), count=1)

    l_i = _row_sum_total(l_i, row_layout, FUSED)
    lse = (m_i + gl.log2(l_i)) * LN2
    gl.store(lse_ptr + head.to(gl.int64) * total + q_row + r, lse, mask=valid)
    inv_l = 1.0 / l_i
    l_smem.store(inv_l)
    mbarrier.arrive(done_bar, count=1)
    # This warpgroup is Q's only reader and its last Q K^T is done: Q's buffer stages the output.
    o = (acc * gl.convert_layout(inv_l, o_row_layout)[:, None]).to(q_smem.dtype)
    staged = q_smem.slice(0, HALF, dim=1)
    staged.store(o)
    cta_barrier()
    store_rows(staged, out_ptr, q_row, rows, head * HEAD_DIM, out_row_stride, BLOCK_M, HALF, STORE_COLS, CLUSTER)


@gluon.jit
def _back_partition(q_smem, v_smem, p_smem, alpha_smem, l_smem, v_ready, v_free, v_local, p_ready, p_free, done_bar,
                    out_ptr, q_row, rows, head, out_row_stride, n_blocks, v_desc, vb_ready, k_row, kv_col, n_start,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, V_STAGES: gl.constexpr,
                    P_STAGES: gl.constexpr, STORE_COLS: gl.constexpr, CLUSTER: gl.constexpr, LAG: gl.constexpr):
    # The P V of output columns [256, 512), P and alpha from shared memory. LAG: this warpgroup
    # loads the back half of V itself into its own stages (v_smem's last V_STAGES, on vb_ready), each
    # refilled once its P V is done (it is their only reader).
    HALF: gl.constexpr = HEAD_DIM // 2
    o_layout: gl.constexpr = mma_layout(HALF, CLUSTER)
    row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    if LAG:
        for i in gl.static_range(V_STAGES):
            if i < n_blocks:
                _load_stage(v_desc, k_row + n_start + i * BLOCK_N, kv_col + HALF, vb_ready.index(i),
                            v_smem.index(V_STAGES + i), 1)
    acc = gl.zeros([BLOCK_M, HALF], gl.float32, o_layout)
    for j in range(n_blocks):
        sp = j % P_STAGES
        sv = j % V_STAGES
        mbarrier.wait(p_ready.index(sp), phase(j, P_STAGES))
        acc = acc * alpha_smem.index(sp).load(row_layout)[:, None]
        if LAG:
            mbarrier.wait(vb_ready.index(sv), phase(j, V_STAGES))
            v_half = v_smem.index(V_STAGES + sv)
        else:
            mbarrier.wait(v_ready.index(sv), phase(j, V_STAGES))
            v_half = v_smem.index(sv).slice(HALF, HALF, dim=1)
        acc = warpgroup_mma(p_smem.index(sp), v_half, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        cta_barrier()
        mbarrier.arrive(p_free.index(sp), count=1)
        if LAG:
            if j + V_STAGES < n_blocks:
                _load_stage(v_desc, k_row + n_start + (j + V_STAGES) * BLOCK_N, kv_col + HALF, vb_ready.index(sv),
                            v_smem.index(V_STAGES + sv), 1)
        else:
            _release(v_free, v_local, sv, CLUSTER)

    mbarrier.wait(done_bar, 0)  # the front warpgroup is past its last Q K^T: Q's buffer is free
    o = (acc * l_smem.load(row_layout)[:, None]).to(q_smem.dtype)
    staged = q_smem.slice(HALF, HALF, dim=1)
    staged.store(o)
    cta_barrier()
    store_rows(staged, out_ptr, q_row, rows, head * HEAD_DIM + HALF, out_row_stride, BLOCK_M, HALF, STORE_COLS,
               CLUSTER)


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_free, k_local, v_ready, v_free,
                    v_local, q_row, head, k_row, kv_col, n_start, n_blocks, BLOCK_N: gl.constexpr,
                    HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, CLUSTER: gl.constexpr):
    # TMA loads of Q (once; in a cluster each CTA its rows) and of the K and V rings, each stage as
    # soon as its readers free it (in a cluster multicast into both CTAs).
    _load_rows(q_desc, q_row, head * HEAD_DIM, q_bar, q_smem, CLUSTER)
    for j in range(n_blocks):
        k0 = k_row + n_start + j * BLOCK_N
        sk = j % K_STAGES
        _refill(k_desc, k0, kv_col, k_ready.index(sk), k_smem.index(sk), k_free.index(sk), k_local.index(sk),
                phase(j, K_STAGES) ^ 1, CLUSTER)
        sv = j % V_STAGES
        _refill(v_desc, k0, kv_col, v_ready.index(sv), v_smem.index(sv), v_free.index(sv), v_local.index(sv),
                phase(j, V_STAGES) ^ 1, CLUSTER)


@gluon.jit
def hd512_forward_kernel(
    q_desc, k_desc, v_desc, out_ptr, lse_ptr, lo_ptr, hi_ptr, cu_q_ptr, cu_k_ptr,
    t_seq, t_start, t_rows, t_lo_min, t_lo_max, t_hi_min, t_hi_max, order_ptr,
    total, group, qk_scale,
    HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, P_STAGES: gl.constexpr,
    SOFTMAX_REGS: gl.constexpr, STORE_COLS: gl.constexpr, SPLIT: gl.constexpr,
    CLUSTER: gl.constexpr = 1, FUSED: gl.constexpr = False, LAG: gl.constexpr = False,
):
    # SPLIT: the split schedule (SOFTMAX_REGS is then the back warpgroup's share). CLUSTER=2 (split
    # only): a program is a cluster of two CTAs over 2 x 64 query rows (BLOCK_M = 128) of one head,
    # each CTA its 64 rows, every K/V block multicast into both by the lead CTA once both CTAs'
    # readers free its stage; the per-CTA barriers are arrays over the cluster. FUSED: the fused
    # online softmax (_softmax_block). LAG (split, one CTA): the back warpgroup's P V one Q K^T behind
    # (_front_partition), v_desc's box half a V tile.
    head = gl.program_id(0)
    tile = gl.load(order_ptr + gl.program_id(1))
    rows = gl.load(t_rows + tile)
    if rows > 0:
        q_row, k_row, n_start, n_blocks, lo_max, hi_min, kv_col = query_tile(
            tile, head, group, t_seq, t_start, t_lo_min, t_lo_max, t_hi_min, t_hi_max, cu_q_ptr, cu_k_ptr,
            HEAD_DIM, BLOCK_N)

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        if LAG:  # v_desc's box is half a V tile: stages [0, V_STAGES) the front half, then the back half's
            v_smem = gl.allocate_shared_memory(dtype, [2 * V_STAGES, BLOCK_N, HEAD_DIM // 2], v_desc.layout)
        else:
            v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        p_layout: gl.constexpr = rows_shared_layout(BLOCK_M, BLOCK_N, dtype, CLUSTER)
        p_smem = gl.allocate_shared_memory(dtype, [P_STAGES, BLOCK_M, BLOCK_N], p_layout)
        vec_layout: gl.constexpr = vector_shared_layout(CLUSTER)
        alpha_smem = gl.allocate_shared_memory(gl.float32, [P_STAGES, BLOCK_M], vec_layout)
        l_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M], vec_layout)

        if CLUSTER == 2:
            q_bar = allocate_mbarrier()
            done_bar = allocate_mbarrier()
            k_ready = allocate_mbarrier(batch=K_STAGES)
            v_ready = allocate_mbarrier(batch=V_STAGES)
            p_ready = allocate_mbarrier(batch=P_STAGES)
            p_free = allocate_mbarrier(batch=P_STAGES)
        else:
            bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
            q_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
            done_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
            k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], bar_layout)
            v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], bar_layout)
            p_ready = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], bar_layout)
            p_free = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], bar_layout)
        mbarrier.init(q_bar, count=1)
        mbarrier.init(done_bar, count=1)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_ready.index(i), count=1)
        for i in gl.static_range(P_STAGES):
            mbarrier.init(p_ready.index(i), count=1)
            mbarrier.init(p_free.index(i), count=1)
        if SPLIT:  # the load warp refills a stage when its readers free it
            if CLUSTER == 2:  # the pair's (on the lead CTA, which multicasts) and each CTA's own
                k_free = allocate_mbarrier(batch=K_STAGES, two_ctas=True)
                v_free = allocate_mbarrier(batch=V_STAGES, two_ctas=True)
                k_local = allocate_mbarrier(batch=K_STAGES)
                v_local = allocate_mbarrier(batch=V_STAGES)
                for i in gl.static_range(K_STAGES):
                    mbarrier.init(k_local.index(i), count=1)
                for i in gl.static_range(V_STAGES):
                    mbarrier.init(v_local.index(i), count=2)
            else:
                k_free = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], bar_layout)
                v_free = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], bar_layout)
                k_local = k_free  # unused with one CTA
                v_local = v_free
            vb_ready = v_free  # unused without LAG
            if LAG:
                vb_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], bar_layout)
                for i in gl.static_range(V_STAGES):
                    mbarrier.init(vb_ready.index(i), count=1)
            for i in gl.static_range(K_STAGES):
                mbarrier.init(k_free.index(i), count=1)
            for i in gl.static_range(V_STAGES):
                # both warpgroups read each V stage, with LAG the front one only its half
                mbarrier.init(v_free.index(i), count=1 if LAG else 2)
        fence_async_shared()

        if SPLIT:
            gl.warp_specialize([
                (_front_partition, (q_smem, k_smem, v_smem, p_smem, alpha_smem, l_smem, q_bar, k_ready, k_free,
                                    k_local, v_ready, v_free, v_local, p_ready, p_free, done_bar, lo_ptr, hi_ptr,
                                    lse_ptr, out_ptr, q_row, rows, head, total, HEADS * HEAD_DIM, n_start, n_blocks,
                                    lo_max, hi_min, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, K_STAGES, V_STAGES, P_STAGES,
                                    STORE_COLS, CLUSTER, FUSED, LAG)),
                (_back_partition, (q_smem, v_smem, p_smem, alpha_smem, l_smem, v_ready, v_free, v_local, p_ready,
                                   p_free, done_bar, out_ptr, q_row, rows, head, HEADS * HEAD_DIM, n_blocks, v_desc,
                                   vb_ready, k_row, kv_col, n_start, BLOCK_M, BLOCK_N, HEAD_DIM, V_STAGES, P_STAGES,
                                   STORE_COLS, CLUSTER, LAG)),
                (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_free, k_local,
                                   v_ready, v_free, v_local, q_row, head, k_row, kv_col, n_start, n_blocks, BLOCK_N,
                                   HEAD_DIM, K_STAGES, V_STAGES, CLUSTER)),
            ], [4, 1], [SOFTMAX_REGS, 24])
        else:
            gl.warp_specialize([
                (_output_partition, (v_desc, q_smem, v_smem, p_smem, alpha_smem, l_smem, v_ready, p_ready, p_free,
                                     done_bar, out_ptr, q_row, rows, head, HEADS * HEAD_DIM, k_row, kv_col, n_start,
                                     n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, V_STAGES, P_STAGES, STORE_COLS)),
                (_softmax_partition, (q_desc, k_desc, q_smem, k_smem, p_smem, alpha_smem, l_smem, q_bar, k_ready,
                                      p_ready, p_free, done_bar, lo_ptr, hi_ptr, lse_ptr, q_row, rows, head, total,
                                      k_row, kv_col, n_start, n_blocks, lo_max, hi_min, qk_scale, BLOCK_M, BLOCK_N,
                                      HEAD_DIM, K_STAGES, P_STAGES, FUSED)),
            ], [4], [SOFTMAX_REGS])
