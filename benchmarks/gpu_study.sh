#!/usr/bin/env bash
# The synthetic study on one GPU (issue #15: <= 10 minutes on one H100/H200), timed, with its
# tables, answers and report packed into one archive for the trip back from the GPU machine.
#   bash benchmarks/gpu_study.sh smoke [RESULTS]  # benchmarks/gpu_study_smoke.yaml: every step, a minute
#   bash benchmarks/gpu_study.sh full [RESULTS]   # experiments/synthetic_study_gpu.yaml
# RESULTS (default $OUT, else benchmarks/results/gpu_study) receives <mode>.log (the run's
# output with each step's time; its last lines are printed at the end), <mode>.json (wall
# time, exit status, device) and <mode>_outputs.tar.gz (the run folder without checkpoints,
# per-object rows and raw detections: a file back from a lent GPU is at most 16 MiB).
# JOBS (default 9) trainings, then tests, run at once: one R-18 training at 256 px keeps an
# H200 far from busy (its steps are host-bound). LIMIT (seconds, default none) stops the run
# there and still packs what it wrote; running the script again resumes the run (finished
# steps are skipped).
# SPEC=other.yaml replaces the spec (a CPU trial of this script, say).
# On the GPU machine, from the project root: source .gpu/env.sh && bash benchmarks/gpu_study.sh full
set -uo pipefail
mode=${1:-full}
results=${2:-${OUT:-benchmarks/results/gpu_study}}
jobs=${JOBS:-9}
case "$mode" in
  smoke) spec=${SPEC:-benchmarks/gpu_study_smoke.yaml} ;;
  full) spec=${SPEC:-experiments/synthetic_study_gpu.yaml} ;;
  *) echo "usage: $0 smoke|full [RESULTS]" >&2; exit 2 ;;
esac
mkdir -p "$results"
run_dir=${RUN_DIR:-/tmp/drcnn_gpu_study_$mode}
start=$(date +%s.%N)
limit=${LIMIT:-0}  # timeout's 0: no limit
# into the log file, not through a pipe: the run's notebook kernels outlive a timeout for a
# while and would hold a pipe (and this script) open past the limit
timeout -k 10 "$limit" python3 -m drcnn run "$spec" --out "$run_dir" --jobs "$jobs" \
  >"$results/$mode.log" 2>&1
status=$?
grep -v ': running (notebook saved' "$results/$mode.log" | tail -40
wall=$(python3 -c "import time; print(round(time.time() - $start, 1))")
device=$(python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
printf '{"mode": "%s", "spec": "%s", "jobs": %s, "limit_s": %s, "exit_status": %s, "wall_s": %s, "device": "%s"}\n' \
  "$mode" "$spec" "$jobs" "$limit" "$status" "$wall" "$device" | tee "$results/$mode.json"
# without checkpoints, the per-object sensitivity rows (hundreds of MB) and the raw detections
# (1-3 MB per run); the metrics, tables, notebooks and summaries stay
tar czf "$results/${mode}_outputs.tar.gz" --exclude='*.pth' --exclude='*.bbox.json' \
  --exclude='./sensitivity/sensitivity.csv' \
  --exclude='./sensitivity/sensitivity.parquet' --exclude='./sensitivity/parts/*.parquet' \
  -C "$run_dir" . 2>/dev/null || echo "could not pack $run_dir"
exit "$status"
