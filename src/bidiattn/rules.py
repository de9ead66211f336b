"""Per-model mask rules, written once: which keys each query row of a layer may attend.

Notation (positions local to a sequence; ``W`` is the sliding window, a query sees ``W`` keys
including itself): ``c`` = ``k <= q``; ``blk`` = q and k lie in the same bidirectional block;
``win_left`` = ``q - k < W``; ``win_sym`` = ``|q - k| < W``; ``blk'`` = ``blk`` restricted to
blocks of at most ``W`` tokens (vLLM drops longer blocks, on full layers too).

====================  ===================  ==========  ===========================
family                convention           full        sliding
====================  ===================  ==========  ===========================
causal                any                  c           c ∧ win_left
gemma3                official             c ∨ blk     (c ∨ blk) ∧ win_sym
gemma3                transformers         c ∨ blk     (c ∨ blk) ∧ win_left
gemma3                vllm                 c ∨ blk'    (c ∧ win_left) ∨ blk'
gemma4                official             c           (c ∨ blk) ∧ win_sym
gemma4                transformers, vllm   c           (c ∨ blk) ∧ win_left
paligemma             official, trans.     c ∨ blk     (c ∧ win_left) ∨ blk
paligemma             vllm                 c ∨ blk'    (c ∧ win_left) ∨ blk'
====================  ===================  ==========  ===========================

(gemma4 here means the models whose images are bidirectional, 26B-A4B and 31B; E2B/E4B use
``causal``: see :mod:`bidiattn.presets`.) The table's rows live in the family records of
:mod:`bidiattn.families`; this module applies them.

Why every rule is one contiguous interval ``[lo, hi]`` with ``lo``/``hi`` non-decreasing
---------------------------------------------------------------------------------------
Fix a row ``q``. If ``q`` is in a block ``[s, e]`` that the rule honours, then ``s <= q <= e``.

* ``c`` is ``[0, q]``; ``c ∧ win_left`` is ``[max(0, q-W+1), q]``.
* ``c ∨ blk`` is ``[0, q] ∪ [s, e] = [0, e]`` because ``s <= q``: one interval.
* ``(c ∨ blk) ∧ win_left`` intersects ``[0, e]`` with ``(q-W, +inf)``: ``[max(0, q-W+1), e]``.
* ``(c ∨ blk) ∧ win_sym`` intersects ``[0, e]`` with ``(q-W, q+W)``:
  ``[max(0, q-W+1), min(e, q+W-1)]``; it contains ``q`` so it is non-empty.
* ``(c ∧ win_left) ∨ blk`` is ``[q-W+1, q] ∪ [s, e]``; both contain ``q``, so the union is one
  interval: ``[max(0, min(q-W+1, s)), e]``.
* Rows outside an honoured block get the ``c`` / ``c ∧ win_left`` interval.

Monotonicity along a sequence: inside one block ``s`` and ``e`` are constant, and every bound
above is a non-decreasing function of ``q`` for fixed ``s, e``. Across a boundary: the row
before a block (``q = s-1``) has ``hi = s-1 < s <= hi(s)`` and ``lo(s-1) <= s-W <= lo(s)``;
the row after it (``q = e+1``) has ``hi = e+1 > e`` and ``lo(e+1) = max(0, e+2-W)``, which is
``>=`` every block row's ``lo`` (each is ``<= max(0, e-W+1)``). Dropping blocks (``blk'``) only
turns some block rows into plain rows, which the same argument covers. The property tests in
``tests/test_rules.py`` check this against the dense formulas on thousands of random layouts.
"""

from __future__ import annotations

import torch

from .blocks import BlockList
from .families import CONVENTIONS, FAMILIES, LAYERS, Family, Rule
from .families import family as _family
from .spans import SpanMask, _check_cu_seqlens, _first_true, as_int, sequence_index

