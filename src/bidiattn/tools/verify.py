"""``bidiattn verify``: a real forward pass through a Gemma-family model, per backend and convention.

Two kinds of rows:

* checks (should be ~0): bidiattn with the official rule against the model's own eager attention
  fed the dense mask of the same rule (:func:`bidiattn.rules.dense`, evaluated pair by pair);
  and bidiattn with the transformers rule against transformers' eager attention with the mask
  transformers builds itself. A check over its tolerance makes the command exit with status 1.
* differences (the practical size of the disagreement): official against the transformers,
  vllm and causal (images ignored) rules, all through bidiattn's reference backend.

Inputs are what the model's processor would give: token ids with image (audio) placeholders,
token types, and random pixel values (audio features) that run through the model's own vision
(audio) tower, which keeps its own attention under bidiattn. Nothing is downloaded: ``model``
is a tiny random-weight model or a local checkpoint directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass

import torch

from ..families import BUILTIN, Family, as_families
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
    skipped: tuple[tuple[str, str], ...] = ()  # (backend, why it did not run)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def default_layout(model, families: tuple[Family, ...] = BUILTIN) -> str:
    """The family record's ``verify_layout``: text and three images (one longer than the
    sliding window where the vision tower's image size allows), an audio clip where the model
    has an audio tower; PaliGemma: a prefix of two images and prompt text, then the suffix."""
    from ..integrations.tiny import family_of, tokens_per_image

    window = getattr(model.config.get_text_config(), "sliding_window", None)
    fixed = tokens_per_image(model)
    image, long = (fixed, fixed) if fixed is not None else (4, (window or 32) + 4)
    audio = "audio:3,text:2," if getattr(model.config, "audio_config", None) is not None else ""
    return family_of(model, families).verify_layout.format(image=image, long=long, audio=audio)


def _compare(label: str, a: torch.Tensor, b: torch.Tensor, tolerance: float | None) -> Comparison:
    la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return Comparison(label, (a - b).abs().max().item(), kl.mean().item(), kl.max().item(), tolerance)


def _load(model: str, dtype: torch.dtype, device: str, families: tuple[Family, ...]):
    from ..integrations.tiny import build_tiny, tiny_names
    from ..integrations.transformers import _transformers

    tiny = tiny_names(families)
    if model in tiny:
        return build_tiny(model, families=families).to(device=device, dtype=dtype)
    if not os.path.isdir(model):
        raise ValueError(f"--model {model!r} is neither a tiny model ({', '.join(tiny)}) nor a local "
                         "checkpoint directory (bidiattn verify does not download; save_pretrained a model first)")
    tf = _transformers()
    errors = []
    for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        try:
            loaded = getattr(tf, auto).from_pretrained(model, dtype=dtype, attn_implementation="eager",
                                                       local_files_only=True)
            return loaded.to(device).eval()
        except (ValueError, OSError, KeyError) as e:
            errors.append(f"{auto}: {e}")
    raise ValueError(f"could not load {model!r} as a Gemma-3, Gemma-4 or PaliGemma checkpoint: " + "; ".join(errors))


def _backends(dtype: torch.dtype, device: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The backends that run here, and each other backend with the reason it does not."""
    out, skipped = ["reference"], []
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        skipped.append(("flex", "this torch has no FlexAttention"))
    else:
        if device == "cpu":
            out.append("flex")
        else:
            skipped.append(("flex", "the tiny models' head dim (16) has no compiled FlexAttention kernel on CUDA; "
                                    "flex is tested at real sizes in the test suite"))
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16):
        out.append("triton")
    else:
        skipped.append(("triton", "needs --device cuda and --dtype bfloat16/float16 (on CPU the kernels run only "
                                  "through Triton's interpreter, in the test suite)"))
    skipped.append(("fa4", "not part of verify: FA4 needs head dims 64-256 on an SM90/SM100 GPU; tested in the "
                           "GPU test suite"))
    return out, skipped


@contextlib.contextmanager
def _quiet():
    """No progress bars, deprecation warnings or the integration's one-line rule notice (the
    report states the rules) while verify runs."""
    from transformers.utils import logging as tf_logging

    ours = logging.getLogger("bidiattn")
    level, tf_level, bars = ours.level, tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    ours.setLevel(logging.ERROR)
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # Eager FlexAttention (CPU) warns that it materializes scores: expected at these sizes.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            yield
    finally:
        ours.setLevel(level)
        tf_logging.set_verbosity(tf_level)
        if bars:
            tf_logging.enable_progress_bar()


