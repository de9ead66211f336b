"""The random-weight checkpoints ``benchmarks/vllm_backend.py`` serves through vLLM, checked
without vLLM: the Gemma-4 geometry (sliding and full layers of different head dims, K = V on
the full layers, images bidirectional), the ``hf_overrides`` that let vLLM 0.26 read that
geometry from transformers' per-layer config, and the prompts' image placeholders; each model
runs through transformers with bidiattn (CPU: the reference backend).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vllm_backend.py"


@pytest.fixture(scope="module")
def vb():
    spec = importlib.util.spec_from_file_location("vllm_backend_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemma4_text_checkpoint_has_both_head_dims_and_k_eq_v(vb, tmp_path):
    from safetensors.torch import load_file

    geo = vb.GEMMA4_GEOMETRY["tiny-gemma4"]
    path = vb.write_model(tmp_path / "m", "tiny-gemma4", images=False)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForCausalLM"]
    assert config["use_bidirectional_attention"] == "vision"
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    weights = load_file(path / "model.safetensors")
    sliding, full = "model.layers.0.self_attn.", "model.layers.1.self_attn."
    assert weights[sliding + "k_proj.weight"].shape[0] == geo["num_key_value_heads"] * geo["head_dim"]
    assert sliding + "v_proj.weight" in weights
    assert weights[full + "k_proj.weight"].shape[0] == geo["num_global_key_value_heads"] * geo["global_head_dim"]
    assert weights[full + "q_proj.weight"].shape[0] == geo["num_attention_heads"] * geo["global_head_dim"]
    assert full + "v_proj.weight" not in weights  # K = V on full layers

    reqs = vb.requests("tiny-gemma4", False, [5, 40])
    got = vb.transformers_worker(dict(model=str(path), requests=reqs, images=False, rule="official", max_tokens=2))
    assert [len(r["steps"]) for r in got["requests"]] == [2, 2]
    assert all(lp is not None and lp <= 0 for r in got["requests"] for lp in r["prompt_logprobs"][1:])


@pytest.mark.parametrize("images", [False, True])
def test_overrides_give_vllm_the_attributes_it_reads(vb, images):
    """vLLM 0.26 reads these four attributes of the text config; transformers' per-layer config
    hides them unless the overrides are applied (as vLLM applies ``hf_overrides``)."""
    import transformers

    geo = vb.GEMMA4_GEOMETRY["tiny-gemma4"]
    text = dict(geo, use_bidirectional_attention="vision", hidden_size_per_layer_input=0)
    config = (transformers.Gemma4Config(text_config=text, audio_config=None) if images
              else transformers.Gemma4TextConfig(**text))
    overrides = vb.vllm_overrides("tiny-gemma4", images)
    if images:
        config.text_config.update(overrides["text_config"])
    else:
        config.update(overrides)
    text_config = config.get_text_config()
    assert getattr(text_config, "global_head_dim", None) == geo["global_head_dim"]
    assert getattr(text_config, "num_global_key_value_heads", None) == geo["num_global_key_value_heads"]
    assert text_config.head_dim == geo["head_dim"]
    assert text_config.num_key_value_heads == geo["num_key_value_heads"]
    assert vb.vllm_overrides("tiny", images) is None


def test_prompts_carry_each_familys_image_placeholder(vb):
    for geometry, placeholder in (("tiny", "<start_of_image>"), ("tiny-gemma4", "<|image|>")):
        reqs = vb.requests(geometry, True, [5, 40])
        assert [r["prompt"].split().count(placeholder) for r in reqs] == [r["images"] for r in reqs]
        assert all(r["images"] >= 1 for r in reqs)


def test_gemma4_image_checkpoint_expands_images_within_the_window(vb, tmp_path):
    pytest.importorskip("torchvision", reason="Gemma-4's processor needs torchvision (its video processor)")
    import transformers

    path = vb.write_model(tmp_path / "mm", "tiny-gemma4", images=True)
    processor = transformers.AutoProcessor.from_pretrained(path)
    reqs = vb.requests("tiny-gemma4", True, [40])
    inputs = processor(text=reqs[0]["prompt"], images=vb.request_images(0, reqs[0]["images"]), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image = processor.image_token_id
    runs, count = [], 0
    for token in ids + [-1]:
        if token == image:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    assert len(runs) == reqs[0]["images"]
    window = vb.GEMMA4_GEOMETRY["tiny-gemma4"]["sliding_window"]
    assert all(0 < n <= vb.VISION["tiny-gemma4"][2] and n + 2 < window for n in runs), runs
    got = vb.transformers_worker(dict(model=str(path), requests=reqs, images=True, rule="official", max_tokens=2))
    assert got["requests"][0]["prompt_tokens"] == len(ids)


def test_the_check_writes_what_it_has_after_every_run(vb, tmp_path, monkeypatch):
    # A check stopped by a time limit keeps its finished runs: the results file says it is partial
    # until the last write.
    import argparse

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports its sibling `cases`

    args = argparse.Namespace(out=str(tmp_path), graphs=True, block_sizes=[16], rules=["official"], max_batched=None,
                              model="tiny-gemma4", images=True, label=None)
    rows = [dict(run="bidiattn/official vs TRITON_ATTN, block size 16, graphs=True", ok=True, verdict="OK",
                 prompt_logprob_max_diff=0.0153, tolerance=0.06, problems=[]),
            dict(run="transformers (sdpa, its own mask) vs TRITON_ATTN", ok=True, verdict="floor, not judged",
                 prompt_logprob_max_diff=0.0631, tolerance=float("nan"), problems=[]),
            dict(run="bidiattn/vllm vs TRITON_ATTN", ok=False, error="engine died")]
    vb.write_check(args, rows, [5, 40], done=False)
    (md,) = tmp_path.glob("vllm-check-graphs-*.md")
    text = md.read_text()
    assert "partial" in text and "| bidiattn/official vs TRITON_ATTN, block size 16, graphs=True | OK | 0.0153 |" in text
    assert "| transformers (sdpa, its own mask) vs TRITON_ATTN | floor, not judged | 0.0631 | nan |" in text
    assert "| bidiattn/vllm vs TRITON_ATTN | failed |" in text and "2 failure(s)" not in text
    vb.write_check(args, rows, [5, 40], done=True)
    assert "partial" not in md.read_text()


def test_the_timing_writes_each_engine_as_it_finishes(vb, tmp_path, monkeypatch):
    # A graphs timing stopped by a time limit keeps the engines it finished, marked partial.
    import argparse

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    args = argparse.Namespace(out=str(tmp_path), graphs=True, model="gemma-4-31b-6l", images=True, prompt_len=8192,
                              batch=2, decode_tokens=256, max_batched=8192, block_size=16,
                              image_tokens=None, label="g4")
    rows = [dict(backend="bidiattn/official", prefill_tok_s=64718.0, decode_tok_s=150.0, prefill_attention_s=0.0379,
                 prefill_kernels_s=0.1941, kernels=dict(bidiattn_layers_s=0.0401), decode_s=0.8152,
                 decode_kernels_s=0.61, decode_attention_s=0.08)]
    vb.write_timing(args, rows, done=False)
    (md,) = tmp_path.glob("vllm-backend-graphs-g4-*.md")  # --label names the file
    text = md.read_text()
    assert "Partial" in text and "| bidiattn/official | 64718 | 150 | 37.9 | 40.1 | 194.1 | 815.2 | 610.0 | 80.0 |" in text
    rows.append(dict(backend="TRITON_ATTN", error="engine failed"))
    vb.write_timing(args, rows, done=True)
    text = md.read_text()
    assert "Partial" not in text and "| TRITON_ATTN | nan | nan | nan | nan |" in text
    assert json.loads(md.with_suffix(".json").read_text())["rows"][1]["error"] == "engine failed"


def test_the_timing_counts_the_bidiattn_layers_range_apart_from_kernels(vb):
    # kernel_summary: the profiler range around bidiattn's layers (every kernel they launch) is
    # reported on its own, not as a kernel among the totals; the caller's totals stay as they were.
    totals = {"_span_fwd_kernel": 0.010, "hd512_forward_kernel": 0.011, "indexSelectLargeIndex": 0.001,
              "reshape_and_cache_flash_kernel": 0.002, "nvjet_gemm": 0.150, vb.ATTEND_RANGE: 0.0225}
    got = vb.kernel_summary(totals)
    assert got["bidiattn_layers_s"] == 0.0225 and vb.ATTEND_RANGE in totals
    assert abs(got["attention_s"] - 0.021) < 1e-12 and abs(got["all_s"] - 0.174) < 1e-12
    assert vb.ATTEND_RANGE not in got["top"] and vb.kernel_summary({"k": 1.0})["bidiattn_layers_s"] is None


def test_the_decode_profile_is_the_longer_run_less_the_prefill_host_side_too(vb, monkeypatch):
    # profile_kernels: the decode's kernels and host calls are a run of 1 + N tokens less the
    # prefill run (1 token), per name; host entries are [calls, CPU seconds], the largest first,
    # those the decode does not call dropped; the decode's host side is in the timing's .md.
    runs = iter([({"k": 1.0, "_span_fwd_kernel": 0.5}, {vb.BUILD_RANGE: [12, 0.001], "cudaGraphLaunch": [0, 0.0]}),
                 ({"k": 3.0, "_span_fwd_kernel": 0.9},
                  {vb.BUILD_RANGE: [72, 0.004], "cudaGraphLaunch": [10, 0.001], "gpu_model_runner: preprocess": [10, 0.02],
                   "cudaStreamSynchronize": [0, 0.0]})])
    monkeypatch.setattr(vb, "kernel_totals", lambda *args: next(runs))
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kwargs: kwargs))
    prefill, decode = vb.profile_kernels(None, None, 10)
    assert abs(prefill["attention_s"] - 0.5) < 1e-12 and abs(decode["attention_s"] - 0.4) < 1e-12
    assert list(decode["host"]) == ["gpu_model_runner: preprocess", vb.BUILD_RANGE, "cudaGraphLaunch"]
    assert decode["host"][vb.BUILD_RANGE][0] == 60 and abs(decode["host"][vb.BUILD_RANGE][1] - 0.003) < 1e-12
    assert vb.HOST_WAITS.search("cudaStreamSynchronize") and not vb.HOST_WAITS.search("cudaLaunchKernel")


def test_the_timing_takes_other_image_sizes(vb, tmp_path):
    # --image-tokens: a Gemma-3 SigLIP tower of sqrt(tokens) patches a side, its processor
    # expanding each image to that many soft tokens; a count that is not a square is refused.
    import transformers

    reqs = vb.requests("tiny", True, [40])
    lengths = []
    for tokens in (None, 16):
        path = vb.write_model(tmp_path / f"m{tokens}", "tiny", images=True, tokens=tokens)
        processor = transformers.AutoProcessor.from_pretrained(path)
        inputs = processor(text=reqs[0]["prompt"], images=vb.request_images(0, reqs[0]["images"]), return_tensors="pt")
        lengths.append(inputs["input_ids"].shape[1])
        assert json.loads((path / "config.json").read_text())["mm_tokens_per_image"] == vb.image_tokens("tiny", tokens)
    assert lengths[1] - lengths[0] == reqs[0]["images"] * (16 - vb.VISION["tiny"][2])
    assert vb.image_tokens("gemma-4-31b-6l", 1120) == 1120 and vb.image_tokens("gemma-3-4b-6l") == 256
    with pytest.raises(ValueError, match="must be a square.*got 15"):
        vb.image_tokens("tiny", 15)
