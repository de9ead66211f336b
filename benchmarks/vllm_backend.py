"""vLLM with bidiattn's attention backend against vLLM's own backends: check, then time.

    python benchmarks/vllm_backend.py check --model tiny [--images] [--graphs] [--out benchmarks/results]
    python benchmarks/vllm_backend.py refuse --model tiny
    python benchmarks/vllm_backend.py hf-noise --model tiny-gemma4 --images [--out benchmarks/results]
    python benchmarks/vllm_backend.py time --model gemma-3-4b-6l [--images] [--graphs] --out benchmarks/results

Models are random-weight checkpoints written locally (nothing is downloaded). Gemma-3:
``tiny`` (2 layers, head dim 32, window 16) and ``gemma-3-4b-6l`` (gemma-3-4b's attention
geometry: head dim 256, 8 query / 4 K/V heads, window 1024, 5 sliding + 1 full layer; hidden
2560; vocabulary cut to 4096) and ``gemma-3-27b-6l`` (gemma-3-27b's: head dim 128, 32 query / 16
K/V heads, hidden 5376), text-only or, with ``--images``, with a small SigLIP tower and a
Gemma-3 processor (9 tokens per image for ``tiny``, 256 for the others). Gemma-4 (family
``gemma4``: images bidirectional on sliding layers): ``tiny-gemma4`` (2 layers: sliding head dim
32, full head dim 64 with K = V, window 128) and ``gemma-4-31b-6l`` (the gemma-4-31b preset's
attention geometry: sliding head dim 256 with 32 query / 16 K/V heads, full head dim 512 with
4 K/V heads and K = V, window 1024; hidden 5376), with a small Gemma-4 vision tower and a
Gemma-4 processor (at most 70 soft tokens per image for ``tiny-gemma4``, the fewest Gemma-4's
processor takes; 280 for the other; ``time --image-tokens`` sets another count).
Every image is shorter than the window, where the official, transformers and vLLM rules
coincide, so every backend must give the same logits.

Each engine runs in a subprocess of its own (``worker``: one vLLM engine per process,
in-process engine core, ``bidiattn.integrations.vllm.register()`` called first, so the
backend works without the package's entry point installed).

- ``check``: bidiattn (``BIDIATTN_RULE=official`` and ``vllm``) against ``TRITON_ATTN``: greedy
  tokens equal (or, at the first difference, the reference's top two tokens within 0.02 nats,
  a near tie) and per-token logprobs of the prompts (prefill, chunked) and of the generated
  tokens (decode) within 0.06 nats (bf16). Several requests of different lengths, chunked
  prefill (``max_num_batched_tokens`` smaller than the prompts), block sizes 16 and 64.
  ``--graphs``: vLLM's default CUDA graphs (full graphs for decode, piecewise for prefill).
  Every engine takes ``max_num_seqs`` = its number of requests, so vLLM captures graphs for
  batches up to twice that rather than up to 512 (the capture is most of a graphs engine's start).
  The same comparison for transformers with ``attn_implementation="bidiattn-official"`` (one
  run, eager, whole prompts), within the larger of 0.06 and twice the distance of transformers'
  own ``sdpa`` run from ``TRITON_ATTN`` (transformers and vLLM are two implementations of the
  model, each in bf16: their distance is not the attention backend's). Exit status 1 on a
  mismatch. With ``--out``, writes vllm-check[-graphs][-<label>]-<gpu>-<date>.json and .md.
- ``hf-noise``: transformers alone (no vLLM): the check's transformers run (bidiattn, official
  rule) against transformers' own sdpa and eager attention, each in bf16 and fp32, prompt
  logprobs' max difference per pair: bf16 drift between two attention implementations of one
  model, and bidiattn against transformers' own mask in fp32 (exit status 1 above 1e-3). With
  ``--out``, writes hf-noise-<gpu>-<date>.json and .md.
- ``refuse``: an fp8 KV cache and a rule vLLM's metadata cannot carry (Gemma-3 images longer
  than the window under the official rule) stop the engine at start-up with a message naming
  the value. Exit status 1 otherwise. With ``--out``, writes vllm-refuse-<gpu>-<date>.json and .md.
- ``time``: prefill tokens/s (prompts of ``--prompt-len``, ``--batch`` of them, one output
  token) and decode tokens/s (``--decode-tokens`` more per request; the difference of the two
  runs' wall clocks), per backend (bidiattn, TRITON_ATTN, FLASH_ATTN where vLLM takes it),
  median of ``--reps`` runs after a warm-up, and from the torch profiler: the attention
  kernels' GPU time in one prefill run (kernels by name) and, for bidiattn, every kernel its
  layers launch there (a profiler range around them); the decode's kernels (a run of
  ``1 + --decode-tokens`` tokens less the prefill run, per kernel name) against its wall clock.
  Writes vllm-backend[-graphs][-<label>]-<gpu>-<date>.json and .md after every engine (marked
  partial until the end).

On the GPU machine (vLLM 0.26.0 staged by shared/device/stage-vllm.sh):
``source .vllmc/env.sh && PYTHONPATH=src:$PYTHONPATH python3 benchmarks/vllm_backend.py check
--model tiny`` (the README's vLLM section lists the commands).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
# Gemma-3 special tokens (ids 4-6: begin image, image soft token, end image).
GEMMA3_SPECIAL = ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]
# vLLM's Gemma-3 processor looks these up (it merges newline runs after inserting images).
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
WORDS = ("hello world the a cat dog runs fast slow big small red blue green what is in this image picture "
         "describe one two three four five six seven eight nine ten").split()
GEOMETRY = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, sliding_window=16, max_position_embeddings=4096,
                 layer_types=["sliding_attention", "full_attention"]),
    "gemma-3-4b-6l": dict(vocab_size=4096, hidden_size=2560, intermediate_size=10240, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                          query_pre_attn_scalar=256, max_position_embeddings=131072,
                          layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "gemma-3-27b-6l": dict(vocab_size=4096, hidden_size=5376, intermediate_size=21504, num_hidden_layers=6,
                           num_attention_heads=32, num_key_value_heads=16, head_dim=128, sliding_window=1024,
                           query_pre_attn_scalar=168, max_position_embeddings=131072,
                           layer_types=["sliding_attention"] * 5 + ["full_attention"]),
}
# Gemma-4 text configs: ``global_head_dim`` / ``num_global_key_value_heads`` are the full layers'
# (with ``attention_k_eq_v``: no V projection there, V = K), as vLLM 0.26's gemma4.py reads them.
GEMMA4_GEOMETRY = {
    "tiny-gemma4": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=128,
                        max_position_embeddings=4096, layer_types=["sliding_attention", "full_attention"]),
    "gemma-4-31b-6l": dict(vocab_size=4096, hidden_size=5376, intermediate_size=21504, num_hidden_layers=6,
                           num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
                           num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024,
                           max_position_embeddings=131072, layer_types=["sliding_attention"] * 5 + ["full_attention"]),
}
GEOMETRY.update(GEMMA4_GEOMETRY)
# Vision tower per geometry. Gemma-3 (SigLIP): image side, patch side, tokens per image (= (side /
# patch)**2). Gemma-4: patch side, pooling kernel, most soft tokens per image.
VISION = {"tiny": (12, 4, 9), "gemma-3-4b-6l": (64, 4, 256), "gemma-3-27b-6l": (64, 4, 256),
          "tiny-gemma4": (4, 2, 70), "gemma-4-31b-6l": (16, 3, 280)}
# Gemma-4 special tokens: begin image, image soft token, end image, video and audio soft tokens,
# begin / end audio (the processor looks every one up).
GEMMA4_SPECIAL = ["<|image>", "<|image|>", "<image|>", "<|video|>", "<|audio|>", "<|audio>", "<audio|>"]


def family(geometry: str) -> str:
    return "gemma4" if geometry in GEMMA4_GEOMETRY else "gemma3"


def vllm_overrides(geometry: str, images: bool) -> dict | None:
    """``hf_overrides`` a Gemma-4 checkpoint needs in vLLM 0.26 under transformers >= 5.17.

    vLLM 0.26 reads ``global_head_dim``, ``num_global_key_value_heads`` and the global
    ``head_dim`` / ``num_key_value_heads`` as plain attributes of the text config; transformers
    5.17 moves the full layers' values into ``per_layer_config`` (the two ``global_*`` names are
    gone, the other two raise unless ``allow_global_per_layer_attribute_access``). Every engine of
    a run gets the same overrides, so backends stay comparable."""
    if family(geometry) != "gemma4":
        return None
    geo = GEMMA4_GEOMETRY[geometry]
    text = {"allow_global_per_layer_attribute_access": True, "global_head_dim": geo["global_head_dim"],
            "num_global_key_value_heads": geo["num_global_key_value_heads"]}
    return {"text_config": text} if images else text


def mm_limits(geometry: str) -> dict[str, int]:
    """``limit_mm_per_prompt`` of an image run: 4 images; Gemma-4's video off, since vLLM sizes
    the encoder budget by a 32-frame video (2496 tokens) otherwise and refuses a small
    ``max_num_batched_tokens`` at start-up."""
    return {"image": 4, "video": 0} if family(geometry) == "gemma4" else {"image": 4}


def image_placeholder(geometry: str) -> str:
    """The text a prompt carries where an image goes (the processor expands it)."""
    return "<|image|>" if family(geometry) == "gemma4" else "<start_of_image>"


# ---------------------------------------------------------------------------------------------- checkpoints
def _tokenizer(vocab_size: int, special: list[str], extra: dict[str, str]):
    """A word-level tokenizer: ``<pad> <eos> <bos> <unk>`` (ids 0-3), ``special`` (ids from 4),
    the newline runs, the prompt words, then filler words up to ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<eos>", "<bos>", "<unk>"] + special + NEWLINES + WORDS
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=extra)


