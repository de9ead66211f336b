"""Command line (``bidiattn`` or ``python -m bidiattn``): ``bidiattn masks`` shows where the mask
conventions of a model differ; ``bidiattn verify`` runs a model forward pass per backend and
convention; ``bidiattn --version`` prints the installed version."""

from __future__ import annotations

import argparse
import sys

from .. import __version__, rules
from .compare import LayerComparison, compare_layer
from .layouts import parse_layout
from ..presets import PRESETS, get_preset

DEFAULT_PRESET = "gemma-4-31b"
DEFAULT_LAYOUT = "text:40,image:280,text:8,image:280,text:30"
DEFAULT_WINDOW = 128


def _format_table(comp: LayerComparison, layer_count: str) -> str:
    window = f", window {comp.window}" if comp.layer == "sliding" else ""
    header = f"{comp.layer} layers{layer_count}{window}"
    cols = ("convention", "allowed pairs", "differ from official", "(+extra / -missing)", "rows affected")
    lines = [header, f"  {cols[0]:<13} {cols[1]:>14} {cols[2]:>21} {cols[3]:>22} {cols[4]:>14}"]
    for st in comp.stats:
        split = f"+{st.extra_pairs:,} / -{st.missing_pairs:,}"
        lines.append(
            f"  {st.label:<13} {st.allowed_pairs:>14,} {st.differ_pairs:>21,} {split:>22} {st.rows_affected:>14,}"
        )
    return "\n".join(lines)


def _masks(args: argparse.Namespace) -> int:
    if args.png:
        from pathlib import Path

        from .plot import require_matplotlib

        require_matplotlib()
        folder = Path(args.png).resolve().parent
        if not folder.is_dir():
            raise ValueError(f"--png {args.png}: the folder {folder} does not exist")
    preset = get_preset(args.preset) if args.preset else None
    family = args.family or (preset.family if preset else None)
    if family is None:
        raise ValueError("give --preset or --family")
    rules.rule_for(family, "official", "full")
    window = args.window if args.window is not None else (preset.sliding_window if preset else None)
    if window is None:
        raise ValueError("give --window (or a --preset, whose sliding window is used)")
    layout = parse_layout(args.layout)
    layers = ("full", "sliding")
    counts = {layer: "" for layer in layers}
    if preset:
        types = preset.layer_types()
        counts = {layer: f" ({types.count(layer)} of {len(types)})" for layer in layers}
    comparisons = [compare_layer(family, layer, layout, window) for layer in layers]
    blocks = [n for kind, n in layout.segments if kind in ("image", "video")]
    name = f"preset {preset.name} (family {family})" if preset else f"family {family}"
    print(f"bidiattn masks: {name}; {layout.total_tokens} tokens; image/video segments {blocks}; window {window}")
    print("pairs counted exactly from the spans; 'official' is the reference implementation's rule\n")
    for comp in comparisons:
        print(_format_table(comp, counts[comp.layer]))
        print()
    if args.png:
        from .plot import render_png

        title = f"{name}: {layout.describe()}, W={window}"
        render_png(comparisons, args.png, title, pixels=args.pixels)
        print(f"wrote {args.png}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import torch

    from .verify import format_report, run_verify

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    report = run_verify(args.model, layout=args.layout, dtype=dtype, device=args.device, seed=args.seed)
    print(format_report(report))
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bidiattn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bidiattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    masks = sub.add_parser(
        "masks",
        help="compare the mask conventions of a model on a token layout",
        description="Print, per layer type, how each convention's mask differs from the official rule; "
        "optionally draw them side by side.",
    )
    masks.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help=f"model preset (default {DEFAULT_PRESET} unless --family is given)")
    masks.add_argument("--family", choices=rules.FAMILIES, default=None, help="rule family, instead of a preset")
    masks.add_argument("--layout", default=DEFAULT_LAYOUT,
                       help=f"segments kind:count, kinds text/image/video/prefix (default {DEFAULT_LAYOUT!r})")
    masks.add_argument("--window", type=int, default=None,
                       help=f"sliding window W (default: the preset's; {DEFAULT_WINDOW} for the default example)")
    masks.add_argument("--png", default=None,
                       help="write a picture of the masks to this path (needs matplotlib: pip install 'bidiattn[cli]')")
    masks.add_argument("--pixels", type=int, default=512, help="picture resolution per panel side (default 512)")
    masks.set_defaults(func=_masks)
    verify = sub.add_parser(
        "verify",
        help="run a Gemma-family model with bidiattn and compare against eager attention and other conventions",
        description="Forward a multimodal input (text, images with random pixel values through the model's vision "
        "tower, Gemma-4 audio) through a tiny random-weight model or a local checkpoint directory (nothing is "
        "downloaded); print max |logit diff| and per-token KL "
        "of bidiattn against eager attention with the same rule's dense mask (should be ~0; exit status 1 if not) "
        "and between conventions.",
    )
    verify.add_argument("--model", default="tiny-gemma4",
                        help="tiny-gemma3, tiny-gemma4, tiny-gemma4-e2b, tiny-paligemma, or a local checkpoint "
                        "directory (default tiny-gemma4)")
    verify.add_argument("--layout", default=None,
                        help="segments kind:count, kinds text/image/video/audio/prefix; an image has as many tokens "
                        "as the vision tower gives (default: text, three images, Gemma-4: an audio clip)")
    verify.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    verify.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random text tokens")
    verify.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "masks" and args.preset is None and args.family is None:
        args.preset = DEFAULT_PRESET
        if args.window is None and args.layout == DEFAULT_LAYOUT:
            args.window = DEFAULT_WINDOW
    if args.command == "masks" and args.pixels < 16:
        parser.error(f"--pixels must be >= 16, got {args.pixels}")
    try:
        return args.func(args)
    except (ValueError, ImportError) as err:
        print(f"bidiattn: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
