#!/usr/bin/env bash
# Benchmark entry on the GPU machine: installs the carried wheels (.whl), JIT-builds gsplat for
# Hopper, writes a random-weight Zero123-XL, then runs tests/bench/bench.py with the given args.
#   bash tests/bench/gpu_run.sh --videos kid-football --mode eager --steps 40
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
t0=$(date +%s)
python3 -c "import gsplat, torch; from gsplat.cuda._backend import _C; print('gsplat', gsplat.__version__, 'built')"
echo "gsplat build: $(( $(date +%s) - t0 )) s"
[ -d /tmp/zero123-xl ] || python3 -m backend.guidance.random_model /tmp/zero123-xl --size xl
echo "model ready: $(( $(date +%s) - t0 )) s"
python3 tests/bench/bench.py --model /tmp/zero123-xl "$@"
