"""GPU end-to-end: vLLM serving random-weight Gemma-3 checkpoints (text-only, and with a SigLIP
tower and image prompts) and a Gemma-4 one (head dims 32 / 64 on sliding / full layers, its own
vision tower) through bidiattn's backend gives TRITON_ATTN's logits (where the rules coincide:
no image longer than the window), eager and with vLLM's CUDA graphs, block sizes 16, 32 and 64,
chunked prefill; and unsupported configurations stop the engine at start-up.

Drives ``benchmarks/vllm_backend.py`` (one engine per subprocess). Needs a CUDA GPU and an
importable vLLM (on the GPU machine: ``source .vllmc/env.sh`` after staging vLLM 0.26.0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vllm_backend.py"


def run(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("vllm", reason="vLLM is not installed")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=3600,
                          env=dict(os.environ))


@pytest.mark.parametrize("model, images, graphs, block_sizes", [
    ("tiny", False, False, ["16", "64"]), ("tiny", True, False, ["16", "64"]), ("tiny", False, True, ["16"]),
    ("tiny", True, True, ["64"]), ("tiny-gemma4", True, False, ["16", "64"]), ("tiny-gemma4", True, True, ["32"]),
], ids=["text-eager", "images-eager", "text-graphs", "images-graphs", "gemma4-images-eager", "gemma4-images-graphs"])
def test_bidiattn_serves_what_vllms_own_backend_serves(model, images, graphs, block_sizes):
    args = ["check", "--model", model, "--block-sizes", *block_sizes]
    proc = run(*args, *(["--images"] if images else []), *(["--graphs"] if graphs else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    # Per block size: bidiattn under the official and the vllm rule; once: transformers + bidiattn.
    assert "MISMATCH" not in proc.stdout and proc.stdout.count(": OK") == 2 * len(block_sizes) + 1, proc.stdout


def test_unsupported_configurations_stop_the_engine_at_startup():
    proc = run("refuse", "--model", "tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