def run_verify(model: str, layout: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               seed: int = 0, batch: int = 2, backends: list[str] | None = None,
               families: tuple[Family, ...] = BUILTIN) -> VerifyReport:
    """Load ``model`` (a tiny model name or a local checkpoint directory) and compare runs.

    Args:
        model: a tiny model (:data:`bidiattn.integrations.tiny.TINY_MODELS`) or a local
            ``save_pretrained`` directory.
        layout: ``kind:count,...`` (kinds text/image/video/audio/prefix; an image has the token
            count its vision tower gives); default: :func:`default_layout`.
        dtype, device: where the model runs (the triton backend needs CUDA and fp16/bf16).
        seed, batch: random text tokens and how many sequences.
        backends: bidiattn backends to check; default every one available here.
        families: the family records that know the model (default the built-in ones).

    Returns a :class:`VerifyReport`; ``report.passed`` is False when a check exceeds its
    tolerance (per dtype, :data:`TOLERANCE`).
    """
    from ..integrations.transformers import _transformers

    _transformers()
    with _quiet():
        return _run(model, layout, dtype, device, seed, batch, backends, as_families(families))


def _run(model, layout, dtype, device, seed, batch, backends, families) -> VerifyReport:
    from ..integrations import transformers as bidiattn_hf
    from ..integrations.tiny import example_inputs, family_of

    net = _load(model, dtype, device, families)
    family = family_of(net, families)
    window = getattr(net.config.get_text_config(), "sliding_window", None)
    layout = layout or default_layout(net, families)
    parsed = parse_layout(layout)
    segments = list(parsed.segments)
    inputs = example_inputs(net, segments, batch=batch, seed=seed, pixels=True, families=families)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    available, skipped = _backends(dtype, device)
    if backends is not None:
        skipped = [(b, "not requested") for b in available if b not in backends]

    def logits(impl: str) -> torch.Tensor:
        net.set_attn_implementation(impl)
        with torch.no_grad():
            return net(**inputs).logits.float()

    tol = TOLERANCE[dtype]
    eager_transformers = logits("eager")
    def register(name, **kwargs):
        return bidiattn_hf.register(name, families=families, **kwargs)

    dense_official = logits(register("bidiattn-verify-dense", convention="official", mode="dense"))
    checks, runs = [], {}
    for backend in backends or available:
        runs[backend] = logits(register(f"bidiattn-verify-{backend}", convention="official", backend=backend))
        checks.append(_compare(f"{backend}, official vs eager + dense official mask", runs[backend], dense_official, tol))
        ours_tf = logits(register(f"bidiattn-verify-{backend}-tf", convention="transformers", backend=backend))
        checks.append(_compare(f"{backend}, transformers rule vs transformers eager", ours_tf, eager_transformers, tol))
    base = runs.get("reference", next(iter(runs.values())))
    differences = []
    for convention, fam in (("transformers", None), ("vllm", None), ("official", "causal")):
        if family.prefix_block and convention == "vllm":
            continue  # vLLM serves PaliGemma with a rule the token types cannot express (rules docs)
        name = register(f"bidiattn-verify-{fam or convention}", convention=convention, backend="reference", family=fam)
        label = "official vs " + ("causal (images ignored)" if fam else convention)
        differences.append(_compare(label, base, logits(name), None))
    return VerifyReport(model, family.name, layout, window, parsed.total_tokens, str(dtype).replace("torch.", ""),
                        device, tuple(checks), tuple(differences), tuple(skipped))


def format_report(report: VerifyReport) -> str:
    lines = [
        f"bidiattn verify: {report.model} (family {report.family}), {report.tokens} tokens per sequence, "
        f"layout {report.layout}, sliding window {report.window}, {report.dtype} on {report.device}; "
        "real pixel values (and audio features) through the model's own towers",
        "",
    ]
    header = f"  {'comparison':<58} {'max |dlogit|':>12} {'mean KL':>10} {'max KL':>10}  status"

    def row(c: Comparison) -> str:
        status = "" if c.tolerance is None else ("ok" if c.passed else f"FAIL (> {c.tolerance:g})")
        return f"  {c.label:<58} {c.max_abs_logit_diff:>12.2e} {c.mean_kl:>10.2e} {c.max_kl:>10.2e}  {status}"

    tolerance = next((c.tolerance for c in report.checks), None)
    lines += [f"checks: the same rule two ways, should be ~0 (fail above max |dlogit| {tolerance:g} in "
              f"{report.dtype}: rounding differences of the attention, nothing more):"]
    lines += [header] + [row(c) for c in report.checks]
    lines += ["", "convention differences: how much the rules disagree on this input (not errors; 0 where the",
              "layout has nothing they treat differently, e.g. no image longer than the window):"]
    lines += [header] + [row(c) for c in report.differences]
    if report.skipped:
        lines += ["", "backends not run here:"] + [f"  {b}: {why}" for b, why in report.skipped]
    lines += ["", "all checks passed" if report.passed else "SOME CHECKS FAILED"]
    return "\n".join(lines)