__all__ = [
    "FAMILIES",
    "CONVENTIONS",
    "LAYERS",
    "Rule",
    "rule_for",
    "build",
    "build_rule",
    "build_from_blocks",
    "dense",
    "block_extents",
    "block_ids_from_mask",
    "block_ids_from_token_types",
]

def rule_for(family: str | Family, convention: str, layer: str) -> Rule:
    """The :class:`Rule` of a (family, convention, layer); the family by name or as a
    :class:`~bidiattn.families.Family` record. ``ValueError`` for unknown names."""
    return _family(family).rule(convention, layer)


def _check_window(rule: Rule, family: str | Family, convention: str, layer: str, window: int | None) -> int | None:
    """The window as a Python int (or None), checked against the rule."""
    if window is not None:
        window = as_int(window, "window")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (a query sees W keys including itself), got {window}")
    if rule.needs_window and window is None:
        why = "sliding layers need one" if layer == "sliding" else "vllm drops blocks longer than the window"
        raise ValueError(f"{_family(family).name}/{convention}/{layer} needs window=W ({why})")
    return window


def _check_block_ids(block_ids: torch.Tensor) -> None:
    if not isinstance(block_ids, torch.Tensor):
        raise TypeError(f"block_ids must be a torch.Tensor, got {type(block_ids).__name__}")
    if block_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"block_ids must be an integer tensor, got {block_ids.dtype}")
    if block_ids.dim() != 1 or block_ids.numel() == 0:
        raise ValueError(f"block_ids must have shape [T] with T >= 1, got {tuple(block_ids.shape)}")


def _validate_block_ids(ids: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Negative ids, blocks crossing sequences, non-contiguous reuse of an id (host sync)."""
    i = _first_true(ids < 0)
    if i is not None:
        raise ValueError(f"block_ids must be >= 0 (0 = ordinary token), got {int(ids[i])} at row {i}")
    seq = sequence_index(cu_seqlens, ids.numel())
    crossing = (ids[1:] > 0) & (ids[1:] == ids[:-1]) & (seq[1:] != seq[:-1])
    i = _first_true(crossing)
    if i is not None:
        raise ValueError(
            f"block id {int(ids[i])} is split across sequences {int(seq[i])} and {int(seq[i + 1])} "
            f"(rows {i} and {i + 1}); a block must lie inside one sequence"
        )
    prev = torch.nn.functional.pad(ids[:-1], (1, 0), value=0)
    run_start = (ids > 0) & (ids != prev)
    start_rows = torch.nonzero(run_start).flatten()
    start_ids = ids[start_rows]
    order = torch.argsort(start_ids, stable=True)
    sorted_ids = start_ids[order]
    dup = _first_true(sorted_ids[1:] == sorted_ids[:-1])
    if dup is not None:
        first, second = int(start_rows[order[dup]]), int(start_rows[order[dup + 1]])
        raise ValueError(
            f"block id {int(sorted_ids[dup])} is reused non-contiguously (runs start at rows {first} and {second}); "
            "give each block its own id"
        )


def block_extents(
    block_ids: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local ``(start, end)`` (inclusive, int64 ``[T]``) of each token's block, and ``in_block``.

    A block is a maximal run of one positive id inside one sequence. For tokens outside any
    block, start/end are the token's own local position. Vectorized, no host sync.
    """
    total = block_ids.numel()
    device = block_ids.device
    ids = block_ids.long()
    seq = sequence_index(cu_seqlens, total)
    seq_start = cu_seqlens[seq]
    seq_end = cu_seqlens[seq + 1] - 1
    rows = torch.arange(total, device=device, dtype=torch.int64)
    in_block = ids > 0
    prev_same = torch.nn.functional.pad(ids[1:] == ids[:-1], (1, 0), value=False) & (rows != seq_start)
    next_same = torch.nn.functional.pad(ids[:-1] == ids[1:], (0, 1), value=False) & (rows != seq_end)
    first = torch.where(in_block & ~prev_same, rows, torch.zeros_like(rows))
    start = torch.cummax(first, 0).values
    flipped = total - 1 - rows
    last = torch.where(in_block & ~next_same, flipped, torch.zeros_like(rows))
    end = total - 1 - torch.cummax(last.flip(0), 0).values.flip(0)
    start = torch.where(in_block, start, rows) - seq_start
    end = torch.where(in_block, end, rows) - seq_start
    return start, end, in_block


def _prepare(
    family: str | Family, convention: str, layer: str, block_ids: torch.Tensor, window: int | None,
    cu_seqlens: torch.Tensor | None, validate: bool,
) -> tuple[Rule, torch.Tensor, int | None]:
    rule = rule_for(family, convention, layer)
    window = _check_window(rule, family, convention, layer, window)
    _check_block_ids(block_ids)
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, block_ids.numel()], dtype=torch.int64, device=block_ids.device)
    _check_cu_seqlens(cu_seqlens, block_ids.numel(), validate)
    if cu_seqlens.device != block_ids.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, block_ids on {block_ids.device}")
    if validate:
        _validate_block_ids(block_ids.long(), cu_seqlens)
    return rule, cu_seqlens, window


