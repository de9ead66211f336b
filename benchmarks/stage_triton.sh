#!/usr/bin/env bash
# Stage a Triton release other than the GPU image's (3.6) for the GPU machine: the wheel slimmed to
# what an SM90 compile and launch need (no AMD code generator, no CUPTI/proton libraries, no legacy
# ptxas: Triton 3.9 assembles sm_90 with its ptxas-blackwell; checked by compiling the Gluon kernels
# offline with the slimmed tree), xz-compressed and split into .tria/ and
# .trib/ (git-ignored, each under the 64 MiB a device call carries). For checking the Gluon kernels
# on a release before it joins sm90_wide.host.GPU_CHECKED_TRITON (issue 27).
# Usage, from the project root:       bash benchmarks/stage_triton.sh        (TRITON_VERSION=3.9.0)
# On the GPU machine, two calls back to back (/tmp lasts while the machine is warm):
#   1. carry [".tria"]:  bash .tria/install.sh
#   2. carry [".trib"]:  source .trib/env.sh && python3 -c "import triton; print(triton.__version__)"
# env.sh unpacks into /tmp/triton-<version> once and puts it first on PYTHONPATH (torch 2.11 keeps
# its own Triton 3.6 for inductor; bidiattn's kernels then compile with the staged release).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
ver=${TRITON_VERSION:-3.9.0}
excl=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$excl")"
for d in .tria .trib; do grep -qx "/$d/" "$excl" 2>/dev/null || echo "/$d/" >> "$excl"; done
rm -rf .tria .trib && mkdir -p .tria .trib
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$tmp" "triton==$ver"
mkdir -p "$tmp/t" && (cd "$tmp/t" && unzip -q "$tmp"/triton-*.whl)
# Only libraries are dropped: the AMD backend's Python stays (Triton discovers its backends by entry
# point and loads the AMD code generator only to compile for AMD), as does the profiler's.
(cd "$tmp/t/triton" && rm -rf backends/amd/lib/libtriton_amd_codegen.so backends/nvidia/lib/cupti \
  backends/nvidia/lib/cupti-blackwell _C/libproton.so instrumentation/*.so backends/nvidia/bin/ptxas)
(cd "$tmp/t" && tar c triton triton-*.dist-info | xz -9 -T0 > "$tmp/t.tar.xz")
size=$(stat -c %s "$tmp/t.tar.xz"); half=$(( (size + 1) / 2 ))
split -b "$half" -d -a 1 "$tmp/t.tar.xz" "$tmp/part"
mv "$tmp/part0" .tria/part0 && mv "$tmp/part1" .trib/part1
cat > .tria/install.sh <<IN
# call 1 on the GPU machine: keep part 0 in /tmp while the machine is warm.
mkdir -p /tmp/triton-stage && cp .tria/part0 /tmp/triton-stage/ && echo "triton $ver part 0 staged"
IN
cat > .trib/env.sh <<IN
# call 2 on the GPU machine: unpack Triton $ver into /tmp/triton-$ver once, put it first on PYTHONPATH.
if [ ! -d /tmp/triton-$ver/triton ]; then
  mkdir -p /tmp/triton-$ver && cat /tmp/triton-stage/part0 .trib/part1 | xz -d -T0 | tar x -C /tmp/triton-$ver \
    || echo "triton staging FAILED (was .tria installed in this warm machine?)" >&2
fi
export PYTHONPATH=/tmp/triton-$ver\${PYTHONPATH:+:\$PYTHONPATH}
IN
ls -la .tria .trib
