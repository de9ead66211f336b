"""attn_implementation="bidiattn" on tiny Gemma-3 / Gemma-4 / PaliGemma models, and `bidiattn verify`."""

from __future__ import annotations

import random
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'bidiattn[hf]')")

import bidiattn  # noqa: E402
import bidiattn.integrations.transformers as bidiattn_hf  # noqa: E402
from bidiattn.tools.cli import main  # noqa: E402
from bidiattn.integrations.tiny import build_tiny, example_inputs, token_type_key  # noqa: E402
from bidiattn.tools.verify import run_verify  # noqa: E402
from test_transformers_conformance import random_token_types  # noqa: E402

FAMILIES = ("gemma3", "gemma4", "paligemma")
T = 40
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def random_inputs(family, rng, batch=3, pad=(0, 0, 0)):
    tt = torch.tensor([random_token_types(family, rng) for _ in range(batch)])
    ids = torch.randint(10, 60, (batch, T), generator=torch.Generator().manual_seed(rng.randrange(10**6)))
    mask = torch.ones(batch, T, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
    return {"input_ids": ids, "attention_mask": mask, token_type_key(family): tt}


def logits(model, impl, inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_rule_reproduces_transformers_eager(family):
    # Blocks are read off transformers' own mask function and re-applied through bidiattn's
    # rules and kernels: with the transformers convention the logits must be eager's.
    model = build_tiny(f"tiny-{family}")
    name = bidiattn_hf.register("bidiattn-test-tf", convention="transformers", backend="reference")
    rng = random.Random(hash(family) % 1000)
    for _ in range(8):
        inputs = random_inputs(family, rng)
        torch.testing.assert_close(logits(model, name, inputs), logits(model, "eager", inputs), atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_official_rule_matches_eager_with_the_dense_official_mask(family, backend):
    model = build_tiny(f"tiny-{family}")
    ours = bidiattn_hf.register(f"bidiattn-test-{backend}", convention="official", backend=backend)
    dense = bidiattn_hf.register("bidiattn-test-dense", convention="official", mode="dense")
    rng = random.Random(7)
    for _ in range(4):
        inputs = random_inputs(family, rng)
        torch.testing.assert_close(logits(model, ours, inputs), logits(model, dense, inputs), atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_conventions_differ_exactly_when_an_image_exceeds_the_window(family):
    # official vs transformers differ only in win_sym vs win_left, i.e. only for blocks longer
    # than the window (6 here).
    model = build_tiny(f"tiny-{family}")
    official = bidiattn_hf.register("bidiattn-test-official", convention="official", backend="reference")
    tf_rule = bidiattn_hf.register("bidiattn-test-tf", convention="transformers", backend="reference")
    short = example_inputs(model, [("text", 5), ("image", 6), ("text", 4), ("image", 3), ("text", 5)])
    long = example_inputs(model, [("text", 5), ("image", 9), ("text", 4), ("image", 3), ("text", 5)])
    assert torch.equal(logits(model, official, short), logits(model, tf_rule, short))
    assert (logits(model, official, long) - logits(model, tf_rule, long)).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_left_padding_equals_eager(family):
    model = build_tiny(f"tiny-{family}")
    name = bidiattn_hf.register("bidiattn-test-tf", convention="transformers", backend="reference")
    inputs = random_inputs(family, random.Random(3), batch=2, pad=(0, 5))
    outs = []
    for impl in ("eager", name):
        model.set_attn_implementation(impl)
        outs.append(model.generate(**inputs, max_new_tokens=8, do_sample=False))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_through_the_triton_kernels_matches_eager_logits(family):
    # bf16 model, triton backend (interpreter on CPU): prefill and every decode step.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_tiny(f"tiny-{family}").to(device, torch.bfloat16)
    name = bidiattn_hf.register("bidiattn-test-tf-triton", convention="transformers", backend="triton")
    inputs = {k: v.to(device) for k, v in random_inputs(family, random.Random(5), batch=2, pad=(0, 3)).items()}
    steps = []
    for impl in ("eager", name):
        model.set_attn_implementation(impl)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        steps.append(torch.stack(out.logits).float())
    assert (steps[0] - steps[1]).abs().max() < 0.1


def test_layers_of_a_kind_share_their_spans_and_plan(monkeypatch):
    # Four layers, two of each kind: one spans build and one launch plan per kind and step,
    # and the shared plan changes no value (against every layer building its own).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_tiny("tiny-gemma3", num_layers=4).to(device, torch.bfloat16)
    name = bidiattn_hf.register("bidiattn-test-triton-shared", backend="triton")
    inputs = {k: v.to(device) for k, v in random_inputs("gemma3", random.Random(3), batch=2, pad=(0, 0)).items()}
    calls = {"build": 0, "plan": 0}

    def counting(fn, what):
        def wrapped(*args, **kwargs):
            calls[what] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(bidiattn_hf.rules, "build", counting(bidiattn_hf.rules.build, "build"))
    # The plan each call keeps on its spans (bidiattn.launch.planned): one per spans object.
    monkeypatch.setattr(bidiattn.launch, "plan", counting(bidiattn.launch.plan, "plan"))
    shared = logits(model, name, inputs)
    assert calls == {"build": 2, "plan": 2}
    with monkeypatch.context() as m:
        m.setattr(bidiattn_hf, "_memo", lambda source, key, build: build())
        calls.update(build=0, plan=0)
        each = logits(model, name, inputs)
        assert calls == {"build": 4, "plan": 4}
    assert torch.equal(shared, each)
    model.set_attn_implementation(name)
    calls.update(build=0, plan=0)
    windows = []
    plan = bidiattn.launch.plan
    monkeypatch.setattr(bidiattn.launch, "plan", lambda spans, *a, **k: windows.append(spans.window) or plan(spans, *a, **k))
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # The prefill and two decode steps, two layer kinds each; a decode step builds the batch's
    # two rows together. Each step's spans tell the plan the window they were cut with
    # (SpanMask.window): the sliding layers' on the prefill's spans and the decode's alike.
    assert calls == {"build": 2 * 3, "plan": 2 * 3}
    sliding = model.config.get_text_config().sliding_window
    assert sorted(windows, key=str) == sorted([sliding, None] * 3, key=str)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_match_eager(family):
    model = build_tiny(f"tiny-{family}").train()
    name = bidiattn_hf.register("bidiattn-test-tf", convention="transformers", backend="reference")
    inputs = random_inputs(family, random.Random(4), batch=2, pad=(0, 5))
    labels = inputs["input_ids"].clone()
    labels[1, :6] = -100  # padding, and the first real token (predicted from a padding row)
    grads = []
    for impl in ("eager", name):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_enable_switches_a_loaded_model():
    model = build_tiny("tiny-gemma3")
    inputs = example_inputs(model, [("text", 4), ("image", 9), ("text", 6)])
    want = logits(model, bidiattn_hf.register("bidiattn-test-dense", convention="official", mode="dense"), inputs)
    bidiattn_hf.enable(model, convention="official", backend="reference")
    assert model.config._attn_implementation == "bidiattn-official-reference"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, atol=2e-5, rtol=0)


def test_prefix_that_is_not_one_run_is_refused():
    model = build_tiny("tiny-paligemma")
    name = bidiattn_hf.register("bidiattn-test-tf", convention="transformers", backend="reference")
    types = torch.tensor([[0] * 5 + [1] * 5 + [0] * 5 + [1] * 5])
    inputs = {"input_ids": torch.randint(10, 60, (1, 20)), "token_type_ids": types}
    with pytest.raises(ValueError, match="not one key interval per row"):
        logits(model, name, inputs)


def test_prepared_masks_and_dropout_are_refused():
    model = build_tiny("tiny-gemma3")
    fn = bidiattn_hf.make_attention_function("official", "reference")
    attn = model.model.language_model.layers[0].self_attn
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(TypeError, match="builds its own masks; got a prepared Tensor"):
        fn(attn, q, q[:, :1], q[:, :1], torch.zeros(1, 1, 4, 4))
    source = bidiattn_hf.SpanSource("gemma3", 0, 0, 4, torch.zeros(1, 4, dtype=torch.int64), torch.tensor([0, 4]),
                                    (0,), 6)
    with pytest.raises(ValueError, match="dropout=0.1"):
        fn(attn, q, q[:, :1], q[:, :1], source, dropout=0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(convention="gemma"), "unknown convention 'gemma'"), (dict(backend="cuda"), "unknown backend 'cuda'"),
     (dict(mode="sparse"), "mode must be 'spans' or 'dense'"), (dict(family="llama"), "unknown family 'llama'")],
)
def test_bad_registration_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bidiattn_hf.register("bidiattn-test-bad", **kwargs)


def test_transformers_version_outside_the_tested_range(monkeypatch):
    # Through sys.modules: transformers may have replaced its lazy module object since collection.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.0")
    with pytest.raises(ImportError, match="tested with transformers >= 5.13, < 6; found 4.57.0"):
        bidiattn_hf.register()


def test_missing_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'bidiattn\[hf\]'"):
        bidiattn_hf.register()


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-gemma4", "tiny-gemma4-e2b", "tiny-paligemma"])
def test_verify_passes_and_reports_differences(model):
    report = run_verify(model)
    assert report.passed, report
    assert {c.label.split(",")[0] for c in report.checks} >= {"reference", "flex"}
    assert {b for b, _ in report.skipped} >= {"triton", "fa4"}  # CPU: named, with a reason
    causal = [c for c in report.differences if "causal" in c.label][0]
    if model == "tiny-gemma4-e2b":
        assert causal.max_abs_logit_diff == 0  # E2B/E4B images are causal in every rule
    else:
        # The default layout has images (longer than the window), so the rules disagree somewhere.
        assert causal.max_abs_logit_diff > 1e-5 and causal.max_kl > 0


def test_verify_runs_pixel_values_through_the_towers(monkeypatch):
    seen = []
    model = build_tiny("tiny-gemma4")
    for tower in ("vision_tower", "audio_tower"):
        cls = type(getattr(model.model, tower))
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _f=forward, _t=tower, **k: seen.append(_t) or _f(self, *a, **k))
    assert run_verify("tiny-gemma4", backends=["reference"]).passed
    assert "vision_tower" in seen and "audio_tower" in seen


