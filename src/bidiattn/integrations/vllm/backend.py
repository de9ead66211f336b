"""The vLLM attention backend: backend class, metadata builder and impl. Imports vLLM.

vLLM imports this module by the class path :func:`bidiattn.integrations.vllm.register` gives
its registry; the work itself is in :mod:`.step` and :mod:`.config` (no vLLM there).
Interfaces read in vLLM 0.26.0 (``vllm/v1/attention/backend.py``,
``vllm/v1/attention/backends/registry.py``, ``vllm/v1/worker/gpu_model_runner.py``) and
checked against 0.27, 0.30, 0.31, 0.32, 0.33 and 0.34 (the registry and the backend base class;
the classes themselves tested on CPU against 0.26.0 and 0.34.0):

- the cache: per layer one buffer, logical ``[num_blocks, Hkv, block_size, 2 * D]``; this
  backend asks for NHD memory order (0.26/0.27: ``get_kv_cache_shape`` and
  ``get_kv_cache_stride_order``; 0.30+: ``supported_kv_cache_layouts``) and reads K and V as its
  two interleaved halves;
- the KV write: vLLM calls :meth:`BidiattnImpl.do_kv_cache_update` before ``forward``
  (``forward_includes_kv_cache_update = False``), which runs vLLM's own
  ``reshape_and_cache_flash`` (padding slots are negative and skipped);
- CUDA graphs: full graphs for decode-only batches (``UNIFORM_SINGLE_TOKEN_DECODE``),
  piecewise (attention eager) for the rest: the builder rewrites persistent buffers and the
  spans and launch plans are made inside the forward pass, so a captured decode step rebuilds
  them on replay.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from . import NAME, registered_name
from .config import (
    BLOCK_SIZES, DTYPES, KV_CACHE_DTYPES, LayerKind, ModelRule, model_rule_from_vllm, supports_head_size, unsupported,
)
from .step import StepBuilder, StepMetadata, attend, kv_views, write_kv

__all__ = ["BidiattnBackend", "BidiattnMetadataBuilder", "BidiattnImpl"]

_log = logging.getLogger("bidiattn")


class BidiattnBackend(AttentionBackend):
    """bidiattn's span kernels as a vLLM attention backend (see the module doc)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = list(DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # vLLM looks the backend up as AttentionBackendEnum[get_name()]: "BIDIATTN" where the
        # registry takes new names (vLLM >= 0.32), else the CUSTOM slot it was registered in.
        return registered_name() or NAME

    @staticmethod
    def get_impl_cls() -> type[BidiattnImpl]:
        return BidiattnImpl

    @staticmethod
    def get_builder_cls() -> type[BidiattnMetadataBuilder]:
        return BidiattnMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int]:
        return list(BLOCK_SIZES)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # vLLM <= 0.27 asks; K and V packed in the last dim, as vLLM's own backends do.
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # NHD: [num_blocks, block_size, Hkv, 2 * D] in memory. No cross-layer layout: the
        # kernels read key n of a sequence as row page * block_size + slot of one flat view.
        if include_num_layers_dimension:
            raise NotImplementedError("bidiattn reads one KV buffer per layer")
        return (0, 2, 1, 3)

    @classmethod
    def get_required_kv_cache_layout(cls):
        return "NHD"

    @classmethod
    def supported_kv_cache_layouts(cls):
        from vllm.v1.kv_cache_layout import KVCacheLayout  # vLLM >= 0.30

        return (KVCacheLayout.LBNHC,)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return supports_head_size(head_size)

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
                             use_mm_prefix, device_capability) -> str | None:
        # vLLM lists its own reasons ("head_size not supported"); this one names the values.
        return unsupported(head_size=head_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size)


def _bidiattn_layers(vllm_config) -> dict:
    """The engine's attention layers that run bidiattn, by name."""
    context = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    return {name: layer for name, layer in context.items() if isinstance(getattr(layer, "impl", None), BidiattnImpl)}


