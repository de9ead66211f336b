"""The vLLM backend's pure parts, without vLLM: which rule a served model gets, what is refused
at start-up (naming the value), registration against a fake registry shaped like vLLM's (the
0.26 one, whose names are fixed, and the 0.32+ one, which creates names), and that importing
the integration imports no vLLM."""

from __future__ import annotations

import enum
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bidiattn.integrations import vllm as bidiattn_vllm
from bidiattn.integrations.vllm.config import UNBOUNDED, ModelRule, model_rule_from_vllm, resolve_model, unsupported


@pytest.mark.parametrize("model_type, text_type, bidirectional, family", [
    ("gemma3", "gemma3_text", None, "gemma3"),
    ("gemma3_text", None, None, "gemma3"),
    ("gemma4", "gemma4_text", "vision", "gemma4"),
    ("gemma4", "gemma4_text", None, "causal"),  # E2B/E4B: images causal
    ("paligemma", "gemma2", None, "paligemma"),
    ("gemma2", None, None, "paligemma"),  # text-only Gemma-2: no images, rules reduce to causal
])
def test_model_types_map_to_families(model_type, text_type, bidirectional, family):
    convention = "vllm" if model_type == "paligemma" else "official"
    model = resolve_model(model_type, text_type, sliding_window=512, use_bidirectional_attention=bidirectional,
                          convention=convention)
    assert model.family.name == family and model.convention == convention and model.window == 512


def test_layer_kinds_come_from_the_family_and_the_layer():
    model = resolve_model("gemma4", "gemma4_text", sliding_window=1024, use_bidirectional_attention="vision")
    full, sliding = model.kind(None), model.kind(1024)
    assert (full.layer, full.window, full.rule.blocks) == ("full", None, "none")  # Gemma-4 full layers: causal
    assert (sliding.layer, sliding.window, sliding.rule.window) == ("sliding", 1024, "sym")
    vllm3 = resolve_model("gemma3", sliding_window=1024, convention="vllm")
    assert vllm3.kind(None).window == 1024 and vllm3.kind(None).rule.blocks == "short"  # vLLM drops long images
    assert not vllm3.merges_adjacent and model.merges_adjacent
    # PaliGemma-1's Gemma has no sliding window: vLLM then keeps every image, so nothing is dropped
    pali = resolve_model("paligemma", "gemma", convention="vllm")
    assert pali.window is None and pali.kind(None).window == UNBOUNDED
    with pytest.raises(ValueError, match="sliding_window must be None or a positive int, got 0"):
        model.kind(0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model_type="llama"), r"unknown model family for model_type 'llama'.*BIDIATTN_FAMILY"),
    (dict(model_type="gemma3", convention="eager"), r"unknown rule 'eager'"),
    (dict(model_type="gemma4", use_bidirectional_attention="all"), r"use_bidirectional_attention='all'"),
    (dict(model_type="paligemma", convention="official"), r"paligemma/official makes the whole prompt"),
    (dict(model_type="paligemma", convention="transformers"), r"BIDIATTN_RULE=vllm"),
    (dict(model_type="gemma3", sliding_window=6, mm_tokens_per_image=9), r"images of 9 tokens are longer"),
    (dict(model_type="gemma3", family_name="nope"), r"unknown family 'nope'"),
    (dict(model_type="gemma3", sliding_window=0), r"sliding_window must be a positive int or None, got 0"),
])
def test_refused_models_and_rules_name_the_value(kwargs, match):
    model_type = kwargs.pop("model_type")
    with pytest.raises(ValueError, match=match):
        resolve_model(model_type, **kwargs)


def test_allowed_edge_cases():
    assert resolve_model("gemma3", sliding_window=6, mm_tokens_per_image=9, convention="vllm").family.name == "gemma3"
    assert resolve_model("llama", family_name="causal").family.name == "causal"
    assert resolve_model("gemma3", sliding_window=1024, mm_tokens_per_image=256).convention == "official"


def test_model_rule_from_a_vllm_model_config():
    text = SimpleNamespace(model_type="gemma3_text", sliding_window=1024)
    config = SimpleNamespace(hf_config=SimpleNamespace(model_type="gemma3", mm_tokens_per_image=256),
                             hf_text_config=text)
    model = model_rule_from_vllm(config, environ={})
    assert isinstance(model, ModelRule) and (model.family.name, model.convention, model.window) == ("gemma3",
                                                                                                  "official", 1024)
    assert model_rule_from_vllm(config, environ={"BIDIATTN_RULE": " vllm "}).convention == "vllm"
    assert model_rule_from_vllm(config, environ={"BIDIATTN_FAMILY": "causal"}).family.name == "causal"
    with pytest.raises(ValueError, match="unknown rule 'eager'"):
        model_rule_from_vllm(config, environ={"BIDIATTN_RULE": "eager"})
    assert "rule 'official'" in model.describe()


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_size=72), r"head size 72"),
    (dict(head_size=576), r"head size 576"),
    (dict(dtype=torch.float32), r"dtype torch.float32"),
    (dict(kv_cache_dtype="fp8"), r"kv_cache_dtype 'fp8'.*no fp8"),
    (dict(kv_cache_dtype="fp8_e4m3", dtype=torch.bfloat16), r"kv_cache_dtype 'fp8_e4m3'"),
    (dict(kv_cache_dtype="float16", dtype=torch.bfloat16), r"kv_cache_dtype 'float16' with model dtype"),
    (dict(block_size=8), r"block size 8"),
])
def test_unsupported_configurations_name_the_value(kwargs, match):
    reason = unsupported(**kwargs)
    assert reason is not None and reason.startswith("bidiattn does not support")
    assert __import__("re").search(match, reason), reason


