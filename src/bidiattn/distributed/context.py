"""Context-parallel attention: each rank's query rows against the key shards they read, merged
exactly by log-sum-exp, on ``torch.distributed`` point-to-point operations.

Forward on rank ``r`` (rows ``[a, b)`` of the sequence, its :class:`~.rank.RankPlan` blocks in
arrival order)::

    step 0      own block: q[a:b] x k/v[a:b]                        (no transfer)
    step d>=1   one batch_isend_irecv with the ranks at ring distance d (r - d and r + d):
                  send   k/v[key_ranges[(p, r)]] to each p that reads r's keys,
                  recv   k/v[key_ranges[(r, p)]] from each p whose keys r reads;
                posted before step d - 1's compute (the next fetch overlaps the current block)
    each block  out_s, lse_s = bidiattn.attention(q rows, fetched k/v, block spans)
    merge       lse = logaddexp(lse, lse_s);  out = out * exp(lse_old - lse) + out_s * exp(lse_s - lse)

Every key a row sees lies in exactly one shard and one block, so the merge counts each key once;
a row outside a block's row range does not see that shard (its lse there is ``-inf``).

Backward, the same steps: the K/V blocks are fetched again, each block's gradients are computed
from the *merged* ``out`` and ``lse`` (``p = exp(s - lse)``, ``delta = rowsum(dout * out) -
dlse``), which is exact (the gradients of the merge folded into the block's softmax); dQ stays
local, dK/dV of a block go back to its owner in one batch per step (after that step's compute)
and are summed there. All ranks post their batches in the same sequence of steps, so the
operations match without a handshake; on NCCL each batch is one group of sends and receives.

The per-block math is shared by :func:`simulate_context_attention`, which runs every rank in
turn on one device with no process group (fetches are slices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bidiattn.attention import BACKENDS, attention
from bidiattn.distributed.rank import RankBlock, RankPlan, plan_rank
from bidiattn.distributed.sharding import ShardPlan, plan_shards
from bidiattn.inputs import FLOAT_DTYPES, check_scale_softcap
from bidiattn.spans import SpanMask

__all__ = ["context_attention", "simulate_context_attention"]

_TAG_K, _TAG_V, _TAG_DK, _TAG_DV = 11, 12, 13, 14


@dataclass(frozen=True)
class _Call:
    """What every block call of one context-parallel call shares."""

    scale: float
    softcap: float | None
    backend: str


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator (merge, gradient partials) dtype: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- per-block math
def _block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: RankBlock, call: _Call):
    """``(out, lse)`` of the block's rows over its keys (``q`` all of the rank's rows)."""
    q0, q1 = block.rows
    return attention(q[q0:q1], k, v, block.spans, scale=call.scale, softcap=call.softcap, return_lse=True,
                     backend=call.backend)


def _merge(out: torch.Tensor, lse: torch.Tensor, block: RankBlock, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold a block's ``(out_b, lse_b)`` into the running ``out [n, H, D]``/``lse [H, n]`` (in place)."""
    q0, q1 = block.rows
    old = lse[:, q0:q1]
    new = torch.logaddexp(old, lse_b.to(lse.dtype))
    w_old = torch.exp(old - new).transpose(0, 1).unsqueeze(-1)
    w_new = torch.exp(lse_b.to(lse.dtype) - new).transpose(0, 1).unsqueeze(-1)
    out[q0:q1] = out[q0:q1] * w_old + out_b.to(out.dtype) * w_new
    lse[:, q0:q1] = new


def _uses_dense_backward(q: torch.Tensor, backend: str) -> bool:
    """Whether block gradients are computed densely in PyTorch (the reference backend, CPU,
    or inputs the Triton backward cannot take) instead of by the Triton backward kernels."""
    if backend == "reference" or (backend == "auto" and q.device.type != "cuda"):
        return True
    from bidiattn.launch import triton_unsupported

    return triton_unsupported(q.device, q.dtype, q.shape[-1]) is not None


