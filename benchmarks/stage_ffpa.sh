#!/usr/bin/env bash
# Stage the head-dim-512 anchors of issue 27 for the GPU machine, wheels only, no dependencies, into
# .ffpa/ (git-ignored) with .ffpa/install.sh: ffpa-attn 0.2.4 with quack-kernels 0.6.4 (its pin), and
# nvidia-cudnn-frontend 1.32.0 (cuDNN frontend, whose own CuTe DSL engine has an SM90 d512 forward).
# ffpa-attn's other pins (nvidia-cutlass-dsl 4.6.2, ray) are not staged: it runs on the
# nvidia-cutlass-dsl 4.8.1 that the FA4 staging installs, and imports without ray. cuDNN frontend's
# pins (nvidia-cutlass-dsl >= 4.8.0, apache-tvm-ffi >= 0.1.11) are the FA4 staging's; it loads the
# libcudnn that torch's CUDA wheel brings.
# Usage, from the project root:            bash benchmarks/stage_ffpa.sh
# On the GPU machine, after the FA4 staging (bash .fa4a/install.sh; source .fa4b/env.sh), in the
# same shell as the benchmark:            bash .ffpa/install.sh
# It installs the wheels --no-deps into /tmp/site (where .fa4b/env.sh points PYTHONPATH), over
# the quack-kernels that the FA4 staging put there (FA4 itself is not used at head dim 512).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
excl=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$excl")"
grep -qx '/.ffpa/' "$excl" 2>/dev/null || printf '/.ffpa/\n' >> "$excl"
rm -rf .ffpa && mkdir -p .ffpa
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .ffpa "ffpa-attn==${FFPA_VERSION:-0.2.4}" \
  "quack-kernels==${QUACK_VERSION:-0.6.4}" "nvidia-cudnn-frontend==${CUDNN_FE_VERSION:-1.32.0}"
cat > .ffpa/install.sh <<'IN'
# On the GPU machine, from the project root, after the FA4 staging: ffpa-attn, quack-kernels and
# nvidia-cudnn-frontend --no-deps into /tmp/site (replacing FA4's quack-kernels there). Idempotent.
set -e
site=${FFPA_SITE:-/tmp/site}
if [ ! -f "$site/.ffpa-staged" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .ffpa/*.whl
  touch "$site/.ffpa-staged"
fi
case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) echo "note: $site is not on PYTHONPATH (source .fa4b/env.sh first)";; esac
python3 -c "import ffpa_attn, quack; print('ffpa-attn', ffpa_attn.__version__, 'from', ffpa_attn.__file__)" \
  || echo "ffpa-attn does not import; the benchmark reports it as failing and goes on"
python3 -c "import cudnn; print('cudnn frontend', cudnn.__version__, 'backend', cudnn.backend_version())" \
  || echo "cuDNN frontend does not import; the benchmark reports cudnn-fe as failing and goes on"
IN
ls -la .ffpa