def test_supported_configurations():
    for head_size in (64, 128, 256, 512):
        for dtype in (torch.float16, torch.bfloat16):
            for block_size in (16, 32, 64, 128):
                assert unsupported(head_size=head_size, dtype=dtype, kv_cache_dtype="auto", block_size=block_size) is None
    assert unsupported(dtype=torch.bfloat16, kv_cache_dtype="bfloat16") is None


# ---------------------------------------------------------------------------------------------- registration
def fake_registry(creates_names: bool):
    """An object shaped like ``vllm.v1.attention.backends.registry``: an enum of fixed backend
    names with ``CUSTOM``, ``get_path``/``is_overridden`` per member, ``register_backend``;
    ``creates_names``: the 0.32+ registry, whose ``register_backend`` also takes a new name
    (and whose enum has ``register``)."""
    overrides: dict = {}
    added: dict = {}

    class Backends(enum.Enum):
        FLASH_ATTN = "vllm.FlashAttentionBackend"
        CUSTOM = None

        def get_path(self):
            path = overrides.get(self, self.value)
            if not path:
                raise ValueError(f"Backend {self.name} must be registered before use")
            return path

        def is_overridden(self):
            return self in overrides

    def register_backend(backend, class_path=None):
        if isinstance(backend, str):
            assert creates_names, "vLLM 0.26 takes enum members only"
            if backend in added:
                raise ValueError(f"Backend {backend} already exists")
            added[backend] = Added(backend, class_path)
        else:
            overrides[backend] = class_path

    class Added:  # a member the registry created (hashable, like an enum member)
        def __init__(self, name, path):
            self.name, self.value = name, path

        def get_path(self):
            return overrides.get(self, self.value)

        def is_overridden(self):
            return self in overrides

    class View:
        @property
        def __members__(self):
            return {**Backends.__members__, **added}

    view = View()
    if creates_names:
        view.register = lambda name, value: None
    return SimpleNamespace(AttentionBackendEnum=view, register_backend=register_backend, added=added,
                           Backends=Backends)


def test_register_into_vllm_026_registry_uses_the_custom_slot():
    registry = fake_registry(creates_names=False)
    assert bidiattn_vllm.register(registry) == "CUSTOM"
    assert registry.Backends.CUSTOM.get_path() == bidiattn_vllm.CLASS_PATH
    assert bidiattn_vllm.register(registry) == "CUSTOM"  # plugins load in every process: idempotent
    assert bidiattn_vllm.registered_name(registry) == "CUSTOM"


def test_register_leaves_another_custom_backend_alone(caplog):
    registry = fake_registry(creates_names=False)
    registry.register_backend(registry.Backends.CUSTOM, "someone.Else")
    with caplog.at_level("WARNING", logger="bidiattn"):
        assert bidiattn_vllm.register(registry) is None
    assert "someone.Else" in caplog.text and registry.Backends.CUSTOM.get_path() == "someone.Else"
    assert bidiattn_vllm.registered_name(registry) is None


def test_register_into_a_registry_that_creates_names():
    registry = fake_registry(creates_names=True)
    assert bidiattn_vllm.register(registry) == "BIDIATTN"
    assert registry.added["BIDIATTN"].get_path() == bidiattn_vllm.CLASS_PATH
    assert bidiattn_vllm.register(registry) == "BIDIATTN"  # second call overrides the member, no new name
    assert list(registry.added) == ["BIDIATTN"] and registry.added["BIDIATTN"].is_overridden()
    assert not registry.Backends.CUSTOM.is_overridden()
    assert bidiattn_vllm.registered_name(registry) == "BIDIATTN"


def test_importing_the_integration_imports_no_vllm():
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'vllm' or name.startswith('vllm.'):\n"
            "            raise ImportError('vllm imported: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import bidiattn.integrations.vllm, bidiattn.integrations.vllm.config, bidiattn.integrations.vllm.step\n"
            "assert bidiattn.integrations.vllm.registered_name() is None\n"
            "print('ok', 'triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "False"]  # no Triton either


def test_the_entry_point_names_register():
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group="vllm.general_plugins") if e.name == "bidiattn"]
    if not found:
        pytest.skip("bidiattn is not installed with its entry points (pip install -e .)")
    assert found[0].value == "bidiattn.integrations.vllm:register"