def _dense_block_grads(q, k, v, out, lse, dout, dlse, spans: SpanMask, call: _Call):
    """``(dq, dk, dv)`` of one block from the merged ``out``/``lse`` (dense, accumulator dtype)."""
    acc = _acc_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    mask = spans.to_dense()
    qf = q.to(acc).transpose(0, 1)
    kf = k.to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
    do = dout.to(acc).transpose(0, 1)
    s = torch.matmul(qf, kf.transpose(1, 2)) * call.scale
    if call.softcap is not None:
        t = torch.tanh(s / call.softcap)
        s = call.softcap * t
    p = torch.exp(s - lse.to(acc)[..., None]).masked_fill(~mask, 0.0)
    delta = (do * out.to(acc).transpose(0, 1)).sum(-1) - dlse.to(acc)
    ds = p * (torch.matmul(do, vf.transpose(1, 2)) - delta[..., None])
    if call.softcap is not None:
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, kf).transpose(0, 1) * call.scale
    dk = torch.matmul(ds.transpose(1, 2), qf) * call.scale
    dv = torch.matmul(p.transpose(1, 2), do)
    hkv, m, d = k.shape[1], k.shape[0], k.shape[2]
    dk = dk.view(hkv, group, m, d).sum(1).transpose(0, 1)
    dv = dv.view(hkv, group, m, d).sum(1).transpose(0, 1)
    return dq, dk, dv


def _block_grads(q, k, v, out, lse, dout, dlse, block: RankBlock, call: _Call):
    """``(dq, dk, dv)`` of a block's rows (``q``, ``out``, ``dout`` all of the rank's rows, ``lse``
    and ``dlse`` ``[H, n]``) over its keys ``k``/``v``, in the accumulator dtype."""
    q0, q1 = block.rows
    args = (q[q0:q1], k, v, out[q0:q1], lse[:, q0:q1].contiguous(), dout[q0:q1], dlse[:, q0:q1].contiguous())
    if _uses_dense_backward(q, call.backend):
        return _dense_block_grads(*args, block.spans, call)
    from bidiattn.launch import planned
    from bidiattn.ops import plan_arguments, span_attention_backward_op

    qb, kb, vb, ob, lb, dob, dlb = args
    sp = block.spans
    # The block spans' training plan, made once per SpanMask (kept on it, as attention() keeps its
    # plans): a RankPlan reused across layers and steps plans each block's backward once.
    launch = planned(sp, qb.shape[1], kb.shape[1], qb.shape[2], backend="triton", training=True, dtype=qb.dtype,
                     paged=False).triton
    tensors, meta = plan_arguments(launch)
    dq, dk, dv = span_attention_backward_op(dob.contiguous(), dlb.float(), qb, kb.contiguous(), vb.contiguous(),
                                            ob.contiguous(), lb.float(), sp.lo, sp.hi, sp.cu_seqlens,
                                            sp.cu_seqlens_k, call.scale, call.softcap, tensors, meta)
    acc = _acc_dtype(q.dtype)
    return dq.to(acc), dk.to(acc), dv.to(acc)


def _rank_forward(q: torch.Tensor, plan: RankPlan, call: _Call, blocks_of_step: Callable):
    """Merged ``(out, lse)`` of the rank's rows; ``blocks_of_step(d)`` yields ``(block, k, v)``
    for the blocks of step ``d`` (it may wait on a transfer)."""
    n, hq, d = q.shape
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(n, hq, d, dtype=acc, device=q.device)
    lse = torch.full((hq, n), float("-inf"), dtype=acc, device=q.device)
    for step in range(plan.max_distance() + 1):
        for block, kb, vb in blocks_of_step(step):
            out_b, lse_b = _block_forward(q, kb, vb, block, call)
            _merge(out, lse, block, out_b, lse_b)
    return out.to(q.dtype), lse