def _randomize(model) -> None:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the models' own init leaves some weights at zero
            if not p.any():
                p.normal_(std=0.05)


def image_tokens(geometry: str, tokens: int | None = None) -> int:
    """Soft tokens per image of ``geometry``'s vision tower: ``tokens`` if given (Gemma-3: a
    square, the SigLIP image then ``sqrt(tokens)`` patches a side; Gemma-4: the processor's cap,
    one of the counts it takes), else ``VISION``'s."""
    if tokens is None:
        return VISION[geometry][2]
    if tokens < 1:
        raise ValueError(f"image tokens must be positive, got {tokens}")
    if family(geometry) == "gemma3" and round(tokens ** 0.5) ** 2 != tokens:
        raise ValueError(f"Gemma-3 image tokens must be a square (SigLIP's patch grid), got {tokens}")
    return tokens


def write_model(path: Path, geometry: str, images: bool, sliding_window: int | None = None,
                tokens: int | None = None) -> Path:
    """A random-weight checkpoint (bf16) of ``geometry`` and its tokenizer (and processor) in
    ``path``; images of :func:`image_tokens` soft tokens."""
    if family(geometry) == "gemma4":
        return write_gemma4_model(path, geometry, images, tokens)
    import torch

    text = dict(GEOMETRY[geometry], pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if sliding_window is not None:
        text["sliding_window"] = sliding_window
    tokenizer = _tokenizer(text["vocab_size"], GEMMA3_SPECIAL,
                              {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                               "eoi_token": "<end_of_image>"})
    torch.manual_seed(0)
    if images:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

        patch = VISION[geometry][1]
        tokens = image_tokens(geometry, tokens)
        side = patch * round(tokens ** 0.5)
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      image_size=side, patch_size=patch)
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                              boi_token_index=4, image_token_index=5, eoi_token_index=6)
        model = Gemma3ForConditionalGeneration(config)
        processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": side, "width": side},
                                                                         do_pan_and_scan=False),
                                    tokenizer=tokenizer, image_seq_length=tokens)
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(**text))
        processor = tokenizer
    _randomize(model)
    model.to(torch.bfloat16).save_pretrained(path)
    processor.save_pretrained(path)
    if images:
        hub_vision_names(path)
    return path