def test_verify_loads_a_checkpoint_directory(tmp_path):
    build_tiny("tiny-gemma3").save_pretrained(tmp_path)
    report = run_verify(str(tmp_path), backends=["reference"])
    assert report.family == "gemma3" and report.passed


def test_verify_cli(capsys):
    assert main(["verify", "--model", "tiny-gemma4"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "all checks passed" in out and "official vs causal (images ignored)" in out
    assert "fail above max |dlogit| 0.0001 in float32" in out and "backends not run here:" in out
    assert "Warning" not in captured.err and "Loading" not in captured.err  # no deprecation or progress noise
    assert main(["verify", "--model", "/nonexistent/checkpoint"]) == 2
    # A hub name is not downloaded: a clear error, no retries.
    assert main(["verify", "--model", "google/gemma-3-4b-it"]) == 2
    assert "not download" in capsys.readouterr().err
    assert main(["verify", "--model", "tiny-gemma3", "--layout", "text:3,image:4,text:2"]) == 2
    assert "9 tokens per image" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-gemma4", "tiny-gemma4-e2b", "tiny-paligemma"])
def test_verify_with_the_triton_backend_on_gpu(model):
    report = run_verify(model, dtype=torch.bfloat16, device="cuda")
    assert any(c.label.startswith("triton") for c in report.checks)
    assert report.passed, report


def _source(family, q_offset, kv_offset, block_ids, first_key, window=None):
    bsz, tq = block_ids.shape
    return bidiattn_hf.SpanSource(family, q_offset, kv_offset, q_offset + tq - kv_offset, block_ids,
                                  torch.arange(0, (bsz + 1) * tq, tq), tuple(first_key), window)


@pytest.mark.parametrize("family,convention,layer", [("gemma3", "official", "sliding"), ("gemma4", "transformers", "full"),
                                                     ("paligemma", "official", "sliding")])
def test_extend_bounds_of_a_batch_built_together_equal_the_dense_rule(family, convention, layer):
    # Three batch rows with different padding, new rows holding an image that runs to the
    # step's end in one row and sits inside it in another; the packed build against each
    # row's dense mask.
    ids = torch.zeros(3, 9, dtype=torch.int64)
    ids[0, 4:9] = 1
    ids[2, 1:6] = 2
    source = _source(family, 23, 2, ids, first_key=(2, 7, 3), window=6)
    window = 6 if layer == "sliding" else None
    got = bidiattn_hf._extend_bounds(source, convention, layer, window, 9, "cpu", dense=False)
    want = bidiattn_hf._extend_bounds(source, convention, layer, window, 9, "cpu", dense=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].shape == (3, 9) and bool((got[1] > got[0]).any())


@pytest.mark.parametrize("dense", [False, True])
def test_extend_bounds_name_the_batch_row_whose_keys_the_cache_dropped(dense):
    # Row 1 starts at key 0 and its full layer needs it, but the cache starts at 5.
    source = _source("gemma3", 12, 5, torch.zeros(2, 1, dtype=torch.int64), first_key=(8, 0))
    with pytest.raises(ValueError, match="a query of batch row 1 needs keys this layer's cache no longer holds .kv_offset=5"):
        bidiattn_hf._extend_bounds(source, "official", "full", None, 1, "cpu", dense=dense)
    with pytest.raises(ValueError, match="batch row 0 has new tokens inside its left padding"):
        bidiattn_hf._extend_bounds(_source("gemma3", 12, 0, torch.zeros(1, 3, dtype=torch.int64), first_key=(14,)),
                                   "official", "full", None, 3, "cpu", dense=dense)


def test_span_source_slices_to_its_last_rows_only():
    source = _source("gemma4", 0, 0, torch.zeros(2, 6, dtype=torch.int64), [0, 0])
    kept = source[:, :, -2:, :]
    assert kept.rows == 2 and kept.kept == 2 and kept.q_offset == 0 and kept.layer_masks is not source.layer_masks
    assert source[:, :, 0:, :] is source and kept[:, :, -1:, :].rows == 1
    with pytest.raises(TypeError, match="last query rows"):
        source[:, :, 1:3, :]
    with pytest.raises(TypeError, match=r"\[:, :, -n:, :\]"):
        source[0]
