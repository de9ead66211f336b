"""transformers integration: ``attn_implementation="bidiattn"`` for Gemma-3, Gemma-4 and PaliGemma.

Usage::

    import bidiattn.integrations.transformers as bidiattn_hf

    bidiattn_hf.register()                      # "bidiattn": official rule, backend "auto"
    model = Gemma3ForConditionalGeneration.from_pretrained(path, attn_implementation="bidiattn")
    # or, on a loaded model:  bidiattn_hf.enable(model, convention="official")

How it plugs in (both through transformers' official registries):

* **Mask hook** (``AttentionMaskInterface``): where transformers would build an N x N mask, it
  gets :class:`SpanSource` instead, an O(N) summary read off transformers' own mask function at
  2 N points per batch row: which adjacent query rows share a bidirectional block (``q`` may
  see ``q + 1``), where sequences start (``q`` may not see ``q - 1``: left padding, packed
  sequences) and the first non-padding key. No dense mask is built.
* **Attention function** (``AttentionInterface``): per layer (full or sliding, read from the
  ``sliding_window`` transformers passes), the blocks go through :func:`bidiattn.rules.build`
  with the chosen convention, so the rule applied is bidiattn's (official by default), not
  necessarily the one transformers' mask encodes; then :func:`bidiattn.attention` runs.

Scope and limits: prefill and training run the chosen backend on the packed batch; decode and
cached extend steps (fewer queries than keys) run it on extend spans (queries are the last rows
of each key sequence; ``backend="flex"`` falls back to ``"auto"`` there, FlexAttention taking
self-attention spans only). Spans are built in O(sequence length) on the device once per step
and layer kind and shared by the layers of that kind (``SpanSource.layer_masks``); the first
layer's call plans the launch and keeps the plan on the spans, so the others reuse it. The integration runs on transformers' own cache
(paged caches and split-KV decode are :mod:`bidiattn.serving.kvcache` and :mod:`bidiattn.serving.runner`).
Padding must be left padding. A bidirectional block may not straddle a cache boundary
(transformers' own ``generate`` prefills whole prompts). Sliding windows must be at least 2. Attention dropout is
not supported.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass, field, replace

import torch

from .. import rules
from ..attention import BACKENDS, attention
from ..families import BUILTIN, Family, as_families, family_of_model_type
from ..families import family as family_record
from ..spans import SpanMask, host_to_device

__all__ = [
    "TESTED_VERSIONS",
    "SpanSource",
    "span_source_mask",
    "make_attention_function",
    "register",
    "enable",
]

TESTED_VERSIONS = ("5.13", "6")  # [low, high): the range the tests ran against
_log = logging.getLogger("bidiattn")


def _transformers():
    """Import transformers lazily and check it is in the tested range."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "bidiattn.integrations.transformers needs transformers: pip install 'bidiattn[hf]'"
        ) from e
    from packaging.version import Version

    low, high = TESTED_VERSIONS
    version = Version(transformers.__version__)
    if not (Version(low) <= version < Version(high)):
        raise ImportError(
            f"bidiattn's transformers integration is tested with transformers >= {low}, < {high}; "
            f"found {transformers.__version__}"
        )
    return transformers


def encoder_attention(config, families: tuple[Family, ...] = BUILTIN) -> str | None:
    """The attention implementation an encoder (``config.model_type`` among the families'
    ``encoders``) keeps under a bidiattn name; ``None`` for a model type that is no encoder."""
    model_type = getattr(config, "model_type", None)
    for record in families:
        if model_type in record.encoders:
            return record.encoders[model_type]
    return None


def _encoder_mask(implementation: str, config, **arguments):
    """An encoder's own mask (see :func:`encoder_attention`), from transformers' mask functions."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if arguments.get("mask_function") is None:
        arguments.pop("mask_function", None)
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](config=config, **arguments)


def _encoder_forward(implementation: str, module, query, key, value, attention_mask, **kwargs):
    """An encoder layer's attention through its own implementation (:func:`encoder_attention`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        forward = sys.modules[type(module).__module__].eager_attention_forward
    else:
        forward = ALL_ATTENTION_FUNCTIONS[implementation]
    return forward(module, query, key, value, attention_mask, **kwargs)