def write_gemma4_model(path: Path, geometry: str, images: bool, tokens: int | None = None) -> Path:
    """A random-weight Gemma-4 checkpoint (bf16, family ``gemma4``: ``use_bidirectional_attention=
    "vision"``) with a one-layer vision tower and no audio tower, its tokenizer and, with
    ``images``, a Gemma-4 processor; the soft tokens per image are capped by the image processor's
    ``max_soft_tokens`` and the vision config's ``default_output_length`` alike (vLLM sizes its
    placeholders from the latter, the processor from the former). Text-only: the language model
    alone (``Gemma4ForCausalLM``)."""
    import torch
    import transformers as tf

    geo = dict(GEMMA4_GEOMETRY[geometry])
    ids = {name: 4 + i for i, name in enumerate(GEMMA4_SPECIAL)}
    tokenizer = _tokenizer(geo["vocab_size"], GEMMA4_SPECIAL,
                              {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>",
                               "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"})
    text = dict(geo, pad_token_id=0, eos_token_id=1, bos_token_id=2, use_bidirectional_attention="vision",
                hidden_size_per_layer_input=0, vocab_size_per_layer_input=geo["vocab_size"])
    torch.manual_seed(0)
    if images:
        patch, pool, _ = VISION[geometry]
        soft = image_tokens(geometry, tokens)
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=32, patch_size=patch, pooling_kernel_size=pool,
                      default_output_length=soft)
        config = tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                                 boi_token_id=ids["<|image>"], image_token_id=ids["<|image|>"],
                                 eoi_token_id=ids["<image|>"], video_token_id=ids["<|video|>"],
                                 audio_token_id=ids["<|audio|>"], boa_token_id=ids["<|audio>"],
                                 eoa_token_index=ids["<audio|>"])
        model = tf.Gemma4ForConditionalGeneration(config)
        image_processor = tf.Gemma4ImageProcessor(patch_size=patch, pooling_kernel_size=pool, max_soft_tokens=soft)
        processor = tf.Gemma4Processor(feature_extractor=tf.Gemma4AudioFeatureExtractor(),
                                       image_processor=image_processor, tokenizer=tokenizer,
                                       video_processor=tf.Gemma4VideoProcessor(patch_size=patch,
                                                                               pooling_kernel_size=pool),
                                       image_seq_length=soft)
    else:
        model = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**text))
        processor = tokenizer
    _randomize(model)
    model.to(torch.bfloat16).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def hub_vision_names(path: Path) -> None:
    """Rename the SigLIP tower's weights to the hub checkpoints' ``vision_tower.vision_model.*``.

    transformers 5 saves them as ``vision_tower.embeddings...``; vLLM 0.26 loads only the hub
    names (transformers reads both)."""
    from safetensors.torch import load_file, save_file

    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
                   for k, v in tensors.items()}
        if renamed.keys() != tensors.keys():
            save_file(renamed, shard, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {("vision_tower.vision_model." + k[len("vision_tower."):]
                               if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
                               else k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def requests(geometry: str, images: bool, lengths: list[int], seed: int = 0) -> list[dict]:
    """Prompts of about ``lengths`` words, an image every ~40% of the prompt when ``images``."""
    import random

    rng = random.Random(seed)
    out = []
    for n in lengths:
        words = [rng.choice(WORDS) for _ in range(n)]
        count = 0
        if images:
            for at in sorted({max(1, int(n * f)) for f in (0.1, 0.5)}):
                words.insert(at + count, image_placeholder(geometry))
                count += 1
        out.append({"prompt": " ".join(words), "images": count})
    return out


# ---------------------------------------------------------------------------------------------- worker
def worker(spec: dict) -> dict:
    """One engine: generate for spec['requests'], return tokens, logprobs and timings."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    backend = spec["backend"]
    if backend == "transformers":
        return transformers_worker(spec)
    if backend == "bidiattn":
        os.environ["BIDIATTN_RULE"] = spec.get("rule", "official")
        import bidiattn.integrations.vllm as bidiattn_vllm

        backend = bidiattn_vllm.register()
        if spec.get("mode") == "time":
            mark_attend()
    if spec.get("mode") == "time":
        os.environ.setdefault("VLLM_CUSTOM_SCOPES_FOR_PROFILING", "1")  # vLLM's host ranges, both engines
        if spec["backend"] in ("bidiattn", "TRITON_ATTN"):
            mark_build(spec["backend"])
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["model"], attention_backend=backend, enforce_eager=not spec.get("graphs", False),
                  max_model_len=spec.get("max_model_len", 1024), gpu_memory_utilization=spec.get("memory", 0.4),
                  max_num_batched_tokens=spec.get("max_batched", 64), enable_chunked_prefill=True,
                  block_size=spec.get("block_size", 16), dtype="bfloat16", seed=0,
                  kv_cache_dtype=spec.get("kv_cache_dtype", "auto"), enable_prefix_caching=False,
                  max_num_seqs=max(len(spec["requests"]), 1))
    if spec.get("hf_overrides"):
        kwargs["hf_overrides"] = spec["hf_overrides"]
    if spec.get("images"):
        kwargs["limit_mm_per_prompt"] = spec.get("mm_limits", {"image": 4})
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t0
    prompts = []
    for i, r in enumerate(spec["requests"]):
        item = {"prompt": r["prompt"]}
        if r.get("images"):
            item["multi_modal_data"] = {"image": request_images(i, r["images"])}
        prompts.append(item)
    if spec.get("mode") == "time":
        result = {"start_s": start_s, "runs": []}
        for max_tokens in (1, 1 + spec["decode_tokens"]):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            llm.generate(prompts, params, use_tqdm=False)  # warm-up
            times = []
            for _ in range(spec.get("reps", 3)):
                t0 = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                times.append(time.perf_counter() - t0)
            result["runs"].append({"max_tokens": max_tokens, "s": statistics.median(times)})
        result["kernels"], result["decode_kernels"] = profile_kernels(llm, prompts, spec["decode_tokens"])
        return result
    params = SamplingParams(max_tokens=spec.get("max_tokens", 12), temperature=0.0, logprobs=2, prompt_logprobs=1,
                            ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {"start_s": start_s, "requests": []}
    for o in outs:
        gen = o.outputs[0]
        prompt_lp = [None if lp is None else lp[tok].logprob for tok, lp in zip(o.prompt_token_ids, o.prompt_logprobs)]
        steps = []
        for tok, lp in zip(gen.token_ids, gen.logprobs):
            ranked = sorted(lp.values(), key=lambda x: -x.logprob)
            steps.append({"token": tok, "logprob": lp[tok].logprob,
                          "gap": ranked[0].logprob - ranked[1].logprob if len(ranked) > 1 else 1e9})
        result["requests"].append({"prompt_tokens": len(o.prompt_token_ids), "prompt_logprobs": prompt_lp,
                                   "steps": steps})
    return result


def request_images(index: int, count: int) -> list:
    """The random 24x32 RGB images of request ``index`` (the same for every engine)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    return [Image.fromarray((rng.random((24, 32, 3)) * 255).astype("uint8")) for _ in range(count)]


def transformers_worker(spec: dict) -> dict:
    """The same requests through transformers with ``attn_implementation="bidiattn-<rule>"``
    (``spec["attn"]``, default ``"sdpa"``: transformers' own mask, where ``spec["rule"]`` is None),
    in ``spec["dtype"]`` (default ``"bfloat16"``): prompt logprobs from one forward pass, greedy
    continuation with per-step logprobs and the top-2 margin, in the worker's result format."""
    import torch
    import transformers

    import bidiattn.integrations.transformers as bidiattn_hf

    rule = spec.get("rule")
    name = spec.get("attn", "sdpa") if rule is None else bidiattn_hf.register(f"bidiattn-{rule}", convention=rule)
    dtype = getattr(torch, spec.get("dtype", "bfloat16"))
    auto = transformers.AutoModelForImageTextToText if spec.get("images") else transformers.AutoModelForCausalLM
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = auto.from_pretrained(spec["model"], attn_implementation=name, dtype=dtype).to(device).eval()
    processor = (transformers.AutoProcessor if spec.get("images") else transformers.AutoTokenizer).from_pretrained(
        spec["model"])
    result = {"start_s": time.perf_counter() - t0, "requests": []}
    for i, r in enumerate(spec["requests"]):
        if r.get("images"):
            inputs = processor(text=r["prompt"], images=request_images(i, r["images"]), return_tensors="pt")
        else:
            inputs = processor(r["prompt"], return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        ids = inputs["input_ids"][0]
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
            prompt_lp = [None] + torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0].tolist()
            gen = model.generate(**inputs, max_new_tokens=spec.get("max_tokens", 12), do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        steps = []
        for tok, step_logits in zip(gen.sequences[0, len(ids):].tolist(), gen.logits):
            lp = torch.log_softmax(step_logits[0].float(), -1)
            top = lp.topk(2).values
            steps.append({"token": tok, "logprob": lp[tok].item(), "gap": (top[0] - top[1]).item()})
        result["requests"].append({"prompt_tokens": len(ids), "prompt_logprobs": prompt_lp, "steps": steps})
    return result


ATTENTION_KERNEL = re.compile(r"attn|attention|_span_|hd512|flash|fmha", re.IGNORECASE)


ATTEND_RANGE = "bidiattn.attend"


def in_range(fn, name: str):
    """``fn`` run inside a profiler range named ``name`` (the range's CPU time, and the kernels
    launched inside it, count in a profile under that name)."""
    import torch

    @functools.wraps(fn)
    def marked(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return marked


def mark_attend() -> None:
    """Wrap the backend's per-layer call in a profiler range named ``ATTEND_RANGE``, so that a
    profile counts every kernel a bidiattn layer launches (span building, the key copy of the
    gluon path, the merge of split-KV), whatever its name. Eager layers only: kernels replayed
    from a CUDA graph have no range."""
    from bidiattn.integrations.vllm import backend as bidiattn_backend

    bidiattn_backend.attend = in_range(bidiattn_backend.attend, ATTEND_RANGE)


BUILD_RANGE = "attn.build"
# CUDA runtime calls that can stall the host until the GPU catches up (a D2H cudaMemcpyAsync
# into pageable memory included), and the graph launches (one per replayed step).
HOST_WAITS = re.compile(r"Synchronize|cudaMemcpy|cudaStreamWaitEvent|cudaGraphLaunch")


def mark_build(backend: str) -> None:
    """Wrap the engine's attention metadata builder's ``build`` (bidiattn's or TRITON_ATTN's) in
    a profiler range named ``BUILD_RANGE``: its host time per step, both engines alike."""
    if backend == "TRITON_ATTN":
        from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder as cls  # noqa: N813
    else:
        from bidiattn.integrations.vllm.backend import BidiattnMetadataBuilder as cls
    cls.build = in_range(cls.build, BUILD_RANGE)


def kernel_totals(llm, prompts, params) -> tuple[dict[str, float], dict[str, list[float]]]:
    """GPU seconds per kernel name of one ``llm.generate`` (torch profiler, engine core in this
    process; kernels inside CUDA graph replays included), and host ``[calls, CPU seconds]`` of
    the builder range, of the runtime calls that can wait on the GPU (``HOST_WAITS``) and of
    vLLM's own host ranges (names with ``:``, e.g. ``gpu_model_runner: preprocess``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # CPU: ATTEND_RANGE
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    host: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA or event.name == ATTEND_RANGE:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time_total / 1e6
        elif event.name == BUILD_RANGE or HOST_WAITS.search(event.name) or ": " in event.name:
            entry = host.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.cpu_time_total / 1e6
    return totals, host


def kernel_summary(totals: dict[str, float]) -> dict:
    """The attention kernels' total (names matching ``ATTENTION_KERNEL``, KV-cache writes
    excluded), all kernels' total, the ten largest kernels and, where :func:`mark_attend` ran,
    the GPU time of every kernel the bidiattn layers launched (``bidiattn_layers_s``; eager
    layers only)."""
    totals = dict(totals)
    marked = totals.pop(ATTEND_RANGE, None)
    attention = {k: v for k, v in totals.items() if ATTENTION_KERNEL.search(k) and "cache" not in k.lower()}
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:10]
    return {"attention_s": sum(attention.values()), "all_s": sum(totals.values()), "bidiattn_layers_s": marked,
            "attention_kernels": {k[:120]: v for k, v in sorted(attention.items(), key=lambda kv: -kv[1])[:6]},
            "top": {k[:120]: v for k, v in top}}


def profile_kernels(llm, prompts, decode_tokens: int) -> tuple[dict, dict]:
    """Kernel summaries of one prefill (``max_tokens=1``) and of its decode: a run of
    ``1 + decode_tokens`` tokens less the prefill, per kernel name."""
    from vllm import SamplingParams

    runs = [kernel_totals(llm, prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for n in (1, 1 + decode_tokens)]
    (prefill, prefill_host), (both, both_host) = runs
    decode = {k: v - prefill.get(k, 0.0) for k, v in both.items()}
    summary = kernel_summary({k: v for k, v in decode.items() if v > 0})
    host = {}
    for name, (calls, sec) in both_host.items():
        calls0, sec0 = prefill_host.get(name, (0, 0.0))
        host[name] = [calls - calls0, sec - sec0]
    summary["host"] = {k[:80]: v for k, v in sorted(host.items(), key=lambda kv: -kv[1][1])[:12] if v[0] > 0}
    return kernel_summary(prefill), summary


def run_worker(spec: dict, timeout: int = 1800) -> tuple[int, dict | None, str]:
    """``worker(spec)`` in a fresh process: (exit status, result or None, stderr tail)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, __file__, "worker", str(spec_path), str(out_path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        result = json.loads(out_path.read_text()) if proc.returncode == 0 and out_path.exists() else None
        return proc.returncode, result, (proc.stderr or "")[-6000:]


# ---------------------------------------------------------------------------------------------- check
TOLERANCE = 0.06  # nats, bf16 logprobs of one model through two attention backends


def compare(ref: dict, got: dict, tol: float = TOLERANCE, tie: float = 0.02) -> list[str]:
    """Differences of ``got`` from the reference run (empty: equal within the tolerances)."""
    problems = []
    for i, (a, b) in enumerate(zip(ref["requests"], got["requests"])):
        pa = [x for x in a["prompt_logprobs"] if x is not None]
        pb = [x for x in b["prompt_logprobs"] if x is not None]
        worst = max((abs(x - y) for x, y in zip(pa, pb)), default=0.0)
        if len(pa) != len(pb) or worst > tol:
            problems.append(f"request {i}: prompt logprobs differ by {worst:.4f} (lengths {len(pa)}, {len(pb)})")
        for j, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
            if sa["token"] != sb["token"]:
                if sa["gap"] > tie:
                    problems.append(f"request {i}: token {j} is {sb['token']}, reference {sa['token']} "
                                    f"(reference margin {sa['gap']:.4f})")
                break
            if abs(sa["logprob"] - sb["logprob"]) > tol:
                problems.append(f"request {i}: token {j} logprob {sb['logprob']:.4f} vs {sa['logprob']:.4f}")
                break
    return problems


def write_check(args, rows: list, lengths: list[int], *, done: bool) -> None:
    """The check's results so far (``--out``): written after every run, so that a check stopped by
    a time limit (every graphs engine compiles and captures first) keeps what it printed."""
    if not args.out:
        return
    failures = sum(not r["ok"] for r in rows)
    meta = run_meta(args, block_sizes=args.block_sizes, rules=args.rules, max_batched=args.max_batched,
                    prompt_lengths=lengths)
    status = "" if done else " (partial: the check did not reach its end)"
    lines = [f"# vLLM check, {meta}", "", f"{failures} failure(s){status}. Tolerances: prompt and step logprobs "
             f"within {TOLERANCE} nats of TRITON_ATTN's (transformers + bidiattn: within the larger of that and "
             "twice transformers' own sdpa run's distance, another model implementation in bf16); greedy tokens "
             "equal (or a near tie, reference margin <= 0.02).", "",
             "| run | result | prompt logprobs max abs diff | tolerance |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r.get('verdict', 'failed')} | "
              f"{r.get('prompt_logprob_max_diff', float('nan')):.4f} | {r.get('tolerance', float('nan')):.4f} |"
              for r in rows]
    lines += [f"- {r['run']}: {p}" for r in rows for p in r.get("problems", [])]
    write_results(args.out, named("vllm-check", args), meta, rows, lines)


def check(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_model(Path(tmp) / "model", args.model, args.images))
        lengths = [5, 40, 130, 300] if args.model.startswith("tiny") else [300, 1500, 3000]
        reqs = requests(args.model, args.images, lengths)
        rows = []

        def record(row: dict) -> None:
            rows.append(row)
            write_check(args, rows, lengths, done=False)

        for block_size in args.block_sizes:
            base = dict(model=model, requests=reqs, images=args.images, graphs=args.graphs, block_size=block_size,
                        max_batched=args.max_batched, max_model_len=args.max_model_len,
                        hf_overrides=vllm_overrides(args.model, args.images),
                        mm_limits=mm_limits(args.model))
            code, ref, err = run_worker(dict(base, backend="TRITON_ATTN"))
            if code:
                print(f"TRITON_ATTN failed (block size {block_size}):\n{err}")
                record(dict(run=f"TRITON_ATTN, block size {block_size}", ok=False, error=err[-300:]))
                continue
            runs = [("bidiattn", rule, f"bidiattn/{rule} vs TRITON_ATTN") for rule in args.rules]
            if block_size == args.block_sizes[0]:  # the transformers runs do not depend on the block size
                runs.append(("transformers", None, "transformers (sdpa, its own mask) vs TRITON_ATTN"))
                runs.append(("transformers", "official", "transformers + bidiattn (official) vs TRITON_ATTN"))
            hf_floor = None  # transformers' own distance from vLLM: another model implementation in bf16
            for backend, rule, what in runs:
                code, got, err = run_worker(dict(base, backend=backend, rule=rule))
                label = f"{what}, block size {block_size}, graphs={args.graphs}"
                if code:
                    print(f"{label}: engine failed:\n{err}")
                    record(dict(run=label, ok=False, error=err[-300:]))
                    continue
                tol = TOLERANCE
                if backend == "transformers" and rule is not None and hf_floor is not None:
                    tol = max(TOLERANCE, 2 * hf_floor)
                problems = compare(ref, got, tol=tol)
                worst = max((abs(x - y) for a, b in zip(ref["requests"], got["requests"])
                             for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:])), default=0.0)
                if backend == "transformers" and rule is None:
                    # transformers' own attention is the floor the bidiattn run is judged by, not a subject
                    hf_floor, problems, tol = worst, [], float("nan")
                verdict = "floor, not judged" if math.isnan(tol) else "OK" if not problems else "MISMATCH"
                print(f"{label}: {verdict} (prompt logprobs max |diff| {worst:.4f}, tolerance {tol:.4f})")
                for p in problems:
                    print("   ", p)
                record(dict(run=label, ok=not problems, verdict=verdict, prompt_logprob_max_diff=worst, tolerance=tol,
                            problems=problems))
    write_check(args, rows, lengths, done=True)
    return 0 if all(r["ok"] for r in rows) else 1


def hf_noise(args) -> int:
    """transformers alone, on the check's model and requests: bidiattn (official rule) against
    transformers' own attention (sdpa, eager), each in bf16 and fp32. How far two attention
    implementations of one model drift apart in bf16 over these prompts (the floor under the
    check's transformers-vs-vLLM comparison), and whether bidiattn equals transformers' own mask
    in fp32. Prompt logprobs' max abs difference per pair and request; exit status 1 where
    bidiattn and eager differ by more than 1e-3 in fp32."""
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_model(Path(tmp) / "model", args.model, args.images))
        lengths = [5, 40, 130, 300] if args.model.startswith("tiny") else [300, 1500, 3000]
        base = dict(model=model, requests=requests(args.model, args.images, lengths), images=args.images,
                    backend="transformers")
        runs = {}
        for label, extra in (("bidiattn bf16", dict(rule="official")), ("sdpa bf16", dict(attn="sdpa")),
                             ("eager bf16", dict(attn="eager")), ("eager fp32", dict(attn="eager", dtype="float32")),
                             ("bidiattn fp32", dict(rule="official", dtype="float32")),
                             ("sdpa fp32", dict(attn="sdpa", dtype="float32"))):
            code, got, err = run_worker(dict(base, **extra))
            if code:
                print(f"{label} failed:\n{err}")
                return 1
            runs[label] = [[x for x in r["prompt_logprobs"] if x is not None] for r in got["requests"]]
    pairs = [("bidiattn bf16", "sdpa bf16"), ("bidiattn bf16", "eager bf16"), ("sdpa bf16", "eager bf16"),
             ("bidiattn bf16", "eager fp32"), ("sdpa bf16", "eager fp32"), ("eager bf16", "eager fp32"),
             ("bidiattn fp32", "eager fp32"), ("sdpa fp32", "eager fp32")]
    rows = [dict(pair=f"{a} vs {b}", max_abs_diff=[max((abs(x - y) for x, y in zip(ra, rb)), default=0.0)
                                                   for ra, rb in zip(runs[a], runs[b])]) for a, b in pairs]
    lines = ["| pair | prompt logprobs max abs diff per request (" + ", ".join(map(str, lengths)) + " words) |",
             "|---|---|"]
    lines += [f"| {r['pair']} | {' / '.join(f'{x:.4f}' for x in r['max_abs_diff'])} |" for r in rows]
    print("\n".join(lines))
    exact = max(next(r for r in rows if r["pair"] == "bidiattn fp32 vs eager fp32")["max_abs_diff"]) <= 1e-3
    if args.out:
        meta = run_meta(args, prompt_lengths=lengths)
        write_results(args.out, "hf-noise", meta, rows, [f"# transformers alone, {meta}", ""] + lines)
    return 0 if exact else 1


def refuse(args) -> int:
    """Start-up refusals: each engine must fail, naming the value."""
    failures, rows = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        text = str(write_model(Path(tmp) / "text", args.model, images=False))
        long_images = str(write_model(Path(tmp) / "long", args.model, images=True, sliding_window=6))
        cases = [("fp8 KV cache", dict(model=text, kv_cache_dtype="fp8"), "kv_cache_dtype 'fp8'"),
                 ("images longer than the window, official rule", dict(model=long_images, images=True),
                  "longer than this Gemma-3's sliding window")]
        for label, extra, needle in cases:
            spec = dict(backend="bidiattn", rule="official", requests=requests(args.model, False, [5]), **extra)
            code, _, err = run_worker(spec)
            ok = code != 0 and needle in err
            print(f"{label}: {'refused' if ok else 'NOT refused as expected'}")
            if not ok:
                print(err[-2000:])
            failures += not ok
            rows.append(dict(case=label, refused=ok, needle=needle, stderr_tail=err[-600:]))
    if args.out:
        meta = run_meta(args)
        lines = [f"# vLLM start-up refusals, {meta}", "", f"{failures} failure(s): each engine must exit at start-up with "
                 "a message naming the value.", "", "| case | refused, naming the value |", "|---|---|"]
        lines += [f"| {r['case']} | {'yes' if r['refused'] else '**no**'} (`{r['needle']}`) |" for r in rows]
        write_results(args.out, "vllm-refuse", meta, rows, lines)
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------- time
def write_timing(args, rows: list, *, done: bool) -> None:
    """The timing's results so far (``--out``): written after every engine, so that a run stopped by
    a time limit (a graphs engine compiles and captures first) keeps the engines it finished."""
    if not args.out:
        return
    meta = run_meta(args, prompt_len=args.prompt_len, batch=args.batch, decode_tokens=args.decode_tokens,
                    max_batched=args.max_batched, block_size=args.block_size,
                    image_tokens=image_tokens(args.model, args.image_tokens) if args.images else None)
    status = [] if done else ["Partial: the run did not reach its end.", ""]
    nan = float("nan")
    lines = [f"# vLLM backends, {meta}", "", *status,
             "| backend | prefill tok/s | decode tok/s | prefill attention kernels, ms (one run) | every kernel of "
             "the bidiattn layers, ms | all kernels, ms | decode: wall ms | kernels ms | attention kernels ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r.get('prefill_tok_s', nan):.0f} | {r.get('decode_tok_s', nan):.0f} | "
              f"{r.get('prefill_attention_s', nan) * 1e3:.1f} | "
              f"{(r.get('kernels', {}).get('bidiattn_layers_s') or nan) * 1e3:.1f} | "
              f"{r.get('prefill_kernels_s', nan) * 1e3:.1f} | "
              f"{r.get('decode_s', nan) * 1e3:.1f} | {r.get('decode_kernels_s', nan) * 1e3:.1f} | "
              f"{r.get('decode_attention_s', nan) * 1e3:.1f} |" for r in rows]
    for r in rows:
        host = r.get("decode_kernels", {}).get("host")
        if host:
            lines += ["", f"Decode host, {r['backend']} (calls, CPU ms: the metadata builder's `build`, runtime "
                      "calls that can wait on the GPU, graph launches, vLLM's own ranges):", ""]
            lines += [f"- {name}: {calls:.0f} calls, {sec * 1e3:.2f} ms" for name, (calls, sec) in host.items()]
    write_results(args.out, named("vllm-backend", args), meta, rows, lines)


def timing(args) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = image_tokens(args.model, args.image_tokens)
        model = str(write_model(Path(tmp) / "model", args.model, args.images, tokens=tokens))
        reqs = requests(args.model, args.images, [args.prompt_len] * args.batch)
        # The prompts' words plus each image's soft tokens, with room to spare.
        max_len = args.prompt_len + args.decode_tokens + 1024 + max(r["images"] for r in reqs) * tokens
        peers = [("TRITON_ATTN", None)] + ([("FLASH_ATTN", None)] if family(args.model) == "gemma3" else [])
        for backend, rule in [("bidiattn", "official")] + peers:  # vLLM's FLASH_ATTN refuses head dim 512
            spec = dict(model=model, backend=backend, rule=rule, requests=reqs, images=args.images, graphs=args.graphs,
                        mode="time", decode_tokens=args.decode_tokens, reps=args.reps, memory=0.8,
                        max_model_len=max_len, max_batched=args.max_batched,
                        block_size=args.block_size, hf_overrides=vllm_overrides(args.model, args.images),
                        mm_limits=mm_limits(args.model))
            code, res, err = run_worker(spec, timeout=3600)
            label = backend if rule is None else f"{backend}/{rule}"
            if code:
                print(f"{label}: failed\n{err[-1500:]}")
                rows.append({"backend": label, "error": err[-300:]})
                write_timing(args, rows, done=False)
                continue
            prefill_s, total_s = res["runs"][0]["s"], res["runs"][1]["s"]
            tokens = sum(len(r["prompt"].split()) for r in reqs)
            row = {"backend": label, "prefill_s": prefill_s, "decode_s": total_s - prefill_s,
                   "prefill_tok_s": tokens / prefill_s,
                   "decode_tok_s": args.batch * args.decode_tokens / max(total_s - prefill_s, 1e-9),
                   "start_s": res["start_s"], "prefill_attention_s": res["kernels"]["attention_s"],
                   "prefill_kernels_s": res["kernels"]["all_s"], "kernels": res["kernels"],
                   "decode_kernels_s": res["decode_kernels"]["all_s"],
                   "decode_attention_s": res["decode_kernels"]["attention_s"], "decode_kernels": res["decode_kernels"]}
            rows.append(row)
            print(f"{label}: prefill {row['prefill_tok_s']:.0f} tok/s, decode {row['decode_tok_s']:.0f} tok/s, "
                  f"prefill attention kernels {row['prefill_attention_s'] * 1e3:.1f} ms of "
                  f"{row['prefill_kernels_s'] * 1e3:.1f} ms GPU time (engine start {row['start_s']:.0f} s)")
            if res["kernels"].get("bidiattn_layers_s") is not None:
                print(f"  prefill: every kernel of the bidiattn layers {res['kernels']['bidiattn_layers_s'] * 1e3:.1f} ms")
            for name, sec in res["kernels"]["attention_kernels"].items():
                print(f"    {sec * 1e3:9.2f} ms  {name}")
            print(f"  decode: {row['decode_s'] * 1e3:.1f} ms wall, kernels {row['decode_kernels_s'] * 1e3:.1f} ms "
                  f"(attention {row['decode_attention_s'] * 1e3:.1f} ms)")
            for name, sec in res["decode_kernels"]["top"].items():
                print(f"    {sec * 1e3:9.2f} ms  {name}")
            print("  decode host (calls, CPU ms; the builder's range, runtime calls that can wait, vLLM's ranges):")
            for name, (calls, sec) in res["decode_kernels"].get("host", {}).items():
                print(f"    {calls:7.0f} {sec * 1e3:9.2f} ms  {name}")
            write_timing(args, rows, done=False)
    write_timing(args, rows, done=True)
    return 0


def run_meta(args, **extra) -> dict:
    """What a results file records: :func:`cases.meta` (device, date, torch/triton, commit from
    ``BIDIATTN_COMMIT``, the command) with vLLM's version, the model and the flags."""
    import cases

    meta = cases.meta("python benchmarks/vllm_backend.py " + " ".join(sys.argv[1:]))
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    return dict(meta, model=args.model, images=args.images, graphs=args.graphs, **extra)


def named(prefix: str, args) -> str:
    """A results file prefix: ``<prefix>[-graphs][-<label>]`` (``check`` and ``time``)."""
    return prefix + ("-graphs" if args.graphs else "") + (f"-{args.label}" if args.label else "")


def write_results(out: str, prefix: str, meta: dict, rows: list, lines: list[str]) -> None:
    """:func:`cases.write_results`: ``<out>/<prefix>-<device>-<date>.{json,md}``."""
    import cases

    stem = cases.write_results(out, prefix, meta, dict(rows=rows), lines)
    print(f"wrote {out}/{stem}.md")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        result = worker(json.loads(Path(argv[1]).read_text()))
        Path(argv[2]).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "refuse", "time", "hf-noise"):
        p = sub.add_parser(name)
        p.add_argument("--model", choices=sorted(GEOMETRY), default="tiny")
        p.add_argument("--images", action="store_true",
                       help="a vision tower (SigLIP for Gemma-3, Gemma-4's own) and image prompts")
        p.add_argument("--graphs", action="store_true", help="vLLM's CUDA graphs (default: enforce_eager)")
        p.add_argument("--max-batched", type=int, default=None,
                       help="max_num_batched_tokens (chunked prefill; default: 8192 for time, else 64, or 160 "
                            "for Gemma-4, whose images of up to 72 tokens must fit one chunk)")
        p.add_argument("--max-model-len", type=int, default=1024)
        p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
        p.add_argument("--rules", nargs="+", choices=("official", "vllm"), default=["official", "vllm"],
                       help="check: the bidiattn rules to run")
        p.add_argument("--block-size", type=int, default=16)
        p.add_argument("--prompt-len", type=int, default=8192)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--decode-tokens", type=int, default=128)
        p.add_argument("--reps", type=int, default=3)
        p.add_argument("--out", default=None)
        p.add_argument("--label", default=None, help="check and time: results file name <prefix>[-graphs]-<label>-...")
        if name == "time":
            p.add_argument("--image-tokens", type=int, default=None,
                           help="soft tokens per image (default: the model's; Gemma-3 a square, Gemma-4 one of "
                                "its processor's caps: 70, 140, 280, 560, 1120)")
    args = parser.parse_args(argv)
    if args.max_batched is None:
        args.max_batched = 8192 if args.command == "time" else 160 if family(args.model) == "gemma4" else 64
    if args.command == "refuse" and family(args.model) != "gemma3":
        parser.error(f"refuse runs Gemma-3 models (its over-long images are Gemma-3's case); got --model {args.model}")
    return {"check": check, "refuse": refuse, "time": timing, "hf-noise": hf_noise}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