def build(
    family: str | Family,
    convention: str,
    layer: str,
    *,
    block_ids: torch.Tensor,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    validate: bool = True,
) -> SpanMask:
    """Spans of one layer type of a model, from its bidirectional blocks.

    Args:
        family: ``"causal"``, ``"gemma3"``, ``"gemma4"``, ``"paligemma"`` or a
            :class:`~bidiattn.families.Family` record.
        convention: ``"official"``, ``"transformers"`` or ``"vllm"`` (see the module table).
        layer: ``"full"`` or ``"sliding"``.
        block_ids: integer ``[T]``; 0 for ordinary tokens, a positive id for tokens of a
            bidirectional block. A block is a maximal run of one id; each id may form only one
            run, inside one sequence (use :func:`block_ids_from_token_types` to make them).
        window: sliding window ``W`` (a query sees ``W`` keys including itself). Required on
            sliding layers and, for the vllm convention of gemma3/paligemma, on full layers too;
            ignored where the rule has no use for it. Any integer type (numpy's too); a bool or
            float raises ``TypeError``.
        cu_seqlens: int64 ``[B+1]`` for packed sequences; ``None`` means one sequence. Empty
            sequences (an engine's padding slots) are allowed and contribute no rows.
        validate: check ``block_ids``/``cu_seqlens`` (host sync on CUDA). With ``False`` the
            build is pure device work with no host sync (CUDA-graph safe); the spans are valid
            by construction for valid inputs.

    Returns:
        A :class:`~bidiattn.SpanMask` with int32 ``lo``/``hi`` on ``block_ids.device``.

    Example (gemma3 official, sliding, W=3, image at 2..5; ``x`` allowed, ``-`` a block key
    cut by the window)::

        q\\k 0123456
        0    x......
        1    xx.....
        2    xxxxx-.     row 2 sees 0..4: block key 5 is cut (|2-5| = 3 = W)
        3    .xxxxx.
        4    ..xxxx.
        5    ...xxx.
        6    ....xxx
    """
    rule, cu_seqlens, window = _prepare(family, convention, layer, block_ids, window, cu_seqlens, validate)
    return build_rule(rule, block_ids=block_ids, window=window, cu_seqlens=cu_seqlens)


def build_rule(
    rule: Rule, *, block_ids: torch.Tensor, window: int | None, cu_seqlens: torch.Tensor
) -> SpanMask:
    """Spans of an explicit :class:`Rule` (inputs already validated, e.g. by :func:`build`).

    The lower layer of :func:`build`, for tools that compare a rule with variants of it
    (the ``bidiattn masks`` CLI builds each rule without its window to find window-cut cells).
    """
    start, end, in_block = block_extents(block_ids, cu_seqlens)
    total = block_ids.numel()
    seq = sequence_index(cu_seqlens, total)
    q = torch.arange(total, device=block_ids.device, dtype=torch.int64) - cu_seqlens[seq]
    lo, hi = _interval(rule, q, start, end, in_block, window)
    return SpanMask(lo, hi, cu_seqlens, validate=False, window=_applied(rule, window))