class BidiattnMetadataBuilder(AttentionMetadataBuilder[StepMetadata]):
    """Per KV-cache group: the served model's rule and the engine's
    :class:`~bidiattn.integrations.vllm.step.StepBuilder`, whose buffers every step rewrites.

    vLLM makes one builder per KV-cache group (six for Gemma-4-31B's 5:1 layer pattern), all fed
    the same request layout each step; they share one ``StepBuilder`` (kept on the impl of the
    engine's first bidiattn layer, so it lives and dies with the engine), which builds a step
    once for all of them; a group whose KV-cache spec an earlier group of the step shares gets
    that group's metadata with its own block table (:meth:`update_block_table`, vLLM's hook). With
    dual-batch overlap (one builder per micro-batch) each builder keeps its own and builds."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    # vLLM then calls update_block_table, not build, for a KV-cache group whose spec an earlier
    # group of the step shares (Gemma-4-31B: the five sliding groups); off under dual-batch
    # overlap, where vLLM's cache of built metadata does not tell the micro-batches apart.
    supports_update_block_table: bool = True

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        model = model_rule_from_vllm(vllm_config.model_config)
        layers = _bidiattn_layers(vllm_config)
        kinds = {layers[name].impl.kind_of(model) for name in layer_names if name in layers}
        engine_kinds = {layer.impl.kind_of(model) for layer in layers.values()}
        sched = vllm_config.scheduler_config
        sizes = dict(max_seqs=max(sched.max_num_seqs, sched.max_num_batched_tokens),
                     max_tokens=sched.max_num_batched_tokens, max_model_len=vllm_config.model_config.max_model_len)
        dbo = getattr(getattr(vllm_config, "parallel_config", None), "enable_dbo", False)
        if layers and not dbo:
            shared = layers[min(layers)].impl.shared_steps
            key = (model, torch.device(device), tuple(sorted(sizes.items())))
            step = shared.get(key)
            if step is None:
                step = shared[key] = StepBuilder.allocate(model, tuple(engine_kinds), **sizes, device=device)
        else:
            step = StepBuilder.allocate(model, tuple(kinds), **sizes, device=device)
        self.step = step
        self.supports_update_block_table = not dbo
        _log.warning("%s; layers %s", model.describe(),
                     ", ".join(f"{k.layer} (window {k.window})" for k in sorted(kinds, key=lambda k: k.layer)) or "?")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> StepMetadata:
        cm = common_attn_metadata
        seq_lens_cpu = getattr(cm, "seq_lens_cpu_upper_bound", None)
        if seq_lens_cpu is None:
            seq_lens_cpu = getattr(cm, "_seq_lens_cpu", None)
        return self.step.build(num_reqs=cm.num_reqs, num_tokens=cm.num_actual_tokens,
                               query_start_loc=cm.query_start_loc, seq_lens=cm.seq_lens,
                               query_start_loc_cpu=cm.query_start_loc_cpu, seq_lens_cpu=seq_lens_cpu,
                               ranges=cm.mm_req_doc_ranges, block_table=cm.block_table_tensor,
                               slot_mapping=cm.slot_mapping)

    def update_block_table(self, metadata: StepMetadata, blk_table: torch.Tensor,
                           slot_mapping: torch.Tensor) -> StepMetadata:
        """Another KV-cache group's metadata for the step ``metadata`` was built for: its block
        table and slot mapping, the step's layout and prepared spans and plans."""
        return metadata.for_group(blk_table, slot_mapping)


class BidiattnImpl(AttentionImpl):
    """One attention layer: the KV write (vLLM's op) and the span kernel over the cache.

    Refused at construction (start-up), each naming the value: head sizes, dtypes and cache
    dtypes the kernels do not take, ALiBi, attention sinks, non-decoder attention, decode
    context parallelism, and any model or rule :func:`.config.resolve_model` refuses.
    """

    supports_dcp: bool = False
    supports_pcp: bool = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.softcap = float(logits_soft_cap) if logits_soft_cap else None
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self._kinds: dict[ModelRule, LayerKind] = {}
        # The engine's shared StepBuilder(s), where this is its first bidiattn layer (see
        # BidiattnMetadataBuilder).
        self.shared_steps: dict = {}
        dtype = torch.get_default_dtype()  # vLLM builds layers under the model dtype
        problems = [unsupported(head_size=head_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype)]
        if alibi_slopes is not None:
            problems.append("bidiattn does not support ALiBi slopes")
        if extra.get("sinks") is not None:
            problems.append("bidiattn does not support attention sinks")
        if attn_type != AttentionType.DECODER:
            problems.append(f"bidiattn does not support attention type {attn_type!r} (decoder layers only)")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"bidiattn needs num_heads ({num_heads}) to be a multiple of num_kv_heads ({num_kv_heads})")
        if getattr(self, "dcp_world_size", 1) > 1:
            problems.append(f"bidiattn does not support decode context parallelism (size {self.dcp_world_size})")
        problems = [p for p in problems if p]
        if problems:
            raise ValueError("; ".join(problems))
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        if config is not None and getattr(config, "model_config", None) is not None:
            self.kind_of(model_rule_from_vllm(config.model_config))  # refuses unknown models at start-up

    def kind_of(self, model: ModelRule) -> LayerKind:
        """This layer's :class:`~bidiattn.integrations.vllm.config.LayerKind` under ``model``."""
        kind = self._kinds.get(model)
        if kind is None:
            kind = self._kinds[model] = model.kind(self.window)
        return kind

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: StepMetadata | None, output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("bidiattn does not fuse output quantization")
        if attn_metadata is None:  # vLLM's profiling run
            return output.fill_(0)
        t = attn_metadata.num_actual_tokens
        attend(query[:t], kv_cache, attn_metadata, self.kind_of(attn_metadata.model), scale=self.scale,
               softcap=self.softcap, out=output[:t])
        return output

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if kv_cache.device.type != "cuda":
            write_kv(key, value, kv_cache, slot_mapping)
            return
        from vllm import _custom_ops as ops

        kv_views(kv_cache, self.head_size)  # the layout check
        # [num_blocks, block_size, Hkv, D] views of the two halves; the op reads their strides.
        k, v = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        ops.reshape_and_cache_flash(key, value, k, v, slot_mapping, self.kv_cache_dtype, layer._k_scale,
                                    layer._v_scale)
