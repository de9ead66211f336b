"""Real multimodal inputs through the transformers drop-in: tiny models with real vision (and,
for Gemma-4, audio) towers, saved and reloaded with ``attn_implementation="bidiattn..."``,
pixel values and audio features in the processors' formats; forward, generate and training
against eager attention with the same rule."""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'bidiattn[hf]')")

import bidiattn.integrations.transformers as bidiattn_hf  # noqa: E402
from bidiattn.integrations.tiny import TINY_MODELS, build_tiny, example_inputs, tokens_per_image  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def layout(name: str) -> list[tuple[str, int]]:
    """Several images per prompt (longer than the tiny window, 6), audio for Gemma-4."""
    if name == "tiny-paligemma":
        return [("image", 9), ("image", 9), ("prefix", 3), ("text", 5)]
    if name.startswith("tiny-gemma4"):
        return [("text", 3), ("image", 8), ("text", 2), ("audio", 3), ("text", 2), ("image", 3), ("text", 3)]
    return [("text", 3), ("image", 9), ("text", 2), ("image", 9), ("text", 3)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every tiny model saved with ``save_pretrained`` (what a user loads)."""
    root = tmp_path_factory.mktemp("tiny")
    for name in TINY_MODELS:
        build_tiny(name).save_pretrained(root / name)
    return root


def load(saved, name, impl, dtype=torch.float32):
    cls = type(build_tiny(name))
    return cls.from_pretrained(saved / name, attn_implementation=impl, dtype=dtype).eval()


def left_padded(model, name: str, pad: int) -> dict:
    """Two rows with the same images: the second ``pad`` tokens shorter, left-padded."""
    long = example_inputs(model, layout(name) + [("text", pad)], batch=1, pixels=True, seed=1)
    short = example_inputs(model, layout(name), batch=1, pixels=True, seed=2)
    per_token = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
    return {k: torch.cat([long[k], torch.nn.functional.pad(short[k], (pad, 0)) if k in per_token else short[k]])
            for k in long}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_from_pretrained_with_pixels_matches_eager_and_keeps_encoders_on_their_attention(saved, name):
    bidiattn_hf.register(backend="reference")
    inputs = example_inputs(build_tiny(name), layout(name), batch=2, pixels=True)
    eager = load(saved, name, "eager")
    ours = load(saved, name, "bidiattn-transformers")
    with torch.no_grad():
        expected, got = eager(**inputs).logits, ours(**inputs).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    # The towers ran and their output reached the language model: other pixels, other logits.
    other = {k: (torch.rand_like(v) if k in ("pixel_values", "input_features") else v) for k, v in inputs.items()}
    with torch.no_grad():
        assert (ours(**other).logits - got).abs().max() > 1e-4
    # The default name, the official rule, equals eager fed the official rule's dense mask.
    official = load(saved, name, "bidiattn")
    official.set_attn_implementation(bidiattn_hf.register("bidiattn-test-mm-dense", mode="dense"))
    with torch.no_grad():
        dense = official(**inputs).logits
        official.set_attn_implementation("bidiattn")
        torch.testing.assert_close(official(**inputs).logits, dense, atol=2e-5, rtol=0)
    vision = ours.config.vision_config
    assert bidiattn_hf.encoder_attention(vision) == "sdpa"
    if name.startswith("tiny-gemma4"):
        assert bidiattn_hf.encoder_attention(ours.config.audio_config) == "eager"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_official_rule_with_pixels_matches_eager_fed_the_dense_official_mask(saved, name):
    model = build_tiny(name)
    inputs = example_inputs(model, layout(name), batch=2, pixels=True)
    ours = bidiattn_hf.register("bidiattn-test-mm", backend="reference")
    dense = bidiattn_hf.register("bidiattn-test-mm-dense", mode="dense")
    logits = {}
    for impl in (ours, dense, "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(**inputs).logits
    torch.testing.assert_close(logits[ours], logits[dense], atol=2e-5, rtol=0)
    differs = (logits[ours] - logits["eager"]).abs().max()
    if name in ("tiny-gemma3", "tiny-gemma4"):
        assert differs > 1e-4  # images longer than the window: the official rule is not transformers' mask
    else:
        assert differs < 2e-5  # PaliGemma: the same rule; E2B: images causal in both


@pytest.mark.parametrize("name", TINY_MODELS)
def test_enable_generate_left_padded_with_pixels_equals_eager(saved, name):
    # Gemma-4 E2B's K/V-sharing layers slice the prompt's mask to its last row during generate.
    model = build_tiny(name)
    inputs = left_padded(model, name, 3)
    outs = []
    for enable in (False, True):
        if enable:
            bidiattn_hf.enable(model, convention="transformers", backend="reference")
            assert model.config.get_text_config()._attn_implementation == "bidiattn-transformers-reference"
        else:
            model.set_attn_implementation("eager")
        outs.append(model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[1].logits), torch.stack(outs[0].logits), atol=5e-5, rtol=0)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_training_with_pixels_gradients_match_eager(saved, name):
    model = build_tiny(name).train()
    inputs = example_inputs(model, layout(name), batch=2, pixels=True)
    labels = inputs["input_ids"].clone()
    grads = {}
    for impl in ("eager", bidiattn_hf.register("bidiattn-test-mm-train", convention="transformers",
                                               backend="reference")):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    eager, ours = grads.values()
    assert eager.keys() == ours.keys()
    assert any("vision" in n for n in ours)  # the tower is trained through the language model's attention
    for n in eager:
        torch.testing.assert_close(ours[n], eager[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma4", "tiny-paligemma"])
def test_triton_kernels_with_pixels_forward_and_backward(name):
    # bf16 through the Triton kernels (the interpreter on CPU) and bf16 eager, both against the
    # fp32 eager model (same rule): bidiattn's error at most twice eager's own bf16 error.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = example_inputs(build_tiny(name), layout(name), batch=2, pixels=True)
    name_tf = bidiattn_hf.register("bidiattn-test-mm-triton", convention="transformers", backend="triton")

    def run(impl, dtype):
        model = build_tiny(name).to(device, dtype)
        model.set_attn_implementation(impl)
        x = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        logits = model(**x).logits
        logits.float().square().mean().backward()
        return logits.float().detach().cpu(), model.get_input_embeddings().weight.grad.float().cpu()

    ref = run("eager", torch.float32)
    eager, ours = run("eager", torch.bfloat16), run(name_tf, torch.bfloat16)
    for what, r, e, o in zip(("logits", "embedding grad"), ref, eager, ours):
        err, base = (o - r).abs().max(), (e - r).abs().max()
        assert err <= 2 * base + 1e-3 * r.abs().max(), f"{what}: bidiattn {err:.3g}, eager bf16 {base:.3g}"


def test_register_names_one_per_convention_and_logs_the_rule_once(caplog):
    assert bidiattn_hf.register(backend="reference") == "bidiattn"
    registered = transformers.AttentionInterface._global_mapping
    for name in ("bidiattn", "bidiattn-official", "bidiattn-transformers", "bidiattn-vllm"):
        assert name in registered
        assert name in transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    model = build_tiny("tiny-gemma3")
    inputs = example_inputs(model, layout("tiny-gemma3"), batch=1, pixels=True)
    model.set_attn_implementation(bidiattn_hf.register("bidiattn-test-log", backend="reference"))
    with caplog.at_level(logging.WARNING, logger="bidiattn"), torch.no_grad():
        model(**inputs)
        model(**inputs)
    lines = [r.getMessage() for r in caplog.records if r.name == "bidiattn"]
    assert len(lines) == 1 and "'official' rule" in lines[0] and "bidiattn-transformers" in lines[0]


def test_a_prepared_4d_mask_for_the_language_model_is_refused():
    model = build_tiny("tiny-gemma3")
    model.set_attn_implementation(bidiattn_hf.register("bidiattn-test-4d", backend="reference"))
    inputs = example_inputs(model, layout("tiny-gemma3"), batch=1)
    t = inputs["input_ids"].shape[1]
    mask = torch.tril(torch.ones(1, 1, t, t, dtype=torch.bool))
    with pytest.raises(TypeError, match="builds its own masks"), torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=mask, token_type_ids=inputs["token_type_ids"])


def test_example_inputs_refuse_images_the_tower_cannot_give():
    model = build_tiny("tiny-gemma3")
    assert tokens_per_image(model) == 9
    with pytest.raises(ValueError, match="9 tokens per image"):
        example_inputs(model, [("text", 2), ("image", 4)], pixels=True)
    with pytest.raises(ValueError, match="no 'audio' input"):
        example_inputs(model, [("text", 2), ("audio", 4)])