@dataclass(frozen=True)
class SpanSource:
    """What the mask hook hands every attention layer instead of a mask (O(B x Tq) data).

    Query rows are absolute positions ``q_offset + i`` (``i < Tq``); the layer's keys are
    positions ``kv_offset + j`` (``j < kv_length``).

    - ``family``: the family record (:mod:`bidiattn.families`) of the text config's ``model_type``.
    - ``block_ids``: int64 ``[B, Tq]``, 0 for ordinary rows, one positive id per bidirectional
      block (rows ``i`` and ``i + 1`` share a block when ``i`` may see ``i + 1``).
    - ``cu_seqlens``: int64 ``[S+1]``, the ``B * Tq`` rows cut into sequences where a row may not
      see the row before it (batch row starts, every left-padding row, packed sequences).
    - ``first_key``: each batch row's first non-padding key (absolute position), on the host.
    - ``sliding_window``: the text config's ``sliding_window`` (vllm's rules drop blocks longer
      than it even on full layers).

    - ``kept``: how many of the ``Tq`` query rows the layers compute, the last ones (``None``: all).
      Gemma-4's K/V-sharing layers slice the mask to the rows whose logits are kept
      (``source[:, :, -n:, :]``); such rows attend as the last rows of their sequences.

    Built once per mask by the hook and shared by every layer that uses the mask.

    - ``layer_masks``: filled by the attention function, per layer kind (rule, window, query
      count): the spans, so a forward builds them once instead of once per layer (two for a
      Gemma-3 model's dozens of layers), and the launch plan :func:`bidiattn.attention` keeps on
      them is shared too. Not used under ``torch.compile``, where every layer builds its own.
    """

    family: Family
    q_offset: int
    kv_offset: int
    kv_length: int
    block_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    first_key: tuple[int, ...]
    sliding_window: int | None
    layer_masks: dict = field(default_factory=dict, compare=False, repr=False)
    kept: int | None = None

    @property
    def rows(self) -> int:
        """Query rows per batch row that the layers compute."""
        return self.block_ids.shape[1] if self.kept is None else self.kept

    def __getitem__(self, index) -> SpanSource:
        """``source[:, :, rows, :]`` with ``rows`` a slice of the last rows (``slice(-n, None)``):
        the same mask for the last ``n`` query rows only (how transformers slices a mask)."""
        if not (isinstance(index, tuple) and len(index) == 4 and isinstance(index[2], slice)
                and all(i == slice(None) for i in (index[0], index[1], index[3]))):
            raise TypeError(f"a SpanSource can only be sliced as [:, :, -n:, :] (its last query rows), got {index!r}")
        start, stop, step = index[2].indices(self.rows)
        if stop != self.rows or step != 1:
            raise TypeError(f"a SpanSource can only keep its last query rows, got rows {index[2]!r}")
        if start == 0:
            return self
        return replace(self, kept=self.rows - start, layer_masks={})


def _as_int(value, name: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"bidiattn needs one {name} for the whole batch, got a tensor of shape {tuple(value.shape)}")
        return int(value)
    return int(value)


