"""PNG of conventions side by side (queries down, keys across). Needs matplotlib (``[cli]`` extra).

Each cell gets one category; when a layout is longer than the picture, a pixel covers a square
of cells and shows the highest-priority category inside it, so a single differing pair stays
visible however long the sequence is.
"""

from __future__ import annotations

import torch

from .. import rules
from .compare import LayerComparison, family_convention
from ..spans import SpanMask

__all__ = ["CATEGORIES", "category_grid", "render_png", "MAX_PNG_TOKENS"]

# (code, label, colour), in increasing display priority.
CATEGORIES = (
    (0, "not attended", "#ffffff"),
    (1, "cut by the window", "#d0d0d0"),
    (2, "causal (k <= q)", "#4c72b0"),
    (3, "bidirectional (k > q)", "#f28e2b"),
    (4, "attended here, not in official", "#d62728"),
    (5, "in official, not attended here", "#000000"),
)
MAX_PNG_TOKENS = 32768
_ROW_CHUNK = 512


def _windowless(label: str, comparison: LayerComparison) -> SpanMask:
    fam, conv = family_convention(label, comparison.family)
    rule = rules.rule_for(fam, conv, comparison.layer).without_window()
    return rules.build_rule(
        rule, block_ids=comparison.layout.block_ids(fam, conv), window=comparison.window,
        cu_seqlens=comparison.official.spans.cu_seqlens,
    )


def category_grid(spans: SpanMask, windowless: SpanMask, official: SpanMask, pixels: int) -> torch.Tensor:
    """uint8 ``[P, P]`` category codes (see :data:`CATEGORIES`), ``P = ceil(T / bin)``, with
    ``bin = ceil(T / pixels)`` cells per pixel side; max-pooled by priority."""
    total = spans.total_tokens
    bin_size = -(-total // pixels)
    side = -(-total // bin_size)
    keys = torch.arange(total)
    grid = torch.zeros(side, side, dtype=torch.uint8)
    chunk = bin_size * max(1, _ROW_CHUNK // bin_size)
    for r0 in range(0, total, chunk):
        rows = torch.arange(r0, min(total, r0 + chunk))

        def inside(m: SpanMask) -> torch.Tensor:
            return (keys[None, :] >= m.lo[rows, None]) & (keys[None, :] <= m.hi[rows, None])

        here, free, ref = inside(spans), inside(windowless), inside(official)
        cat = torch.zeros(len(rows), total, dtype=torch.uint8)
        cat[free & ~here] = 1
        cat[here & (keys[None, :] <= rows[:, None])] = 2
        cat[here & (keys[None, :] > rows[:, None])] = 3
        cat[here & ~ref] = 4
        cat[ref & ~here] = 5
        cat = torch.nn.functional.pad(cat, (0, side * bin_size - total, 0, (-len(rows)) % bin_size))
        pooled = cat.view(-1, bin_size, side, bin_size).amax(dim=(1, 3))
        grid[r0 // bin_size : r0 // bin_size + pooled.shape[0]] = pooled
    return grid


def require_matplotlib() -> None:
    """``ImportError`` naming the install (``pip install 'bidiattn[cli]'``) if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError("bidiattn masks --png needs matplotlib, which is not installed: "
                          "pip install 'bidiattn[cli]'") from err


def render_png(comparisons: list[LayerComparison], path: str, title: str, pixels: int = 512) -> None:
    """Write one row of panels per layer type, one column per convention, with a legend."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    total = comparisons[0].layout.total_tokens
    if total > MAX_PNG_TOKENS:
        raise ValueError(f"--png draws layouts of at most {MAX_PNG_TOKENS} tokens, this one has {total}")
    cmap = ListedColormap([c for _, _, c in CATEGORIES])
    ncols = len(comparisons[0].stats)
    fig, axes = plt.subplots(
        len(comparisons), ncols, figsize=(4.2 * ncols, 4.8 * len(comparisons) + 1.0), squeeze=False,
        layout="constrained",
    )
    for r, comp in enumerate(comparisons):
        for c, st in enumerate(comp.stats):
            grid = category_grid(st.spans, _windowless(st.label, comp), comp.official.spans, pixels)
            ax = axes[r][c]
            ax.imshow(grid.numpy(), cmap=cmap, vmin=0, vmax=len(CATEGORIES) - 1,
                      interpolation="nearest", extent=(0, total, total, 0))
            diff = "" if st.label == "official" else f"\n+{st.extra_pairs:,} / -{st.missing_pairs:,} pairs vs official"
            ax.set_title(f"{st.label} — {comp.layer} layers\n{st.allowed_pairs:,} pairs{diff}", fontsize=9)
            ax.set_xlabel("key position", fontsize=8)
            ax.set_ylabel("query position", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [Patch(facecolor=col, edgecolor="#888888", label=label) for _, label, col in CATEGORIES]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    bin_size = -(-total // pixels)
    scale = f"; 1 pixel = {bin_size}x{bin_size} pairs, highest-priority category shown" if bin_size > 1 else ""
    fig.suptitle(f"{title}{scale}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