# ---------------------------------------------------------------------------- simulation
def simulate_context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, plan: ShardPlan,
                               *, scale: float | None = None, softcap: float | None = None, backend: str = "auto",
                               grad_out: torch.Tensor | None = None, grad_lse: torch.Tensor | None = None):
    """Context-parallel attention with every rank simulated in turn on one device, no process group.

    Runs exactly the per-rank computation of :func:`context_attention` (each rank's blocks from
    :func:`~bidiattn.distributed.plan_rank`, the same block calls and lse merge, the same block
    gradients summed per key owner), with each "fetch" a slice of the whole ``k``/``v``. For
    checking the sharded math against one-shot :func:`bidiattn.attention` on one GPU.

    Args:
        q, k, v: the whole sequence, ``[T, Hq, D]`` and ``[T, Hkv, D]``.
        spans: its self-attention spans; ``plan``: :func:`~bidiattn.distributed.plan_shards` of them.
        scale, softcap, backend: as for :func:`bidiattn.attention` (``backend`` per block).
        grad_out: ``[T, Hq, D]``, the gradient of the output; with it the backward runs too.
        grad_lse: ``[Hq, T]``, the gradient of the lse (default zero); only with ``grad_out``.

    Returns:
        ``(out [T, Hq, D], lse [Hq, T])``; with ``grad_out`` also ``dq, dk, dv`` (q/k/v dtypes):
        ``(out, lse, dq, dk, dv)``. ``lse`` is fp32 (fp64 for fp64 inputs).
    """
    call = _check_call(q, k, v, spans, scale, softcap, backend, local_rows=spans.total_tokens if isinstance(
        spans, SpanMask) else None)
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must be a ShardPlan (bidiattn.distributed.plan_shards), got {type(plan).__name__}")
    starts = plan.starts
    ranks = [plan_rank(spans, plan, r, device=q.device) for r in range(plan.world_size)]

    def slices(rp: RankPlan, tensors):
        def blocks_of_step(step):
            for block in rp.blocks:
                if block.distance == step:
                    k0 = starts[block.source] + block.keys[0]
                    k1 = starts[block.source] + block.keys[1]
                    yield (block,) + tuple(t[k0:k1] for t in tensors)
        return blocks_of_step

    outs, lses = [], []
    for rp in ranks:
        a, b = rp.rows
        if a == b:
            continue
        out_r, lse_r = _rank_forward(q[a:b], rp, call, slices(rp, (k, v)))
        outs.append(out_r)
        lses.append(lse_r)
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    if grad_out is None:
        if grad_lse is not None:
            raise ValueError("grad_lse needs grad_out")
        return out, lse
    if not isinstance(grad_out, torch.Tensor) or grad_out.shape != q.shape:
        raise ValueError(f"grad_out must be a tensor of q's shape {tuple(q.shape)}, got "
                         f"{tuple(grad_out.shape) if isinstance(grad_out, torch.Tensor) else type(grad_out).__name__}")
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    elif not isinstance(grad_lse, torch.Tensor) or grad_lse.shape != lse.shape:
        raise ValueError(f"grad_lse must be a tensor of shape {tuple(lse.shape)}")
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for rp in ranks:
        a, b = rp.rows
        for block, kb, vb in (x for step in range(rp.max_distance() + 1) for x in slices(rp, (k, v))(step)):
            gq, gk, gv = _block_grads(q[a:b], kb, vb, out[a:b], lse[:, a:b], grad_out[a:b], grad_lse[:, a:b], block,
                                      call)
            q0, q1 = block.rows
            dq[a + q0:a + q1] += gq
            k0 = starts[block.source] + block.keys[0]
            dk[k0:k0 + block.num_keys] += gk
            dv[k0:k0 + block.num_keys] += gv
    return out, lse, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------- validation
