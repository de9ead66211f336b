"""GPU end-to-end: vLLM serving random-weight Gemma-3 checkpoints (text-only, and with a SigLIP
tower and image prompts) through bidiattn's backend gives TRITON_ATTN's logits (where the rules
coincide: no image longer than the window), eager and with vLLM's CUDA graphs, block sizes 16
and 64, chunked prefill; and unsupported configurations stop the engine at start-up.

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


@pytest.mark.parametrize("images, graphs, block_sizes", [
    (False, False, ["16", "64"]), (True, False, ["16", "64"]), (False, True, ["16"]), (True, True, ["64"]),
], ids=["text-eager", "images-eager", "text-graphs", "images-graphs"])
def test_bidiattn_serves_what_vllms_own_backend_serves(images, graphs, block_sizes):
    args = ["check", "--model", "tiny", "--block-sizes", *block_sizes]
    proc = run(*args, *(["--images"] if images else []), *(["--graphs"] if graphs else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "MISMATCH" not in proc.stdout and proc.stdout.count(": OK") == 2 * len(block_sizes), proc.stdout


def test_unsupported_configurations_stop_the_engine_at_startup():
    proc = run("refuse", "--model", "tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
