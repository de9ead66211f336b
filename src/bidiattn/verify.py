"""``bidiattn verify``: a real forward pass through a Gemma-family model, per backend and convention.

Two kinds of rows:

* checks (should be ~0): bidiattn with the official rule against the model's own eager attention
  fed the dense mask of the same rule (:func:`bidiattn.rules.dense`, evaluated pair by pair);
  and bidiattn with the transformers rule against transformers' eager attention with the mask
  transformers builds itself. A check over its tolerance makes the command exit with status 1.
* differences (the practical size of the disagreement): official against the transformers,
  vllm and causal (images ignored) rules, all through bidiattn's reference backend.

Image tokens are placeholders (the model's image token id, token types set), with no pixel
values: the attention mask depends on the token types only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .layouts import parse_layout

__all__ = ["Comparison", "VerifyReport", "default_layout", "run_verify", "format_report"]

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 0.1, torch.float16: 0.02}


@dataclass(frozen=True)
class Comparison:
    """Logit differences of two runs over the same input (real tokens only)."""

    label: str
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    tolerance: float | None  # a check when set; a reported difference when None

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.max_abs_logit_diff <= self.tolerance


@dataclass(frozen=True)
class VerifyReport:
    model: str
    family: str
    layout: str
    window: int | None
    tokens: int
    dtype: str
    device: str
    checks: tuple[Comparison, ...]
    differences: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def default_layout(family: str, window: int | None) -> str:
    """Text and three images, the second one longer than the sliding window (PaliGemma: a prefix
    of two images and prompt text, longer than the window, then the suffix text)."""
    long = (window or 32) + 4
    if family == "paligemma":
        return f"image:4,image:{long},prefix:5,text:16"
    return f"text:5,image:4,text:3,image:{long},text:4,image:3,text:6"


def _compare(label: str, a: torch.Tensor, b: torch.Tensor, tolerance: float | None) -> Comparison:
    la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return Comparison(label, (a - b).abs().max().item(), kl.mean().item(), kl.max().item(), tolerance)


def _load(model: str, dtype: torch.dtype, device: str):
    from .integrations.tiny import TINY_MODELS, build_tiny
    from .integrations.transformers import _transformers

    if model in TINY_MODELS:
        return build_tiny(model).to(device=device, dtype=dtype)
    tf = _transformers()
    errors = []
    for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        try:
            loaded = getattr(tf, auto).from_pretrained(model, torch_dtype=dtype, attn_implementation="eager")
            return loaded.to(device).eval()
        except (ValueError, OSError, KeyError) as e:
            errors.append(f"{auto}: {e}")
    raise ValueError(f"could not load {model!r} as a local checkpoint directory or one of {TINY_MODELS}: " + "; ".join(errors))


def _backends(dtype: torch.dtype, device: str) -> list[str]:
    out = ["reference"]
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        pass
    else:
        # On CUDA the tiny models' head dim (16) has no compiled FlexAttention kernel (inductor
        # finds no valid config, torch 2.11 on an H200); flex is tested at real sizes elsewhere.
        if dtype != torch.float64 and device == "cpu":
            out.append("flex")
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16):
        out.append("triton")
    return out


def run_verify(model: str, layout: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               seed: int = 0, batch: int = 2, backends: list[str] | None = None) -> VerifyReport:
    """Load ``model`` (a tiny model name or a local checkpoint directory) and compare runs.

    Args:
        model: ``tiny-gemma3``, ``tiny-gemma4``, ``tiny-paligemma`` or a ``save_pretrained`` directory.
        layout: ``kind:count,...`` (kinds text/image/video/prefix); default: text and three
            images, one longer than the sliding window (:func:`default_layout`).
        dtype, device: where the model runs (the triton backend needs CUDA and fp16/bf16).
        seed, batch: random text tokens and how many sequences.
        backends: bidiattn backends to check; default every one available here.

    Returns a :class:`VerifyReport`; ``report.passed`` is False when a check exceeds its
    tolerance (per dtype, :data:`TOLERANCE`).
    """
    with warnings.catch_warnings():
        # Eager FlexAttention (CPU) warns that it materializes scores: expected at these sizes.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _run(model, layout, dtype, device, seed, batch, backends)


def _run(model, layout, dtype, device, seed, batch, backends) -> VerifyReport:
    from .integrations import transformers as bidiattn_hf
    from .integrations.tiny import example_inputs, family_of

    net = _load(model, dtype, device)
    family = family_of(net)
    window = getattr(net.config.get_text_config(), "sliding_window", None)
    layout = layout or default_layout(family, window)
    parsed = parse_layout(layout)
    segments = list(parsed.segments)
    inputs = {k: v.to(device) for k, v in example_inputs(net, segments, batch=batch, seed=seed).items()}

    def logits(impl: str) -> torch.Tensor:
        net.set_attn_implementation(impl)
        with torch.no_grad():
            return net(**inputs).logits.float()

    tol = TOLERANCE[dtype]
    eager_transformers = logits("eager")
    dense_official = logits(bidiattn_hf.register("bidiattn-verify-dense", convention="official", mode="dense"))
    checks, runs = [], {}
    for backend in backends or _backends(dtype, device):
        runs[backend] = logits(bidiattn_hf.register(f"bidiattn-verify-{backend}", convention="official", backend=backend))
        checks.append(_compare(f"{backend}, official vs eager + dense official mask", runs[backend], dense_official, tol))
        ours_tf = logits(bidiattn_hf.register(f"bidiattn-verify-{backend}-tf", convention="transformers", backend=backend))
        checks.append(_compare(f"{backend}, transformers rule vs transformers eager", ours_tf, eager_transformers, tol))
    base = runs.get("reference", next(iter(runs.values())))
    differences = []
    for convention, fam in (("transformers", None), ("vllm", None), ("official", "causal")):
        if family == "paligemma" and convention == "vllm":
            continue  # vLLM serves PaliGemma with a rule the token types cannot express (rules docs)
        name = bidiattn_hf.register(f"bidiattn-verify-{fam or convention}", convention=convention, backend="reference",
                                    family=fam)
        label = "official vs " + ("causal (images ignored)" if fam else convention)
        differences.append(_compare(label, base, logits(name), None))
    return VerifyReport(model, family, layout, window, parsed.total_tokens, str(dtype).replace("torch.", ""),
                        device, tuple(checks), tuple(differences))


def format_report(report: VerifyReport) -> str:
    lines = [
        f"bidiattn verify: {report.model} (family {report.family}), {report.tokens} tokens per sequence, "
        f"layout {report.layout}, sliding window {report.window}, {report.dtype} on {report.device}",
        "",
        f"  {'comparison':<58} {'max |dlogit|':>12} {'mean KL':>10} {'max KL':>10}  status",
    ]

    def row(c: Comparison) -> str:
        status = "" if c.tolerance is None else ("ok" if c.passed else f"FAIL (> {c.tolerance:g})")
        return f"  {c.label:<58} {c.max_abs_logit_diff:>12.2e} {c.mean_kl:>10.2e} {c.max_kl:>10.2e}  {status}"

    lines += ["checks (should be ~0):"] + [row(c) for c in report.checks]
    lines += ["", "convention differences (bidiattn reference backend):"] + [row(c) for c in report.differences]
    lines += ["", "all checks passed" if report.passed else "SOME CHECKS FAILED"]
    return "\n".join(lines)
