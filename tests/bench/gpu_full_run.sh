set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
which ffmpeg; python3 -c "import gsplat; from gsplat.cuda._backend import _C" 2>&1 | tail -1
[ -d /tmp/zero123-xl ] || python3 -m backend.guidance.random_model /tmp/zero123-xl --size xl 2>&1 | tail -1
setsid nohup python3 -m backend run --data .devdata/davis --video kid-football --out /tmp/gpu_kf --preset full --guidance /tmp/zero123-xl --set guidance.optimize=true --stages static,motion --device cuda > /tmp/gpu_kf.log 2>&1 < /dev/null &
