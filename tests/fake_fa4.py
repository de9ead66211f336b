"""FlashAttention-4's varlen interface as bidiattn calls it, written out in PyTorch (fp64), so
the fa4 backend's launch logic (segment launches, the backward's copies and sums) runs on CPU.

It follows FlashAttention's varlen conventions, not bidiattn's: sequence ``b`` of a launch holds
rows ``cu_seqlens_q[b] : + seqused_q[b]`` (``cu_seqlens_q[b + 1] - cu_seqlens_q[b]`` without
``seqused_q``) and keys likewise (or the pages of ``page_table[b]``); query ``i`` is aligned with
key ``i + k_len - q_len`` and sees keys ``[i + k_len - q_len - L, i + k_len - q_len + R]`` for a
window ``(L, R)`` (``None``: unbounded). Like FA4, the backward *writes* dQ/dK/dV at the rows and
keys of each sequence (no accumulation across sequences), and asserts what FA4 asserts of a
backward call (int32 monotone ``cu_seqlens``, no ``seqused``, shapes). Rows and keys it does not
write keep NaN, so a launch that misses or overlaps them shows in the results.
"""

from __future__ import annotations

import torch


class FakeFA4:
    calls: list

    def __init__(self):
        self.calls = []

    @staticmethod
    def _scores(q, k, scale, softcap):
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap:
            t = torch.tanh(s / softcap)
            return softcap * t, t
        return s, None

    @staticmethod
    def _mask(nq, nk, left, right):
        i = torch.arange(nq)[:, None] + nk - nq
        j = torch.arange(nk)[None, :]
        ok = torch.ones(nq, nk, dtype=torch.bool)
        if left is not None:
            ok &= j >= i - left
        if right is not None:
            ok &= j <= i + right
        return ok

    @staticmethod
    def _sparse_mask(sparse, aux_tensors, rows, keys, by_key):
        """The mask a block-sparse ``mask_mod`` call applies: full blocks kept, partial blocks
        masked by ``aux_tensors[0][row] <= key <= aux_tensors[1][row]`` (bidiattn's span mask
        function), other blocks skipped. ``by_key``: the tables list query blocks per key block
        (the backward's)."""
        bq, bk = sparse.block_size
        lo, hi = (x.long() for x in aux_tensors)
        i = torch.arange(rows)[:, None]
        j = torch.arange(keys)[None, :]
        span = (j >= lo[:, None]) & (j <= hi[:, None])
        kinds = torch.zeros(-(-rows // bq), -(-keys // bk), dtype=torch.long)  # 0 absent, 1 partial, 2 full
        for num, idx, kind in ((sparse.mask_block_cnt, sparse.mask_block_idx, 1),
                               (sparse.full_block_cnt, sparse.full_block_idx, 2)):
            assert num.shape[:2] == (1, 1) and idx.shape[:3] == num.shape, (num.shape, idx.shape)
            for outer in range(num.shape[2]):
                for inner in idx[0, 0, outer, : int(num[0, 0, outer])].tolist():
                    at = (inner, outer) if by_key else (outer, inner)
                    assert kinds[at] == 0, f"block {at} listed twice"
                    kinds[at] = kind
        kind = kinds[i // bq, j // bk]
        return (kind == 2) | ((kind == 1) & span)

    @staticmethod
    def _check_sm90_blocks(sparse, head_dim, backward):
        """FA4 4.0.0b36 on SM90 takes a sparse key block equal to its key tile: the forward
        shrinks its tile (128 keys up to head dim 128, 112 up to 192, 80 up to 256) to a smaller
        block of a multiple of 16 keys; the backward's tile is fixed (128, 96, 64) and its
        64-row query tiles (128 at head dim <= 64) must divide the query block."""
        bq, bk = sparse.block_size
        tier = 0 if head_dim <= 128 else 1 if head_dim <= 192 else 2
        assert head_dim <= 256, head_dim
        if backward:
            m = 128 if head_dim <= 64 else 64
            assert bk == (128, 96, 64)[tier] and bq % m == 0, (head_dim, sparse.block_size)
        else:
            assert bk <= (128, 112, 80)[tier] and bk % 16 == 0 and bq % 64 == 0, (head_dim, sparse.block_size)

    def _masked_fwd(self, q, k, v, softmax_scale, softcap, block_sparse_tensors, aux_tensors):
        assert q.dim() == 4 and q.shape[0] == 1 and all(x.dtype == torch.int32 for x in aux_tensors)
        self._check_sm90_blocks(block_sparse_tensors, q.shape[-1], backward=False)
        q, k, v = q[0], k[0], v[0]
        group = q.shape[1] // k.shape[1]
        kb, vb = (x.double().repeat_interleave(group, 1) for x in (k, v))
        s, _ = self._scores(q.double(), kb, softmax_scale, softcap)
        allowed = self._sparse_mask(block_sparse_tensors, aux_tensors, q.shape[0], k.shape[0], by_key=False)
        s = s.masked_fill(~allowed, float("-inf"))
        m = torch.logsumexp(s, -1)
        out = torch.einsum("hqk,khd->qhd", torch.exp(s - m[..., None]), vb).to(q.dtype)
        return out[None], m.float()[None]

    def _flash_attn_fwd(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, page_table=None, softmax_scale=None, causal=False,
                        softcap=None, window_size_left=None, window_size_right=None, pack_gqa=None,
                        return_lse=False, out=None, lse=None, mask_mod=None, block_sparse_tensors=None,
                        aux_tensors=None):
        self.calls.append(("fwd", window_size_left, window_size_right, pack_gqa))
        if mask_mod is not None:
            assert cu_seqlens_q is None and window_size_left is None and not causal and return_lse
            return self._masked_fwd(q, k, v, softmax_scale, softcap, block_sparse_tensors, aux_tensors)
        assert cu_seqlens_q.dtype == torch.int32 and not causal
        group = q.shape[1] // k.shape[-2]
        for b in range(cu_seqlens_q.numel() - 1):
            q0, nq = int(cu_seqlens_q[b]), int(seqused_q[b])
            nk = int(seqused_k[b])
            assert nq <= max_seqlen_q and nk <= max_seqlen_k
            if page_table is None:
                k0 = int(cu_seqlens_k[b])
                kb, vb = k[k0 : k0 + nk], v[k0 : k0 + nk]
            else:
                pages = page_table[b].long()
                kb, vb = (x[pages].flatten(0, 1)[:nk] for x in (k, v))
            kb, vb = (x.double().repeat_interleave(group, 1) for x in (kb, vb))
            s, _ = self._scores(q[q0 : q0 + nq].double(), kb, softmax_scale, softcap)
            s = s.masked_fill(~self._mask(nq, nk, window_size_left, window_size_right), float("-inf"))
            m = torch.logsumexp(s, -1)
            out[q0 : q0 + nq] = torch.einsum("hqk,khd->qhd", torch.exp(s - m[..., None]), vb).to(out.dtype)
            lse[:, q0 : q0 + nq] = m.float()
        return out, lse

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, cu_seqlens_q=None, cu_seqlens_k=None,
                        seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, dlse=None,
                        mask_mod=None, aux_tensors=None, block_sparse_tensors=None):
        if mask_mod is not None:
            self.calls.append(("bwd", None, None, 1))
            assert cu_seqlens_q is None and q.dim() == 4 and q.shape[0] == 1 and lse.shape == (1, q.shape[2], q.shape[1])
            self._check_sm90_blocks(block_sparse_tensors, q.shape[-1], backward=True)
            allowed = self._sparse_mask(block_sparse_tensors, aux_tensors, q.shape[1], k.shape[1], by_key=True)
            return self._dense_bwd(q[0], k[0], v[0], out[0], dout[0], lse[0], softmax_scale, softcap, allowed,
                                   None if dlse is None else dlse[0])
        self.calls.append(("bwd", window_size_left, window_size_right, cu_seqlens_q.numel() - 1))
        assert seqused_q is None and seqused_k is None and not causal
        for cu, rows in ((cu_seqlens_q, q.shape[0]), (cu_seqlens_k, k.shape[0])):
            assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == rows
            assert bool((cu[1:] >= cu[:-1]).all())
        assert out.shape == dout.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
        assert q.dtype == k.dtype == v.dtype == out.dtype == dout.dtype and lse.dtype == torch.float32
        group = q.shape[1] // k.shape[1]
        dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
        for b in range(cu_seqlens_q.numel() - 1):
            q0, q1, k0, k1 = (int(x) for x in (cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b],
                                                 cu_seqlens_k[b + 1]))
            assert q1 - q0 <= max_seqlen_q and k1 - k0 <= max_seqlen_k
            qb, ob, dob = (x[q0:q1].double() for x in (q, out, dout))
            kb, vb = (x[k0:k1].double().repeat_interleave(group, 1) for x in (k, v))
            s, t = self._scores(qb, kb, softmax_scale, softcap)
            allowed = self._mask(q1 - q0, k1 - k0, window_size_left, window_size_right)
            p = torch.exp(s - lse[:, q0:q1, None].double()).masked_fill(~allowed, 0.0)
            delta = (ob * dob).sum(-1).t()
            if dlse is not None:
                delta = delta - dlse[:, q0:q1].double()
            ds = p * (torch.einsum("qhd,khd->hqk", dob, vb) - delta[..., None])
            if t is not None:
                ds = ds * (1 - t * t)
            dq[q0:q1] = (torch.einsum("hqk,khd->qhd", ds, kb) * softmax_scale).to(dq.dtype)
            dkb = torch.einsum("hqk,qhd->khd", ds, qb) * softmax_scale
            dvb = torch.einsum("hqk,qhd->khd", p, dob)
            dk[k0:k1] = dkb.unflatten(1, (k.shape[1], group)).sum(2).to(dk.dtype)
            dv[k0:k1] = dvb.unflatten(1, (k.shape[1], group)).sum(2).to(dv.dtype)
        return dq, dk, dv

    def _dense_bwd(self, q, k, v, out, dout, lse, softmax_scale, softcap, allowed, dlse):
        """The gradients of one batch of ``[T, H, D]`` tensors under the mask ``allowed``, each
        with a leading batch dim of one (the masked path's layout)."""
        group = q.shape[1] // k.shape[1]
        qb, ob, dob = (x.double() for x in (q, out, dout))
        kb, vb = (x.double().repeat_interleave(group, 1) for x in (k, v))
        s, t = self._scores(qb, kb, softmax_scale, softcap)
        p = torch.exp(s - lse[..., None].double()).masked_fill(~allowed, 0.0)
        delta = (ob * dob).sum(-1).t()
        if dlse is not None:
            delta = delta - dlse.double()
        ds = p * (torch.einsum("qhd,khd->hqk", dob, vb) - delta[..., None])
        if t is not None:
            ds = ds * (1 - t * t)
        dq = torch.einsum("hqk,khd->qhd", ds, kb) * softmax_scale
        dk = (torch.einsum("hqk,qhd->khd", ds, qb) * softmax_scale).unflatten(1, (k.shape[1], group)).sum(2)
        dv = torch.einsum("hqk,qhd->khd", p, dob).unflatten(1, (k.shape[1], group)).sum(2)
        return dq.to(q.dtype)[None], dk.to(k.dtype)[None], dv.to(v.dtype)[None]
