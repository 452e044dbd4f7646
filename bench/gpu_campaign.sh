#!/usr/bin/env bash
# The memory calibration matrix in one device call (issue 15), with the speed records issue 16
# needs. From the repository root, on the GPU machine (with .whl/ and .whl-unsloth/ carried):
#
#   bash bench/gpu_campaign.sh                 # installs the wheels, runs the matrix, summarises
#   bash bench/gpu_campaign.sh --dry-run       # on a CPU machine: shrunk models, no installs
#
# Further arguments go to bench/calibration_matrix.py (--arch NAME, --backend hf, --no-e2e...).
# Environment: OUT (results folder; the device tool sets it), LIMIT_S (the call's wall-clock limit,
# default 570: the matrix stops in time to write its results and this summary), PYTHON (python3).
#
# Writes to $OUT: memory-calibration-matrix-<gpu>-<date>.json (the records, written after each one),
# matrix.log (progress), summary.txt (every record against the estimate), logs.tar.gz (each
# process's log). Prints a short summary last.
set -uo pipefail
T0=$(date +%s)
LIMIT_S=${LIMIT_S:-570}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/qlc-campaign-out}
WORK=${WORK:-/tmp/qlc-matrix}
DRY=0
ARGS=()
for a in "$@"; do
  if [[ $a == --dry-run ]]; then DRY=1; else ARGS+=("$a"); fi
done
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
rm -rf "$WORK"

if [[ $DRY == 0 ]]; then
  [[ -d .whl ]] || { echo "no .whl/ here: run ../shared/gpu/wheels.sh and carry .whl and .whl-unsloth"; exit 1; }
  P="$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
  $P --target /tmp/site .whl/*.whl &
  base=$!
  unsloth=0
  if [[ -d .whl-unsloth ]]; then
    $P --target /tmp/site2 .whl-unsloth/*.whl &
    stack=$!
    unsloth=1
  fi
  wait $base || { echo "installing .whl failed"; exit 1; }
  if [[ $unsloth == 1 ]] && ! wait $stack; then
    echo "installing .whl-unsloth failed: hf only"
    unsloth=0
  fi
  export PYTHONPATH=$PWD:/tmp/site
  if [[ $unsloth == 1 ]]; then EXTRA=(--unsloth-path /tmp/site2); else EXTRA=(--backend hf); fi
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null
  df -h /tmp | tail -1
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  EXTRA=(--dry-run)
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false

ELAPSED=$(($(date +%s) - T0))
DEADLINE=$((LIMIT_S - ELAPSED - 25))
echo "[campaign] set up in ${ELAPSED}s; the matrix stops at ${DEADLINE}s"
$PYTHON bench/calibration_matrix.py --out "$OUT" --work "$WORK" --deadline-s "$DEADLINE" \
  "${EXTRA[@]}" "${ARGS[@]}" 2>&1 | tee "$OUT/matrix.log"
STATUS=${PIPESTATUS[0]}

RESULTS=$(ls -t "$OUT"/memory-calibration-matrix-*.json "$OUT"/calibration-matrix-dry-run-*.json 2>/dev/null | head -1)
if [[ -n $RESULTS ]]; then
  $PYTHON bench/calibration_matrix.py summary "$RESULTS" > "$OUT/summary.txt" 2>&1
fi
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs ipc 2>/dev/null
rm -rf "$WORK"
echo "[campaign] matrix exit $STATUS after $(($(date +%s) - T0))s; files in $OUT:"
ls -la "$OUT" | tail -n +2
if [[ $STATUS != 0 && -n $RESULTS ]]; then  # the matrix printed its summary itself when it ended well
  $PYTHON bench/calibration_matrix.py summary --brief "$RESULTS"
fi
exit "$STATUS"
