#!/usr/bin/env bash
# Stage ffpa-attn 0.2.4 (the hd512 anchor of issue 27) and quack-kernels 0.6.4 (its pin) for the GPU
# machine, wheels only, no dependencies: into .ffpa/ (git-ignored), with .ffpa/install.sh.
# ffpa-attn's other pins (nvidia-cutlass-dsl 4.6.2, ray) are not staged: it runs on the
# nvidia-cutlass-dsl 4.8.1 that the FA4 staging installs, and imports without ray.
# Usage, from the project root:            bash benchmarks/stage_ffpa.sh
# On the GPU machine, after the FA4 staging (bash .fa4a/install.sh; source .fa4b/env.sh), in the
# same shell as the benchmark:            bash .ffpa/install.sh
# It installs both wheels --no-deps into /tmp/site (where .fa4b/env.sh points PYTHONPATH), over
# the quack-kernels that the FA4 staging put there (FA4 itself is not used at head dim 512).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
excl=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$excl")"
grep -qx '/.ffpa/' "$excl" 2>/dev/null || printf '/.ffpa/\n' >> "$excl"
rm -rf .ffpa && mkdir -p .ffpa
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .ffpa "ffpa-attn==${FFPA_VERSION:-0.2.4}" "quack-kernels==${QUACK_VERSION:-0.6.4}"
cat > .ffpa/install.sh <<'IN'
# On the GPU machine, from the project root, after the FA4 staging: ffpa-attn and quack-kernels
# --no-deps into /tmp/site (replacing FA4's quack-kernels there). Idempotent.
set -e
site=${FFPA_SITE:-/tmp/site}
if [ ! -f "$site/.ffpa-staged" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .ffpa/*.whl
  touch "$site/.ffpa-staged"
fi
case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) echo "note: $site is not on PYTHONPATH (source .fa4b/env.sh first)";; esac
python3 -c "import ffpa_attn, quack; print('ffpa-attn', ffpa_attn.__version__, 'from', ffpa_attn.__file__)" \
  || echo "ffpa-attn does not import; the benchmark reports it as failing and goes on"
IN
ls -la .ffpa
