#!/usr/bin/env bash
# The functional GPU checks of one session in one device call, side by side on the one GPU (each
# check builds its own models in child processes; none measures speed):
#   bench/gpu_models_check.py   Gemma 3 4B with its vision tower through both backends; Unsloth's
#                               padding-free rows keep a packed row's examples apart (issue 14)
#   bench/multi_gpu.py --gpus none   a torchrun world of one, ddp and fsdp: train, live sample,
#                               stop, resume (issue 18)
# Run from the repository root on the GPU machine with .whl/ and .whl-unsloth/ carried. Writes
# $OUT/models.log, $OUT/multi.log, and the checks' JSON and logs as two archives.
set -uo pipefail
OUT=${OUT:-/tmp/qlc-checks-out}
mkdir -p "$OUT" /tmp/qlc-models-out /tmp/qlc-multi-out
P="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
$P --target /tmp/site .whl/*.whl & a=$!
$P --target /tmp/site2 .whl-unsloth/*.whl & b=$!
wait $a && wait $b || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
(timeout -k 10 "${MODELS_S:-330}" python3 bench/gpu_models_check.py --out /tmp/qlc-models-out \
   --unsloth-path /tmp/site2 --budget "${MODELS_BUDGET_S:-300}"; echo "models check exit $?") > "$OUT/models.log" 2>&1 &
m=$!
(timeout -k 10 "${MULTI_S:-330}" python3 bench/multi_gpu.py --gpus none --budget "${MULTI_BUDGET_S:-290}" \
   --out /tmp/qlc-multi-out; echo "multi-gpu bench exit $?") > "$OUT/multi.log" 2>&1 &
g=$!
wait $m $g
tar czf "$OUT/models-check.tar.gz" -C /tmp qlc-models-out 2>/dev/null
tar czf "$OUT/multi-gpu.tar.gz" -C /tmp qlc-multi-out 2>/dev/null
echo "=== multi-gpu (tail)"; tail -n 40 "$OUT/multi.log"
echo "=== models check (tail)"; tail -n 60 "$OUT/models.log"
