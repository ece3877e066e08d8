#!/usr/bin/env bash
# Set-up on the GPU machine, sourced by the benchmark entries: installs the carried wheels (.whl),
# restores a carried gsplat build (.cache/torch_extensions.tgz, from an earlier call's $OUT) or
# JIT-builds gsplat for Hopper, and writes a random-weight Zero123-XL to /tmp/zero123-xl.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
if [ -f .cache/torch_extensions.tgz ] && [ ! -d ~/.cache/torch_extensions ]; then
    mkdir -p ~/.cache && tar -xzf .cache/torch_extensions.tgz -C ~/.cache
fi
t0=$(date +%s)
python3 -c "import gsplat, torch; from gsplat.cuda._backend import _C; print('gsplat', gsplat.__version__, 'built')"
echo "gsplat build: $(( $(date +%s) - t0 )) s"
[ -d /tmp/zero123-xl ] || python3 -m backend.guidance.random_model /tmp/zero123-xl --size xl
echo "model ready: $(( $(date +%s) - t0 )) s"
