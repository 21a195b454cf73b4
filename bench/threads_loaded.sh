#!/bin/bash
# bench/threads_loaded.sh: bench/README.md, "Threads on a loaded machine". Runs from the repository root (cd below).
# threads 1, 2, auto on a loaded machine: 2 CPU burners + whatever else runs on the shared host
cd "$(dirname "$0")/.."
unset OMP_NUM_THREADS MKL_NUM_THREADS
python3 -c 'while 1: pass' & B1=$!
python3 -c 'while 1: pass' & B2=$!
echo "burners $B1 $B2"; sleep 20
for t in auto 1 2; do
  rm -rf out/thr-$t
  echo "== threads=$t $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  s=$(date +%s.%N)
  timeout 1200 .venv/bin/synfer -v run recipes/quickstart.yaml num_images=16 generator.steps=10 evaluators=[] grid=false report=false \
     output=out/thr-$t threads=$t 2>&1 | grep -E "threads: |planned|Error|error" | grep -v Warning
  e=$(date +%s.%N)
  echo "threads=$t wall $(python3 -c "print(round($e-$s,1))") s, load after $(cut -d' ' -f1-3 /proc/loadavg)"
done
kill $B1 $B2
echo done
