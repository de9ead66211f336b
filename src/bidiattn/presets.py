"""Model presets: the attention geometry of the supported vision-language models.

Each value carries its source. "HF config" means the model's ``config.json`` on the Hugging
Face hub as mirrored by transformers' own defaults and docs; "card" means the model card.
Values we could not check against a primary source here are marked "unverified".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class ModelPreset:
    """Attention geometry of one model.

    - ``family``: the :mod:`bidiattn.rules` family its mask follows (``"causal"`` where images
      are not bidirectional).
    - ``layer_pattern``: layer types of one repeat, in order (``"sliding"`` / ``"full"``);
      ``num_layers`` layers cycle through it.
    - ``sliding_window``: W, keys a query sees on sliding layers, itself included.
    - ``head_dim_sliding`` / ``head_dim_full``: head dims of the two layer types.
    - ``q_heads`` / ``kv_heads_sliding`` / ``kv_heads_full``: attention heads.
    - ``bidirectional_images``: whether image tokens attend each other bidirectionally.
    - ``tokens_per_image``: soft tokens of one image at the default resolution/budget.
    - ``softcap``: attention logit softcap (``None`` when the model has none).
    """

    name: str
    family: str
    num_layers: int
    layer_pattern: tuple[str, ...]
    sliding_window: int
    head_dim_sliding: int
    head_dim_full: int
    q_heads: int
    kv_heads_sliding: int
    kv_heads_full: int
    bidirectional_images: bool
    tokens_per_image: int
    softcap: float | None = None

    def layer_types(self) -> tuple[str, ...]:
        """The type of every layer, ``num_layers`` long."""
        n = len(self.layer_pattern)
        return tuple(self.layer_pattern[i % n] for i in range(self.num_layers))


_GEMMA3_PATTERN = ("sliding",) * 5 + ("full",)  # HF config sliding_window_pattern=6 (5 local : 1 global)
_GEMMA4_PATTERN = ("sliding",) * 5 + ("full",)  # transformers Gemma4TextConfig default pattern 6; card: 5:1
_GEMMA4_E2B_PATTERN = ("sliding",) * 4 + ("full",)  # card/architecture notes: E2B 4:1 (unverified)
_GEMMA2_PATTERN = ("sliding", "full")  # Gemma 2 alternates local/global (HF config, gemma2)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # Gemma 3: HF config.json of google/gemma-3-{4b,12b,27b}-it (text_config): layers, heads,
        # head_dim, sliding_window=1024; mm_tokens_per_image=256; no attention softcap (Gemma 3
        # replaced softcapping by QK-norm, tech report).
        ModelPreset("gemma-3-4b", "gemma3", 34, _GEMMA3_PATTERN, 1024, 256, 256, 8, 4, 4, True, 256),
        ModelPreset("gemma-3-12b", "gemma3", 48, _GEMMA3_PATTERN, 1024, 256, 256, 16, 8, 8, True, 256),
        ModelPreset("gemma-3-27b", "gemma3", 62, _GEMMA3_PATTERN, 1024, 128, 128, 32, 16, 16, True, 256),
        # Gemma 4: transformers 5.23 Gemma4TextConfig (global_head_dim=512 default, sliding head_dim
        # 256); card: sliding window 512 for E2B/E4B, 1024 for 26B-A4B/31B; image token budgets
        # 70..1120, default 280; use_bidirectional_attention="vision" only for 26B-A4B and 31B
        # (E2B/E4B images are causal). Layer counts from the card (E2B 35, E4B 42, 26B-A4B 30,
        # 31B 60). Head counts: architecture notes, unverified against config.json.
        ModelPreset("gemma-4-e2b", "causal", 35, _GEMMA4_E2B_PATTERN, 512, 256, 512, 8, 1, 1, False, 280),
        ModelPreset("gemma-4-e4b", "causal", 42, _GEMMA4_PATTERN, 512, 256, 512, 8, 2, 2, False, 280),
        ModelPreset("gemma-4-26b-a4b", "gemma4", 30, _GEMMA4_PATTERN, 1024, 256, 512, 16, 8, 2, True, 280),
        ModelPreset("gemma-4-31b", "gemma4", 60, _GEMMA4_PATTERN, 1024, 256, 512, 32, 16, 4, True, 280),
        # PaliGemma 2: HF config of google/paligemma2-{3b,10b,28b}-pt-224 (Gemma 2 2B/9B/27B text
        # models): sliding_window=4096, attn_logit_softcapping=50.0; 224px -> 256 image tokens
        # (448px: 1024, 896px: 4096). The prefix (image + prompt) is the bidirectional block.
        ModelPreset("paligemma2-3b", "paligemma", 26, _GEMMA2_PATTERN, 4096, 256, 256, 8, 4, 4, True, 256, 50.0),
        ModelPreset("paligemma2-10b", "paligemma", 42, _GEMMA2_PATTERN, 4096, 256, 256, 16, 8, 8, True, 256, 50.0),
        ModelPreset("paligemma2-28b", "paligemma", 46, _GEMMA2_PATTERN, 4096, 128, 128, 32, 16, 16, True, 256, 50.0),
    )
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