def _check_call(q, k, v, spans, scale, softcap, backend, local_rows: int | None) -> _Call:
    """Check a context-parallel call's tensors and options; the shared per-block settings."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [T, H, D] (the local shard), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, FLOAT_DTYPES))}")
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if not spans.is_self_attention:
        raise ValueError("context parallelism shards self-attention spans; got extend spans (cu_seqlens_k set)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but k/v {k.shape[0]}: each rank passes its own shard of all three")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dims differ: q has D={q.shape[2]}, k/v D={k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads Hq={q.shape[1]} must be a positive multiple of key/value heads Hkv={k.shape[1]}")
    if local_rows is not None and q.shape[0] != local_rows:
        raise ValueError(f"q/k/v have {q.shape[0]} rows but this rank's shard has {local_rows} (plan.starts)")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    scale = check_scale_softcap(scale, softcap, q.shape[2])
    return _Call(scale=scale, softcap=None if softcap is None else float(softcap), backend=backend)


# ---------------------------------------------------------------------------- communication
def _peers(plan: RankPlan, step: int) -> list[int]:
    """Group ranks at ring distance ``step`` from this rank (one or two)."""
    w, r = plan.shards.world_size, plan.rank
    return sorted({(r - step) % w, (r + step) % w})


class _Comm:
    """The process group of one call: group ranks to global ranks for P2P, and the batches."""

    def __init__(self, group, plan: RankPlan):
        import torch.distributed as dist

        self.dist, self.group, self.plan = dist, group, plan

    def _op(self, send: bool, tensor: torch.Tensor, peer: int, tag: int):
        d = self.dist
        return d.P2POp(d.isend if send else d.irecv, tensor, d.get_global_rank(self.group, peer), self.group, tag)

    def post(self, sends: list, recvs: list) -> list:
        """One batch: ``sends``/``recvs`` are ``(tensor, peer, tag)``; returns the works to wait on."""
        ops = [self._op(True, t, p, tag) for t, p, tag in sends] + [self._op(False, t, p, tag) for t, p, tag in recvs]
        return self.dist.batch_isend_irecv(ops) if ops else []

    def kv_step(self, step: int, k: torch.Tensor, v: torch.Tensor):
        """Post step ``step``'s K/V exchange; returns ``(works, {source: (k, v) buffers})``."""
        plan, r = self.plan, self.plan.rank
        shards = plan.shards
        sends, recvs, buffers = [], [], {}
        for p in _peers(plan, step):
            if p == r:
                continue
            if (p, r) in shards.key_ranges:
                k0, k1 = shards.key_ranges[(p, r)]
                s0 = shards.starts[r]
                sends += [(k[k0 - s0:k1 - s0].contiguous(), p, _TAG_K), (v[k0 - s0:k1 - s0].contiguous(), p, _TAG_V)]
            if (r, p) in shards.key_ranges:
                k0, k1 = shards.key_ranges[(r, p)]
                kb = k.new_empty((k1 - k0,) + tuple(k.shape[1:]))
                vb = v.new_empty((k1 - k0,) + tuple(v.shape[1:]))
                buffers[p] = (kb, vb)
                recvs += [(kb, p, _TAG_K), (vb, p, _TAG_V)]
        return self.post(sends, recvs), buffers

    def grad_step(self, step: int, partials: dict, like: torch.Tensor):
        """Post step ``step``'s dK/dV return: ``partials`` maps a source rank to this rank's
        ``(dk, dv)`` for its keys; receives the partials of the ranks that read this rank's keys.
        Returns ``(works, [(k0, dk, dv) to add at local key k0])``."""
        plan, r = self.plan, self.plan.rank
        shards = plan.shards
        sends, recvs, incoming = [], [], []
        for p in _peers(plan, step):
            if p == r:
                continue
            if p in partials:
                gk, gv = partials[p]
                sends += [(gk.contiguous(), p, _TAG_DK), (gv.contiguous(), p, _TAG_DV)]
            if (p, r) in shards.key_ranges:
                k0, k1 = shards.key_ranges[(p, r)]
                gk = like.new_empty((k1 - k0,) + tuple(like.shape[1:]))
                gv = like.new_empty((k1 - k0,) + tuple(like.shape[1:]))
                incoming.append((k0 - shards.starts[r], gk, gv))
                recvs += [(gk, p, _TAG_DK), (gv, p, _TAG_DV)]
        return self.post(sends, recvs), incoming


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _exchange_blocks(comm: _Comm, plan: RankPlan, k: torch.Tensor, v: torch.Tensor):
    """``blocks_of_step`` for :func:`_rank_forward` over the process group: step 0 is the own
    block; step ``d`` waits on its batch, posting step ``d + 1``'s before handing the blocks out,
    so that the next transfer overlaps the current blocks' compute."""
    steps = plan.max_distance()
    pending = {}

    def blocks_of_step(step):
        if step == 0 and steps >= 1:
            pending[1] = comm.kv_step(1, k, v)
        elif step >= 1:
            if step + 1 <= steps:
                pending[step + 1] = comm.kv_step(step + 1, k, v)
            works, buffers = pending.pop(step)
            _wait(works)
        for block in plan.blocks:
            if block.distance != step:
                continue
            if step == 0:
                yield block, k, v
            else:
                yield (block,) + buffers[block.source]

    return blocks_of_step


