#!/usr/bin/env bash
# FERAnno's held-out accuracy against how fine the captured UNet maps are kept: --max-res 8, 16
# and 32 (the tiny UNet's finest map is 32x32), trained side by side on one GPU (on a CPU a 16
# run takes ~3.5x the time of an 8 run). Batch 64 and --mixup 0.4 unless FERANNO_ARGS says
# otherwise; the shipped FERAnno is RES=16 with FERANNO_ARGS="--batch-size 128" and ITERS 5000.
#
#   bench/feranno_resolution.sh TRAIN_FETEXT TEST_FETEXT OUT [ITERS]      # ITERS default 12000
#   FERANNO_ARGS="--limit 128" RES="8 16" bench/feranno_resolution.sh ... 4   # a smoke run, two of the runs
#
# Prints one line per run; each run's log and FERAnno folder land in OUT/r<R>(.log).
set -euo pipefail
train=$1 test=$2 out=$3 iters=${4:-12000}
mkdir -p "$out"
pids=()
for r in ${RES:-8 16 32}; do
  python3 -m synfer train calibrator --data "$train" --test "$test" --model plugins/models/tiny-sd --out "$out/r$r" \
    --iters "$iters" --batch-size 64 --mixup 0.4 --max-res "$r" --no-cache ${FERANNO_ARGS:-} >"$out/r$r.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for r in ${RES:-8 16 32}; do
  python3 -c "import json, sys; c = json.load(open(sys.argv[1])); m = c['heldout']
print(f'max_res {sys.argv[2]:>2}: accuracy {m[\"accuracy\"]:.4f}  UAR {m[\"uar\"]:.4f}  (n={m[\"n\"]})')" "$out/r$r/config.json" "$r" \
    || echo "max_res $r: no result, see $out/r$r.log"
done
exit $status