def build_from_blocks(
    family: str | Family,
    convention: str,
    layer: str,
    *,
    blocks: BlockList,
    cu_seqlens: torch.Tensor,
    total_tokens: int,
    window: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    total_keys: int | None = None,
    validate: bool = True,
) -> SpanMask:
    """Spans of a step (or of whole prompts) from each sequence's block list: one kernel on CUDA.

    What a serving engine calls once per step and shares across the layers of a type: the
    blocks are the requests' image positions (static, fixed-size buffers), the offsets change
    per step. On CUDA this is one Triton launch with no host sync when ``validate=False``
    (CUDA-graph safe): each row binary-searches its sequence and its block. On CPU the same
    intervals come from vectorized PyTorch (:meth:`BlockList.token_extents`).

    Args:
        family, convention, layer, window: as for :func:`build`.
        blocks: a :class:`~bidiattn.blocks.BlockList` of the step's ``B`` sequences, positions
            local to each sequence (a request's whole layout may be passed at every step:
            blocks past the step's keys are never reached).
        cu_seqlens: int64 ``[B+1]``, the step's query rows per sequence (packed).
        total_tokens: ``T``, the number of query rows (an int: sizes the output with no sync).
        cu_seqlens_k, total_keys: extend spans: each sequence's key count (cache + new rows);
            its query rows are the last ``q_len`` of its ``k_len`` keys. ``None``: the rows are
            whole sequences (self-attention).
        validate: host-sync checks of the offsets, of the blocks against the step
            (:meth:`BlockList.check`: sorted, non-overlapping, no block straddling the step's
            first row or its last key) and of the resulting spans.

    Returns:
        A :class:`~bidiattn.SpanMask` (int32 ``lo``/``hi``; extend spans when ``cu_seqlens_k``
        is given). Example, gemma3 full, one sequence of 10 keys with a block at ``[3, 6)``,
        a step over its last 5 rows (keys 0..9)::

            pos  lo hi   keys 0..9
             5    0  5   xxxxxx....   (block row: sees to the block end, 5)
             6    0  6   xxxxxxx...
             7    0  7   xxxxxxxx..
             8    0  8   xxxxxxxxx.
             9    0  9   xxxxxxxxxx
    """
    rule = rule_for(family, convention, layer)
    window = _check_window(rule, family, convention, layer, window)
    if not isinstance(blocks, BlockList):
        raise TypeError(f"blocks must be a bidiattn.blocks.BlockList, got {type(blocks).__name__}")
    total_tokens = as_int(total_tokens, "total_tokens")
    if total_tokens < 1:
        raise ValueError(f"total_tokens must be a positive int, got {total_tokens!r}")
    _check_cu_seqlens(cu_seqlens, total_tokens, validate, total_name="total_tokens")
    if cu_seqlens_k is None:
        if total_keys is not None:
            raise ValueError("total_keys needs cu_seqlens_k (self-attention has total_tokens keys)")
        keys, num_keys = cu_seqlens, total_tokens
    else:
        total_keys = None if total_keys is None else as_int(total_keys, "total_keys")
        if total_keys is None or total_keys < 1:
            raise ValueError(f"total_keys must be a positive int with cu_seqlens_k, got {total_keys!r}")
        _check_cu_seqlens(cu_seqlens_k, total_keys, validate, "cu_seqlens_k", "total_keys")
        if cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(f"cu_seqlens_k has {cu_seqlens_k.numel() - 1} sequences, cu_seqlens {cu_seqlens.numel() - 1}")
        keys, num_keys = cu_seqlens_k, total_keys
    if blocks.num_sequences != cu_seqlens.numel() - 1:
        raise ValueError(f"blocks has {blocks.num_sequences} sequences, cu_seqlens {cu_seqlens.numel() - 1}")
    for name, t in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", keys)):
        if t.device != blocks.device:
            raise ValueError(f"{name} is on {t.device}, blocks on {blocks.device}")
    if validate:
        blocks.check(cu_seqlens, keys)
    if cu_seqlens.device.type == "cuda":
        from .kernels.span_builder import build_spans_triton

        lo, hi = build_spans_triton(rule, blocks, cu_seqlens, keys, total_tokens, window)
    else:
        pos, start, end, in_block = blocks.token_extents(cu_seqlens, keys, total_tokens)
        lo, hi = _interval(rule, pos, start, end, in_block, window)
    if cu_seqlens_k is None:
        return SpanMask(lo, hi, cu_seqlens, validate=validate, window=_applied(rule, window))
    return SpanMask(lo, hi, cu_seqlens, validate=validate, cu_seqlens_k=cu_seqlens_k, total_keys=num_keys,
                    window=_applied(rule, window))