def span_source_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    config=None,
    device: torch.device | str = "cpu",
    families: tuple[Family, ...] = BUILTIN,
    **kwargs,
) -> SpanSource:
    """The mask hook (same arguments as transformers' ``sdpa_mask``): a :class:`SpanSource` for a
    language model of ``families`` (the family records); an encoder of theirs gets its own mask
    (see :func:`encoder_attention`)."""
    from transformers.masking_utils import and_masks, causal_mask_function, padding_mask_function, prepare_padding_mask

    model_type = getattr(config, "model_type", None)
    encoder = encoder_attention(config, families)
    if encoder is not None:
        return _encoder_mask(encoder, config, batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                             q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                             attention_mask=attention_mask, device=device, **kwargs)
    record = family_of_model_type(model_type, families)
    if record is None:
        known = sorted(t for f in families for t in f.model_types)
        encoders = sorted(t for f in families for t in f.encoders)
        raise ValueError(
            f"bidiattn has rules for the language models of {[f.name for f in families]} (model_type in {known}) "
            f"and keeps their encoders ({', '.join(encoders)}) on their own attention; got model_type={model_type!r}"
        )
    if getattr(config, "use_bidirectional_attention", None) == "all":
        raise ValueError(
            "bidiattn: this Gemma-4 config has use_bidirectional_attention='all' (every token sees every "
            "token, an encoder-style model); bidiattn's rules are for causal language models with "
            "bidirectional image blocks"
        )
    q_offset, kv_offset = _as_int(q_offset, "q_offset"), _as_int(kv_offset, "kv_offset")
    fn = mask_function if mask_function is not None else causal_mask_function
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        fn = and_masks(fn, padding_mask_function(padding))
    b = torch.arange(batch_size, device=device)[:, None].expand(batch_size, q_length)
    h = torch.zeros_like(b)
    q = (torch.arange(q_length, device=device) + q_offset)[None, :].expand(batch_size, q_length)
    links = torch.zeros(batch_size, q_length, dtype=torch.bool, device=device)
    starts = torch.zeros_like(links)
    starts[:, 0] = True
    if q_length > 1:
        links[:, :-1] = fn(b[:, :-1], h[:, :-1], q[:, :-1], q[:, :-1] + 1)
        starts[:, 1:] = ~fn(b[:, 1:], h[:, 1:], q[:, 1:], q[:, 1:] - 1)
    _check_blocks_are_intervals(fn, links, starts, q_offset)
    block_ids = _block_ids(links, starts)
    flat_starts = starts.flatten()
    cu_seqlens = torch.nn.functional.pad(torch.nonzero(flat_starts).flatten(), (0, 1), value=flat_starts.numel())
    if padding is None:
        first_key = torch.zeros(batch_size, dtype=torch.int64, device=device)
    else:
        used = padding[:, : kv_offset + kv_length].to(device)
        first_key = torch.where(used.any(1), used.int().argmax(1), used.shape[1] - 1).long()
        pos = torch.arange(used.shape[1], device=device)[None, :]
        hole = (pos >= first_key[:, None]) & ~used
        if bool(hole.any()):
            row = int(hole.any(1).int().argmax())
            raise ValueError(
                f"bidiattn supports left padding only: batch row {row} has padding at position "
                f"{int(hole[row].int().argmax())} after its first token {int(first_key[row])}"
            )
    window = getattr(config, "sliding_window", None)
    return SpanSource(record, q_offset, kv_offset, kv_length, block_ids, cu_seqlens,
                      tuple(first_key.tolist()), window)


def _check_blocks_are_intervals(fn, links: torch.Tensor, starts: torch.Tensor, q_offset: int) -> None:
    """Blocks are read off adjacent rows only; a mask where a block's last row also sees the next
    block (one group id over several runs, e.g. PaliGemma type-0 tokens after type-1 ones) is no
    interval per row. Probe that pair for every block (O(blocks), one host sync per batch row)."""
    prev = torch.nn.functional.pad(links[:, :-1], (1, 0)) & ~starts
    in_block = links | prev
    for b in range(links.shape[0]):
        ends = torch.nonzero(in_block[b] & ~links[b]).flatten()
        firsts = torch.nonzero(in_block[b] & ~prev[b]).flatten()
        if ends.numel() < 2:
            continue
        rows, later = ends[:-1] + q_offset, firsts[1:] + q_offset
        bi = torch.full_like(rows, b)
        seen = fn(bi, torch.zeros_like(bi), rows, later)
        if bool(seen.any()):
            i = int(seen.int().argmax())
            raise ValueError(
                f"transformers' mask is not one key interval per row here: batch row {b}, query {int(rows[i])} "
                f"(end of a bidirectional block) sees key {int(later[i])} (start of a later block) across tokens "
                "it does not see; bidiattn cannot represent it (for PaliGemma: the prefix, token type 0, must come "
                "first and be contiguous)"
            )