class _ContextAttention(torch.autograd.Function):
    """Autograd node of :func:`context_attention` (the forward and backward of the module)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RankPlan, call: _Call, group):
        if plan.num_rows == 0:
            # Nothing is sent to or from an empty shard: no step has an operation for this rank.
            out = q.new_empty(q.shape)
            lse = torch.empty((q.shape[1], 0), dtype=_acc_dtype(q.dtype), device=q.device)
        else:
            comm = _Comm(group, plan)
            out, lse = _rank_forward(q, plan, call, _exchange_blocks(comm, plan, k, v))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.call, ctx.group = plan, call, group
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, call = ctx.plan, ctx.call
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        if plan.num_rows == 0:
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        comm = _Comm(ctx.group, plan)
        steps = plan.max_distance()
        kv = {}
        grad_works, incoming = [], []
        if steps >= 1:
            kv[1] = comm.kv_step(1, k, v)
        for step in range(steps + 1):
            if step >= 1:
                if step + 1 <= steps:
                    kv[step + 1] = comm.kv_step(step + 1, k, v)
                works, buffers = kv.pop(step)
                _wait(works)
            partials = {}
            for block in plan.blocks:
                if block.distance != step:
                    continue
                kb, vb = (k, v) if step == 0 else buffers[block.source]
                gq, gk, gv = _block_grads(q, kb, vb, out, lse, dout, dlse, block, call)
                q0, q1 = block.rows
                dq[q0:q1] += gq
                if step == 0:
                    dk[block.keys[0]:block.keys[1]] += gk
                    dv[block.keys[0]:block.keys[1]] += gv
                else:
                    partials[block.source] = (gk, gv)
            if step >= 1:
                _wait(grad_works)
                _accumulate(dk, dv, incoming)
                grad_works, incoming = comm.grad_step(step, partials, dk)
        _wait(grad_works)
        _accumulate(dk, dv, incoming)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _accumulate(dk: torch.Tensor, dv: torch.Tensor, incoming: list) -> None:
    for k0, gk, gv in incoming:
        dk[k0:k0 + gk.shape[0]] += gk
        dv[k0:k0 + gv.shape[0]] += gv


# ---------------------------------------------------------------------------- public entry
def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: SpanMask, *, group=None,
                      plan: ShardPlan | RankPlan | None = None, scale: float | None = None,
                      softcap: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Exact span attention of one long sequence sharded over the ranks of a process group.

    Each rank passes its own contiguous shard of the packed tokens (rows ``plan.starts[r] :
    plan.starts[r + 1]`` of q, k and v) and the *whole* sequence's spans (O(T) integers, the same
    on every rank). The rank computes its rows against only the key shards they see (for a
    sliding layer only the window's halo, not whole shards), fetching them from their owners
    with ``torch.distributed`` point-to-point batches (``batch_isend_irecv``), the next fetch
    in flight while the current block computes, and merges the partial results by log-sum-exp.
    Example, 3 ranks, 9 tokens, an image at 2..4 (``x`` a computed pair, ``.`` skipped;
    ``[ ]`` a block, the keys one transfer carries)::

                keys   0 1 2 | 3 4 5 | 6 7 8
        rank 0  rows 0-2   [x . .]|[. . .]         own block + keys 3..4 from rank 1
                           [x x .]|[. .]           (row 2, an image row, sees 0..4)
                           [x x x]|[x x]
        rank 1  rows 3-5   [x x x]|[x x .]         keys 0..2 from rank 0 + own block
        rank 2  rows 6-8   [x x x]|[x x x]|[x . .]  keys from ranks 0 and 1 + own block

    Exact: each key of a row's interval is in one shard and one block, attended once; the merge
    is the exact softmax combination (``lse = logaddexp`` of the blocks', each block's output
    weighted by ``exp(lse_block - lse)``) in fp32 (fp64 for fp64 inputs). The backward uses the
    merged output and lse for every block (exact gradients), keeps dQ local and sends each
    block's dK/dV (fp32; fp64 for fp64) back to the key owner, which sums them. Differs from the
    one-shot call only by floating-point summation order (and, for fp16/bf16, by each block's
    output being rounded to the input dtype before the merge).

    Args:
        q: ``[T_r, Hq, D]``, this rank's rows; ``T_r = plan.starts[r + 1] - plan.starts[r]``
            (0 for a rank the plan leaves without rows: it returns empty tensors).
        k, v: ``[T_r, Hkv, D]``, this rank's keys (the same tokens), ``Hq % Hkv == 0`` (GQA).
        spans: the whole sequence's self-attention :class:`~bidiattn.SpanMask` (every family,
            convention and layer of :func:`bidiattn.rules.build`; packed sequences allowed).
        group: the ``torch.distributed`` process group (default: the world); its size is the
            plan's ``world_size`` and the rank's group rank its shard. gloo on CPU, NCCL on GPUs
            (with NCCL, set the device first; the group must have run one collective before, as
            ``batch_isend_irecv`` requires).
        plan: :func:`~bidiattn.distributed.plan_shards` of ``spans`` for the group's size, or
            this rank's :func:`~bidiattn.distributed.plan_rank` of it (reuse one across the
            layers that share spans: the block spans and their launch plans are then made once).
            ``None``: ``plan_shards(spans, world_size, num_q_heads=Hq)`` (tile 128), made in
            the call on every rank (the shards must then follow that plan).
        scale, softcap: as for :func:`bidiattn.attention`.
        return_lse: also return the lse ``[Hq, T_r]`` (fp32; fp64 for fp64), differentiable.
        backend: passed to :func:`bidiattn.attention` for each block (``"reference"`` on CPU;
            ``"auto"`` picks the kernels on GPUs). Gradients of a block come from the Triton
            backward kernels where they take the inputs (CUDA, fp16/bf16), else from dense
            PyTorch math (the reference).

    Returns:
        ``out [T_r, Hq, D]`` in q's dtype (and ``lse``), differentiable w.r.t. q, k and v
        through a ``torch.autograd.Function``; every rank must run the backward too.

    Raises:
        TypeError / ValueError naming the bad argument (tensors, spans, plan against group and
        shard sizes, backend, scale/softcap); RuntimeError if ``torch.distributed`` is not
        initialized.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context_attention needs an initialized torch.distributed process group "
                           "(use simulate_context_attention for one process)")
    if group is None:
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if not isinstance(spans, SpanMask):
        raise TypeError(f"spans must be a bidiattn.SpanMask, got {type(spans).__name__}")
    if isinstance(q, torch.Tensor) and q.dim() == 3 and plan is None:
        plan = plan_shards(spans, world, num_q_heads=q.shape[1])
    if isinstance(plan, ShardPlan):
        if plan.world_size != world:
            raise ValueError(f"plan is for {plan.world_size} ranks but the group has {world}")
        plan = plan_rank(spans, plan, rank, device=q.device if isinstance(q, torch.Tensor) else None)
    elif isinstance(plan, RankPlan):
        if plan.shards.world_size != world:
            raise ValueError(f"plan is for {plan.shards.world_size} ranks but the group has {world}")
        if plan.rank != rank:
            raise ValueError(f"plan is rank {plan.rank}'s but this is rank {rank} of the group")
        if plan.shards.starts[-1] != spans.total_tokens:
            raise ValueError(f"the plan covers {plan.shards.starts[-1]} rows but spans have {spans.total_tokens}")
        device = plan.blocks[0].spans.lo.device if plan.blocks else None
        if device is not None and isinstance(q, torch.Tensor) and device != q.device:
            raise ValueError(f"plan's block spans are on {device} but q is on {q.device} (plan_rank(..., device=))")
    elif plan is not None:
        raise TypeError(f"plan must be a ShardPlan, a RankPlan or None, got {type(plan).__name__}")
    call = _check_call(q, k, v, spans, scale, softcap, backend,
                       local_rows=plan.num_rows if isinstance(plan, RankPlan) else None)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    out, lse = _ContextAttention.apply(q, k, v, plan, call, group)
    return (out, lse) if return_lse else out
