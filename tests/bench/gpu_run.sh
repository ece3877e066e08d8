#!/usr/bin/env bash
# Benchmark entry on the GPU machine: installs the carried wheels (.whl), JIT-builds gsplat for
# Hopper, writes a random-weight Zero123-XL, then runs tests/bench/bench.py with the given args.
#   bash tests/bench/gpu_run.sh --videos kid-football --mode eager,optimized --steps 40
# Where $OUT is set (the device tool's folder of files that come back), results.json and
# results.md are copied there first and the runs are appended to those copies, so finished runs
# come back even if a later one is cut off.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export BENCH_COMMAND="bash tests/bench/gpu_run.sh $*  (carry .whl .devdata)"
out_args=()
if [ -n "${OUT:-}" ]; then
    cp tests/bench/results.json tests/bench/results.md "$OUT/"
    out_args=(--out "$OUT/results.json")
fi
t0=$(date +%s)
python3 -c "import gsplat, torch; from gsplat.cuda._backend import _C; print('gsplat', gsplat.__version__, 'built')"
echo "gsplat build: $(( $(date +%s) - t0 )) s"
[ -d /tmp/zero123-xl ] || python3 -m backend.guidance.random_model /tmp/zero123-xl --size xl
echo "model ready: $(( $(date +%s) - t0 )) s"
python3 tests/bench/bench.py --model /tmp/zero123-xl ${out_args[@]+"${out_args[@]}"} "$@"
