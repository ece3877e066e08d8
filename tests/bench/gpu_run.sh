#!/usr/bin/env bash
# Benchmark entry on the GPU machine: installs the carried wheels (.whl), JIT-builds gsplat for
# Hopper, writes a random-weight Zero123-XL, then runs tests/bench/bench.py with the given args.
#   bash tests/bench/gpu_run.sh --videos kid-football --mode eager,optimized --steps 40
# Where $OUT is set (the device tool's folder of files that come back), results.json and
# results.md are copied there first and the runs are appended to those copies, so finished runs
# come back even if a later one is cut off.
set -euo pipefail
source tests/bench/gpu_prep.sh
export BENCH_COMMAND="bash tests/bench/gpu_run.sh $*  (carry .whl .devdata)"
out_args=()
if [ -n "${OUT:-}" ]; then
    cp tests/bench/results.json tests/bench/results.md "$OUT/"
    out_args=(--out "$OUT/results.json")
fi
python3 tests/bench/bench.py --model /tmp/zero123-xl ${out_args[@]+"${out_args[@]}"} "$@"
