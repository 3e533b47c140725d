#!/bin/bash
# Build ggml-python for one x86 level and run the CPU runtime's tests (and optionally a command) against it.
#
# ggml-python builds one native variant (GGML_NATIVE) and cannot load another at run time, so the only way to
# exercise a lower level's kernels (AVX2 on an AVX-512 CPU, AVX-512 without AMX on an AMX CPU) is a second build.
# This one takes about a minute on two cores; it goes to $DIR (default: a new temporary directory, printed) and is
# used through PYTHONPATH, so the project's own environment is untouched.
#
#   bash experiments/ggml_variant.sh avx2                # build, then the runtime's tests on AVX2 kernels
#   bash experiments/ggml_variant.sh avx512 -- python -m quantize bench --gguf gguf-full    # then this command too
#   DIR=build/ggml-avx2 bash experiments/ggml_variant.sh avx2 --build-only   # only build (tests/test_ggml_levels.py)
#
# LEVEL: avx2 (AVX, AVX2, FMA, F16C, BMI2), avx512 (avx2 + AVX-512 F/BW/VL/DQ, VBMI, VNNI, BF16), native (the lock's
# build). The sdist is requirements.lock's ggml-python: $SDIST when set, else from .whl/ when it is there, else
# downloaded by pip.
set -euo pipefail
cd "$(dirname "$0")/.."
LEVEL=${1:?usage: ggml_variant.sh avx2|avx512|native [--build-only] [-- command ...]}; shift
BUILD_ONLY=0
[ "${1:-}" = "--build-only" ] && BUILD_ONLY=1 && shift
[ "${1:-}" = "--" ] && shift
PY=${PY:-.venv/bin/python}
DIR=${DIR:-$(mktemp -d)/ggml-$LEVEL}
PIN=$(grep -o '^ggml-python==[^ ]*' requirements.lock)
FLAGS=$(grep -o '^ggml-python==[^ ]* .*' requirements.lock | cut -d' ' -f2-)  # the lock's --config-settings
case $LEVEL in
  avx2) DEFS="GGML_NATIVE=OFF GGML_AVX=ON GGML_AVX2=ON GGML_FMA=ON GGML_F16C=ON GGML_BMI2=ON GGML_AVX512=OFF" ;;
  avx512) DEFS="GGML_NATIVE=OFF GGML_AVX=ON GGML_AVX2=ON GGML_FMA=ON GGML_F16C=ON GGML_BMI2=ON GGML_AVX512=ON
                GGML_AVX512_VBMI=ON GGML_AVX512_VNNI=ON GGML_AVX512_BF16=ON" ;;
  native) DEFS="" ;;
  *) echo "error: LEVEL must be avx2, avx512 or native, got $LEVEL" >&2; exit 2 ;;
esac
SETTINGS=()
for d in $DEFS; do SETTINGS+=("--config-settings=cmake.define.$d"); done
SDIST=${SDIST:-$(ls .whl/ggml_python-"${PIN#ggml-python==}".tar.gz 2>/dev/null || true)}
WORK=$(mktemp -d)
if [ -z "$SDIST" ]; then
  $PY -m pip download -q --no-deps --no-binary :all: -d "$WORK" "$PIN"
  SDIST=$(ls "$WORK"/ggml_python-*.tar.gz)
fi
echo "building $PIN for $LEVEL from $SDIST ..."
# shellcheck disable=SC2086  # FLAGS holds the lock's own --config-settings words
CMAKE_BUILD_PARALLEL_LEVEL=${J:-2} $PY -m pip wheel -q --no-deps --no-cache-dir -w "$WORK/wheel" "$SDIST" $FLAGS \
  "${SETTINGS[@]}"
rm -rf "$DIR"
$PY -m pip install -q --no-deps --no-index --target "$DIR" "$WORK"/wheel/ggml_python-*.whl
rm -rf "$WORK"
echo "built into $DIR (use it with PYTHONPATH=$DIR)"
[ $BUILD_ONLY = 1 ] && exit 0
export PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import ggml; from quantize import bench_roofline as r; print('ggml from', ggml.__file__); print(r.ggml_features())"
$PY -m pytest -p no:cacheprovider tests/test_runtime_llm.py tests/test_ggml_repack.py tests/test_ggml_layouts.py \
  tests/test_ggml_amx.py tests/test_ggml_kv_cache.py tests/test_moe_gguf.py tests/test_mmca.py tests/test_profile_ops.py
if [ $# -gt 0 ]; then
  echo "running on the $LEVEL build: $*"
  "$@"
fi