def _block_ids(links: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Block ids (int64 ``[B, Tq]``, unique over the batch) from the links between adjacent rows."""
    flat = links.flatten()
    prev = torch.nn.functional.pad(flat[:-1], (1, 0)) & ~starts.flatten()
    in_block = flat | prev
    new = in_block & ~prev
    return torch.where(in_block, torch.cumsum(new.long(), 0), 0).view(links.shape)


def _rule_window(source: SpanSource, family: str, convention: str, layer: str, sliding_window: int | None):
    if sliding_window is not None and sliding_window < 2:
        raise ValueError(f"bidiattn's transformers integration needs sliding_window >= 2, got {sliding_window}")
    window = sliding_window if layer == "sliding" else source.sliding_window
    if rules.rule_for(family, convention, layer).needs_window and window is None:
        raise ValueError(f"{family}/{convention}/{layer} needs the model's sliding_window, and the config has none")
    return window


def _memo(source: SpanSource, key: tuple, build):
    """``build()`` once per ``key`` and mask (see ``SpanSource.layer_masks``)."""
    if torch.compiler.is_compiling():
        return build()
    if key not in source.layer_masks:
        source.layer_masks[key] = build()
    return source.layer_masks[key]


def _run(q, k, v, spans, backend, scaling, softcap):
    """:func:`attention` on ``[T, H, D]`` views: the layers of a kind share ``spans``, hence the
    plan the first call keeps on them."""
    return attention(q, k, v, spans, scale=scaling, softcap=softcap, backend=backend)


def _prefill(query, key, value, source, convention, layer, window, backend, scaling, softcap, dense_fn):
    """Tq == Tk, no cache: the batch packed as varlen sequences (``source.cu_seqlens``)."""
    bsz, hq, t, d = query.shape
    ids, cu = source.block_ids.flatten(), source.cu_seqlens
    q, k, v = (x.transpose(1, 2).reshape(bsz * t, x.shape[1], d) for x in (query, key, value))
    if dense_fn is not None:
        mask = rules.dense(source.family, convention, layer, block_ids=ids, window=window, cu_seqlens=cu)
        per_row = torch.stack([mask[i * t : (i + 1) * t, i * t : (i + 1) * t] for i in range(bsz)])
        return dense_fn(per_row)
    memo_key = ("prefill", source.family, convention, layer, window)
    spans = _memo(source, memo_key, lambda: rules.build(source.family, convention, layer, block_ids=ids, window=window,
                                                        cu_seqlens=cu, validate=False))
    out = _run(q, k, v, spans, backend, scaling, softcap)
    return out.view(bsz, t, hq, d)


def _extend_bounds(source, convention, layer, window, tq, device, dense: bool):
    """The new rows' ``(lo, hi)`` as indices into the layer's keys, int64 ``[B, Tq]``: spans built
    on each batch row's full length (cached positions as ordinary tokens), then shifted by the
    padding and the cache offset. The batch rows are built together as packed sequences (one
    rule build and one host check per layer kind and step, whatever the batch size); with
    ``dense`` each row's bounds are read off :func:`rules.dense` instead (the spec path). The
    mask's query rows all carry their block ids; the layer computes the last ``tq`` of them."""
    rows_all = source.block_ids.shape[1]
    lengths = [source.q_offset + rows_all - fk for fk in source.first_key]
    for b, length in enumerate(lengths):
        if length < tq:
            raise ValueError(f"bidiattn: batch row {b} has new tokens inside its left padding")
    # One host-to-device copy: each row's first key, then the packed sequences' offsets.
    host = torch.tensor([*source.first_key, 0, *lengths], dtype=torch.int64)
    bsz = len(lengths)
    host[bsz:] = host[bsz:].cumsum(0)
    meta = host_to_device(host, device)
    shift, cu = meta[:bsz, None] - source.kv_offset, meta[bsz:]
    if dense:
        bounds = []
        for b, length in enumerate(lengths):
            ids = torch.zeros(length, dtype=torch.int64, device=device)
            n = min(length, rows_all)  # the mask's rows may start inside the padding
            ids[-n:] = source.block_ids[b, -n:]
            full = rules.dense(source.family, convention, layer, block_ids=ids, window=window)[-tq:]
            bounds.append((full.int().argmax(1).long(), length - 1 - full.flip(1).int().argmax(1).long()))
        lo, hi = (torch.stack(x) for x in zip(*bounds))
    else:
        # The mask's rows, as positions of the packed sequences; rows inside a batch row's left
        # padding (possible when the layer keeps only the last rows) go to one spare slot.
        at = cu[1:, None] - rows_all + torch.arange(rows_all, device=device)
        ids = torch.zeros(sum(lengths) + 1, dtype=torch.int64, device=device)
        ids[torch.where(at >= cu[:-1, None], at, sum(lengths))] = source.block_ids
        ids = ids[:-1]
        spans = rules.build(source.family, convention, layer, block_ids=ids, window=window, cu_seqlens=cu,
                            validate=False)
        rows = cu[1:, None] - tq + torch.arange(tq, device=device)
        lo, hi = spans.lo[rows].long(), spans.hi[rows].long()
    lo, hi = lo + shift, hi + shift
    short = (lo < 0).any(1)
    if bool(short.any()):
        raise ValueError(
            f"bidiattn: a query of batch row {int(short.int().argmax())} needs keys this layer's cache no longer "
            f"holds (kv_offset={source.kv_offset}); this rule needs a longer cache"
        )
    return lo, hi


def _extend(query, key, value, source, convention, layer, window, backend, scaling, softcap, dense_fn):
    """Fewer queries than keys (decode, cached extend): each batch row's queries are the last
    ``Tq`` of its ``Tk`` keys; extend spans over the packed batch, padding keys excluded by
    ``lo``. A batch of one needs no copy (the kernels take strided views)."""
    bsz, hq, tq, d = query.shape
    tk = key.shape[2]
    if dense_fn is not None:
        lo, hi = _extend_bounds(source, convention, layer, window, tq, query.device, dense=True)
        keys = torch.arange(tk, device=query.device)
        return dense_fn((keys >= lo[..., None]) & (keys <= hi[..., None]))

    def build():
        lo, hi = _extend_bounds(source, convention, layer, window, tq, query.device, dense=False)
        lo, hi = lo.flatten().to(torch.int32), hi.flatten().to(torch.int32)
        cu_q = torch.arange(0, (bsz + 1) * tq, tq, device=query.device, dtype=torch.int64)
        cu_k = torch.arange(0, (bsz + 1) * tk, tk, device=query.device, dtype=torch.int64)
        cut = rules._applied(rules.rule_for(source.family, convention, layer), window)  # rules.build's hint
        return SpanMask(lo, hi, cu_q, validate=False, cu_seqlens_k=cu_k, total_keys=bsz * tk, window=cut)

    memo_key = ("extend", source.family, convention, layer, window, bsz, tq, tk)
    spans = _memo(source, memo_key, build)
    q, k, v = (x.transpose(1, 2).reshape(bsz * x.shape[2], x.shape[1], d) for x in (query, key, value))
    out = _run(q, k, v, spans, backend if backend != "flex" else "auto", scaling, softcap)
    return out.view(bsz, tq, hq, d)


def make_attention_function(convention: str = "official", backend: str = "auto", mode: str = "spans",
                            family: str | Family | None = None, families: tuple[Family, ...] = BUILTIN):
    """An ``AttentionInterface`` function applying ``convention``'s rule.

    ``family`` overrides the rule family read from the model (``"causal"`` gives the
    images-ignored baseline ``bidiattn verify`` reports). ``families``: the family records whose
    encoders keep their own attention (:func:`encoder_attention`).

    ``mode="spans"`` runs :func:`bidiattn.attention` (``backend``); ``mode="dense"`` builds the
    dense mask with :func:`bidiattn.rules.dense` (the pair-by-pair spec) and runs the model's own
    eager attention with it: the independent path ``bidiattn verify`` compares against.
    """
    if convention not in rules.CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {rules.CONVENTIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    if mode not in ("spans", "dense"):
        raise ValueError(f"mode must be 'spans' or 'dense', got {mode!r}")
    if family is not None:
        family = family_record(family)
    announced = set()  # families whose rule this function has logged (once each)

    def bidiattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           sliding_window=None, softcap=None, **kwargs):
        if not isinstance(attention_mask, SpanSource):
            encoder = encoder_attention(getattr(module, "config", None), families)
            if encoder is not None:
                return _encoder_forward(encoder, module, query, key, value, attention_mask, scaling=scaling,
                                        dropout=dropout, sliding_window=sliding_window, softcap=softcap, **kwargs)
            raise TypeError(
                "attn_implementation='bidiattn' builds its own masks; got a prepared "
                f"{type(attention_mask).__name__} instead (do not pass 4D masks with this implementation)"
            )
        if dropout:
            raise ValueError(f"bidiattn does not implement attention dropout, got dropout={dropout}")
        source = attention_mask
        if family is not None:
            source = replace(source, family=family)
        if source.family.name not in announced and mode == "spans":
            announced.add(source.family.name)
            origin = {"official": f"the reference implementation's ({source.family.source})",
                      "transformers": "transformers' own masks (what eager/sdpa compute)", "vllm": "vLLM's"}
            _log.warning("bidiattn: %s language-model layers use the %r rule, %s; encoders keep their own attention. "
                         "eager/sdpa apply transformers' masks: attn_implementation='bidiattn-transformers' matches them",
                         source.family.name, convention, origin[convention])
        layer = "sliding" if sliding_window else "full"
        window = _rule_window(source, source.family, convention, layer, sliding_window)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        bsz, _, tq, _ = query.shape
        tk = key.shape[2]
        if tk != source.kv_length:
            raise ValueError(f"bidiattn: the layer has {tk} keys but its mask was made for {source.kv_length}")
        eager = None
        if mode == "dense":
            eager = sys.modules[type(module).__module__].eager_attention_forward

            def dense_fn(mask):
                bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
                bias = bias.masked_fill(~mask, torch.finfo(query.dtype).min)[:, None]
                return eager(module, query, key, value, bias, scaling=scaling, softcap=softcap)[0]
        else:
            dense_fn = None
        if tq != source.rows:
            raise ValueError(f"bidiattn: the layer has {tq} queries but its mask was made for {source.rows}")
        context = kwargs.get("bidiattn_context")
        if context is not None:
            # Context parallelism: this rank's rows of one long sequence (integrations/context_parallel.py).
            from .context_parallel import context_layer

            if mode != "spans":
                raise ValueError("bidiattn_context runs mode='spans' only")
            return context_layer(context, query, key, value, source.family, convention, layer, window, backend,
                                 scaling, softcap), None
        if tq == tk and source.kept is None and source.q_offset == 0 and source.kv_offset == 0:
            out = _prefill(query, key, value, source, convention, layer, window, backend, scaling, softcap, dense_fn)
        else:
            out = _extend(query, key, value, source, convention, layer, window, backend, scaling, softcap, dense_fn)
        return out, None

    return bidiattn_attention


def register(name: str | None = None, *, convention: str = "official", backend: str = "auto", mode: str = "spans",
             family: str | Family | None = None, families: tuple[Family, ...] = BUILTIN) -> str:
    """Register attention implementations (attention function and mask hook) with transformers;
    arguments as in :func:`make_attention_function`.

    Without ``name``: ``"bidiattn"`` (``convention``, official by default) and one name per
    convention, ``"bidiattn-official"``, ``"bidiattn-transformers"`` (reproduces transformers'
    own masks: the logits of eager/sdpa) and ``"bidiattn-vllm"``, all on ``backend``; returns
    ``"bidiattn"``. With ``name``: that one name. Registering a name again replaces it. Returns
    the name to pass as ``attn_implementation=``. ``families``: the family records the names know
    (default the built-in ones; a model of another family is refused with ``ValueError``).
    """
    tf = _transformers()
    names = {name: convention} if name is not None else {
        "bidiattn": convention, **{f"bidiattn-{c}": c for c in rules.CONVENTIONS}}
    families = as_families(families)
    hook = functools.partial(span_source_mask, families=families)
    for registered, rule in names.items():
        tf.AttentionInterface.register(registered, make_attention_function(rule, backend, mode, family, families))
        tf.AttentionMaskInterface.register(registered, hook)
    return name if name is not None else "bidiattn"


def enable(model, *, convention: str = "official", backend: str = "auto", name: str | None = None):
    """Switch a loaded model's language model to bidiattn (registering ``name``, default
    ``bidiattn-<convention>``, or ``bidiattn-<convention>-<backend>`` for a backend other than
    ``"auto"``); its vision/audio encoders keep their own attention (:func:`encoder_attention`)."""
    default = f"bidiattn-{convention}" if backend == "auto" else f"bidiattn-{convention}-{backend}"
    name = register(name or default, convention=convention, backend=backend)
    model.set_attn_implementation(name)
    return model