def _applied(rule: Rule, window: int | None) -> int | None:
    """The window a rule cuts rows with (``SpanMask.window``, a hint for the plans)."""
    return None if rule.window == "none" else window


def _interval(rule: Rule, q: torch.Tensor, start: torch.Tensor, end: torch.Tensor, in_block: torch.Tensor,
              window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(lo, hi)`` of rows at positions ``q`` whose block is ``[start, end]`` (inclusive,
    where ``in_block``): the interval formulas of the module doc, the spec of the span kernels."""
    if rule.blocks == "none":
        honoured = torch.zeros_like(in_block)
    elif rule.blocks == "short":
        honoured = in_block & (end - start + 1 <= window)
    else:
        honoured = in_block
    left = (q - window + 1).clamp_min(0) if rule.window != "none" else torch.zeros_like(q)
    plain_hi = q
    if rule.window == "none":
        block_lo, block_hi = torch.zeros_like(q), end
    elif rule.window_scope == "causal":
        block_lo, block_hi = torch.minimum(left, start), end
    elif rule.window == "left":
        block_lo, block_hi = left, end
    else:
        block_lo, block_hi = left, torch.minimum(end, q + window - 1)
    lo = torch.where(honoured, block_lo, left).to(torch.int32)
    hi = torch.where(honoured, block_hi, plain_hi).to(torch.int32)
    return lo, hi


def dense(
    family: str | Family,
    convention: str,
    layer: str,
    *,
    block_ids: torch.Tensor,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rule evaluated literally, pair by pair: bool ``[T, T]`` (the executable spec of :func:`build`).

    O(T^2) memory; for tests, the CLI and small inputs. Same arguments as :func:`build`.
    """
    rule, cu_seqlens, window = _prepare(family, convention, layer, block_ids, window, cu_seqlens, True)
    total = block_ids.numel()
    ids = block_ids.long()
    seq = sequence_index(cu_seqlens, total)
    pos = torch.arange(total, device=ids.device, dtype=torch.int64) - cu_seqlens[seq]
    qq, kk = pos[:, None], pos[None, :]
    same_seq = seq[:, None] == seq[None, :]
    causal = kk <= qq
    blk = (ids[:, None] == ids[None, :]) & (ids[:, None] > 0)
    if rule.blocks == "none":
        blk = torch.zeros_like(blk)
    elif rule.blocks == "short":
        size = torch.bincount(ids, minlength=int(ids.max()) + 1)[ids]
        blk = blk & (size <= window)[:, None]
    if rule.window == "none":
        allowed = causal | blk
    else:
        win = (qq - kk < window) if rule.window == "left" else ((qq - kk).abs() < window)
        allowed = ((causal & win) | blk) if rule.window_scope == "causal" else ((causal | blk) & win)
    return allowed & same_seq


def block_ids_from_mask(is_block: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Block ids (int32 ``[T]``) from a bool mask of block tokens: each maximal run of True
    inside one sequence becomes one block, numbered 1, 2, ... in order. No host sync.
    """
    if not isinstance(is_block, torch.Tensor) or is_block.dtype != torch.bool or is_block.dim() != 1:
        raise TypeError("is_block must be a bool tensor of shape [T]")
    total = is_block.numel()
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, total], dtype=torch.int64, device=is_block.device)
    _check_cu_seqlens(cu_seqlens, total, validate=False)
    rows = torch.arange(total, device=is_block.device, dtype=torch.int64)
    seq_start = cu_seqlens[sequence_index(cu_seqlens, total)]
    prev = torch.nn.functional.pad(is_block[:-1], (1, 0), value=False) & (rows != seq_start)
    new_run = is_block & ~prev
    ids = torch.cumsum(new_run.to(torch.int64), 0)
    return torch.where(is_block, ids, torch.zeros_like(ids)).to(torch.int32)


def _check_token_types(tt: torch.Tensor, family: Family) -> None:
    """``ValueError`` naming the values of ``tt`` that ``family`` does not define (host sync)."""
    defined = family.token_types
    bad = ~torch.isin(tt, torch.tensor(sorted(defined), device=tt.device))
    row = _first_true(bad)
    if row is None:
        return
    values = torch.unique(tt[bad]).tolist()
    shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
    names = ", ".join(f"{v} = {name}" for v, name in defined.items())
    raise ValueError(f"token type{'s' if len(values) > 1 else ''} {shown} (first at row {row}) not defined for "
                     f"family {family.name!r}, which defines {names}")


def block_ids_from_token_types(
    token_type_ids: torch.Tensor,
    *,
    family: str | Family,
    convention: str = "official",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn a model's token-type ids ``[T]`` into ``block_ids`` for :func:`build` (the family's
    token types and block types: :mod:`bidiattn.families`).

    - gemma3: runs of image soft tokens (type 1); adjacent images with no separator form one
      block, as in transformers and the official code.
    - gemma4: runs of image or video soft tokens (types 1 and 2), same merging; audio soft
      tokens (type 3) are ordinary causal tokens, like text (0).
    - paligemma, official/transformers: the whole prefix (type 0: image + BOS + prompt +
      separator) of each sequence is one block; it must be one run at the sequence start.
    - paligemma, vllm: only image tokens are bidirectional, which token types do not tell;
      call :func:`block_ids_from_mask` with the image-token mask instead.
    - causal: no blocks (all zeros); the types are not read.

    A type the family does not define (gemma3: 0, 1; gemma4: 0-3; paligemma: 0, 1) raises
    ``ValueError`` naming it (one host sync). ``cu_seqlens`` may hold empty sequences.
    """
    rule_for(family, convention, "full")
    family = _family(family)
    _check_block_ids(token_type_ids)
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, token_type_ids.numel()], dtype=torch.int64, device=token_type_ids.device)
    tt = token_type_ids.long()
    if not family.token_types:
        return torch.zeros_like(tt, dtype=torch.int32)
    if family.prefix_block:
        if convention == "vllm":
            raise ValueError(
                f"{family.name}/vllm makes only image tokens bidirectional, which token_type_ids cannot tell; "
                "use block_ids_from_mask(input_ids == image_token_id, cu_seqlens)"
            )
        _check_token_types(tt, family)
        ids = block_ids_from_mask(torch.isin(tt, torch.tensor(family.block_types, device=tt.device)), cu_seqlens)
        _check_cu_seqlens(cu_seqlens, tt.numel(), validate=True)
        starts = cu_seqlens[:-1][cu_seqlens[1:] > cu_seqlens[:-1]]
        late = ids.bool() & ~torch.isin(ids, ids[starts])
        bad = _first_true(late)
        if bad is not None:
            raise ValueError(
                f"{family.name} prefix (token type {family.layout_types['prefix']}) must be one run at the start of "
                "each sequence; "
                f"row {bad} is a prefix token after a suffix token"
            )
        return ids
    _check_token_types(tt, family)
    types = torch.tensor(family.block_types, device=tt.device)
    return block_ids_from_mask(torch.isin(tt, types), cu_seqlens)
