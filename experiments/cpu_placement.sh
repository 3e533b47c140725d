#!/bin/bash
# Where a shared host has put this guest's first two CPUs, sampled over time, and (with a GGUF directory) what a
# full-size decode step takes in each placement.
#
# Each sample: the round trip of a cache line between CPUs 0 and 1 (two threads pinned there, ping-pong on one atomic
# flag), read bandwidth on one and on two threads (a 1 GiB huge-page array). On the 2-vCPU EPYC guest of
# docs/benchmarks.md two states alternate every half minute to few minutes: ~50-90 ns round trip with 36-38 GB/s
# (both vCPUs on one CCD: one shared L3, one link to memory) and ~340-370 ns with 56-70 GB/s (two CCDs); one thread
# reads 30-34 GB/s in both. What the decode does in each comes from the second mode.
#
#   bash experiments/cpu_placement.sh [SAMPLES] [SECONDS_BETWEEN]      # placement and bandwidth only (default 20, 8)
#   GGUF=gguf-full bash experiments/cpu_placement.sh 40               # decode steps between two latency samples
#
# Needs gcc; the decode mode needs the project's environment ($PY, default .venv/bin/python) and llm-<qtype>.gguf in
# $GGUF. Nothing here is imported by the project: it explains the bench's "moved" readings (quantize/bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${1:-20}
GAP=${2:-8}
PY=${PY:-.venv/bin/python}
W=$(mktemp -d)
cat > "$W/placement.c" <<'EOF'
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { TRIPS = 200000 };
static _Atomic int flag __attribute__((aligned(64)));
static size_t size = 1UL << 30;
static char *buf;
static unsigned long sums[2];

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void pin(int cpu) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s); pthread_setaffinity_np(pthread_self(), sizeof s, &s); }

static void *pong(void *arg) {
  (void)arg; pin(1);
  for (int i = 0; i < TRIPS; i++) {
    while (atomic_load_explicit(&flag, memory_order_acquire) != 1) {}
    atomic_store_explicit(&flag, 0, memory_order_release);
  }
  return 0;
}

static void *reader(void *arg) {  /* sums its half of buf (or all of it, alone) */
  long id = (long)arg, parts = id < 0 ? 1 : 2; if (id < 0) id = 0;
  pin((int)id);
  const unsigned long *p = (const unsigned long *)(buf + id * (size / parts));
  unsigned long s = 0;
  for (size_t i = 0; i < size / parts / 8; i++) s += p[i];
  sums[id] = s;
  return 0;
}

static double read_gb_s(int threads) {
  double best = 1e9;
  for (int r = 0; r < 4; r++) {
    pthread_t t[2]; double t0 = now();
    if (threads == 1) { reader((void *)-1L); }
    else { for (long i = 0; i < 2; i++) pthread_create(&t[i], 0, reader, (void *)i); for (int i = 0; i < 2; i++) pthread_join(t[i], 0); }
    double dt = now() - t0; if (dt < best) best = dt;
  }
  return size / best / 1e9;
}

int main(int argc, char **argv) {
  pin(0);
  double best = 1e9;
  for (int r = 0; r < 3; r++) {
    pthread_t t; pthread_create(&t, 0, pong, 0);
    double t0 = now();
    for (int i = 0; i < TRIPS; i++) {
      atomic_store_explicit(&flag, 1, memory_order_release);
      while (atomic_load_explicit(&flag, memory_order_acquire) != 0) {}
    }
    double dt = now() - t0; pthread_join(t, 0); if (dt < best) best = dt;
  }
  if (argc > 1) { printf("%.0f\n", best / TRIPS * 1e9); return 0; }  /* latency only */
  buf = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  madvise(buf, size, MADV_HUGEPAGE);
  memset(buf, 1, size);
  double one = read_gb_s(1), two = read_gb_s(2);
  printf("round trip CPU 0 <-> 1 %4.0f ns   read: 1 thread %5.1f GB/s, 2 threads %5.1f GB/s%s\n", best / TRIPS * 1e9,
         one, two, sums[0] + sums[1] == 42 ? " " : "");
  return 0;
}
EOF
gcc -O2 -pthread -o "$W/placement" "$W/placement.c"
if [ -z "${GGUF:-}" ]; then
  for _ in $(seq "$SAMPLES"); do echo "$(date +%T) $("$W/placement")"; sleep "$GAP"; done
  exit 0
fi
PLACEMENT="$W/placement" $PY - "$GGUF" "$SAMPLES" <<'EOF'
import os, subprocess, sys, time

import numpy as np

from quantize import gguf_names as names
from quantize.bench_child import random_ids
from quantize.gguf_file import find_llm_file, open_gguf
from quantize.ggml_llm import GgmlLLM

llm = GgmlLLM(open_gguf(find_llm_file(sys.argv[1]), names.ARCH_LLM), n_ctx=1024, n_threads=2)
ids = random_ids(128, llm.hp.vocab_size)


def round_trip_ns() -> int:
    return int(subprocess.run([os.environ["PLACEMENT"], "latency"], capture_output=True, text=True).stdout)


for _ in range(int(sys.argv[2])):
    llm.reset()
    logits = llm.eval_tokens(ids)
    before, steps = round_trip_ns(), []
    for _ in range(12):
        token = int(np.argmax(logits)) % 50000
        t0 = time.perf_counter()
        logits = llm.eval_tokens([token])
        steps.append(time.perf_counter() - t0)
    print(f"{time.strftime('%T')} round trip {before} / {round_trip_ns()} ns (before / after)   decode "
          f"{np.median(steps) * 1e3:.1f} ms/token (128 cached positions)", flush=True)
    time.sleep(3)
EOF
