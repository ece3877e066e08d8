#!/usr/bin/env bash
# One GPU call for the issue-7 comparison, on one card: eager and optimized (kid-football, both
# stages, 20 timed steps a phase), stage 1 again with the objects together in the optimized
# process, then the VAE encoder variants and the CUDA tests as far as time allows.  Each part
# writes to $OUT, so what finished comes back even if a later part is cut off.
#   bash tests/bench/gpu_compare.sh        (carry .whl .devdata)
set -uo pipefail
source tests/bench/gpu_prep.sh > "$OUT/prep.log" 2>&1
tail -3 "$OUT/prep.log"
(cd ~/.cache && tar -czf "$OUT/torch_extensions.tgz" torch_extensions)
quiet() { grep -v -i "warn\|accelerate\|^\`\`\`\|^\.$\|Loading\|Writing" | cut -c1-600; }
timeout 430 bash tests/bench/gpu_run.sh --videos kid-football --mode eager,optimized --then-together \
    --steps 20 --warmup 5 2>&1 | quiet > "$OUT/bench.log"
grep '^{"card' "$OUT/bench.log"
timeout 150 python3 tests/bench/encoder_variants.py --model /tmp/zero123-xl --views 16 \
    --out "$OUT/encoder_variants.json" 2>&1 | quiet | tail -7
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_guidance.py -k cuda 2>&1 | tail -2
