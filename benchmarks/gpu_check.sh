#!/usr/bin/env bash
# Every GPU figure of issue 13 in one run (at most 8 minutes), into one folder:
#   inference.json       benchmarks/inference.py: ms/image of torchvision's and drcnn's R-50
#                        detectors at score 0.001 and 0.05, fixed classification load, NMS load
#   sync_count.json      benchmarks/sync_count.py: synchronising CUDA calls per image, by line
#   train_step_fp32.json benchmarks/train_step.py: batch 2 of 800x1333, torchvision vs drcnn
#   train_step_bf16.json   Faster vs Decoupled, fp32 and bf16 autocast
#                        (with one more step profiled: on CUDA its GPU busy time, and where
#                        its host time went, by Python function and by operator)
#   train_step_bf16_compiled.json  Decoupled R-CNN's bf16 step with its backbone compiled by
#                        torch.compile (last, in what is left of the budget: compiling takes a
#                        minute or more)
#   benchmark_fp32.json  python3 -m drcnn benchmark <Decoupled R-50 config> (fps), and with
#   benchmark_bf16.json    --amp bf16 when the command has that flag (else skipped, logged)
#   profile_train.txt    benchmarks/profile_train.py: torch.profiler over 10 training
#   profile_train.json     iterations of the synthetic R-18 Decoupled config (256 px, batch 8)
#   profile_train_bf16.*   the same under bf16 autocast, as the main job trains on a GPU
#                        (train.amp: auto): whether autocast's extra host work outweighs its
#                        GPU saving in a step bound by the host
#   (demo)               the main job, drcnn run experiments/synthetic_quick.yaml, on the GPU:
#                        its time in steps.tsv / summary.json (cuda only)
#   demo_times.json      benchmarks/run_times.py: the main job's steps, each notebook's kernel
#                        start, first cell (imports) and longest cells, each training's seconds
#                        per iteration and data wait (cuda only, after the demo)
#   summary.json         all of the above in one JSON, with each step's status and the machine
#   log.txt              each step's command, status and output (trimmed)
# Every step has its own time limit inside the overall budget; a failing step is logged and the
# script goes on. Usage, from the project root (on the GPU machine after `source .gpu/env.sh`):
#     bash benchmarks/gpu_check.sh [--device cpu] [OUT]
# OUT: the argument, else $OUT, else benchmarks/results/gpu. `--device cpu` (or
# GPU_CHECK_DEVICE=cpu) runs every step with tiny sizes on the CPU, to test the script (a few
# minutes). PYTHON (default python3) is the interpreter; GPU_CHECK_BUDGET the overall seconds;
# GPU_CHECK_STEPS (space-separated step names, default all) the steps to run, when a lease has
# time for only some of them: the others are recorded as "skipped (not selected)".
set -u -o pipefail

DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "${1:-}" = "--device" ]; then
  DEVICE=${2:?--device: expected cpu or cuda}
  shift 2
fi
case "$DEVICE" in cpu | cuda) ;; *) echo "--device: expected cpu or cuda, got $DEVICE" >&2; exit 2 ;; esac
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
SELECTED=${GPU_CHECK_STEPS:-}
PY=${PYTHON:-python3}
CONFIG=configs/decoupled_rcnn/decoupled_rcnn_r50_fpn_2x_coco.yaml
LOG_KEEP=20000 # bytes of each step's output kept in log.txt (head and tail)
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
  BUDGET=${GPU_CHECK_BUDGET:-480}
  SCALE=1 # on each step's time limit
  INFERENCE=(--size 800x1333 --repeats 20)
  SYNC=(--size 800x1333)
  TRAIN=(--steps 10 --warmup 3 --batch 2 --size 800 1333)
  BENCH=(--size 800 1333 --images 50 --warmup 5)
  PROFILE=(--batch 8 --size 256 --steps 10 --warmup 3)
else
  BUDGET=${GPU_CHECK_BUDGET:-1800}
  SCALE=4
  INFERENCE=(--size 96x128 --repeats 1)
  SYNC=(--size 96x128)
  TRAIN=(--steps 1 --warmup 1 --batch 1 --size 96 128)
  BENCH=(--size 96 128 --images 2 --warmup 1)
  PROFILE=(--batch 2 --size 96 --steps 2 --warmup 1)
fi

mkdir -p "$OUT_DIR" || exit 2
LOG=$OUT_DIR/log.txt
STEPS=$OUT_DIR/steps.tsv
: >"$LOG"
printf 'step\tstatus\trc\tseconds\tlimit_s\n' >"$STEPS"
START=$(date +%s)

note() { echo "$*" | tee -a "$LOG"; }

# skip NAME STATUS WHY: record a step that does not run
skip() {
  note "== $1: skipped, $3"
  printf '%s\t%s\t\t0\t0\n' "$1" "$2" >>"$STEPS"
}

# selected NAME: whether GPU_CHECK_STEPS (empty: every step) names the step; if not, it is
# recorded as skipped
selected() {
  [ -z "$SELECTED" ] || [[ " $SELECTED " == *" $1 "* ]] && return 0
  skip "$1" "skipped (not selected)" "not in GPU_CHECK_STEPS"
  return 1
}

# step NAME LIMIT_S COMMAND...: run it under `timeout`, within what is left of the budget;
# record its status (ok / failed / timeout / skipped) in steps.tsv and its output in log.txt.
step() {
  local name=$1 limit=$(($2 * SCALE)) left begin rc status output
  shift 2
  selected "$name" || return
  left=$((BUDGET - ($(date +%s) - START) - 15)) # 15 s kept for the summary
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    skip "$name" skipped "the ${BUDGET} s budget is spent"
    return
  fi
  note "== $name (limit ${limit} s): $*"
  output=$(mktemp)
  begin=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$output" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  if [ "$(wc -c <"$output")" -gt $((2 * LOG_KEEP)) ]; then
    { head -c "$LOG_KEEP" "$output"; echo; echo "[... trimmed ...]"; tail -c "$LOG_KEEP" "$output"; } >>"$LOG"
  else
    cat "$output" >>"$LOG"
  fi
  rm -f "$output"
  note "== $name: $status (exit $rc) in $(($(date +%s) - begin)) s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - begin))" "$limit" >>"$STEPS"
}

note "gpu_check: device $DEVICE, out $OUT_DIR, budget $BUDGET s, $(date -u +%FT%TZ)"
step environment 30 sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  2>&1 | head -5; nproc; $PY -c 'import torch, torchvision; print(torch.__version__, \
  torchvision.__version__, torch.version.cuda)'; git rev-parse HEAD 2>/dev/null || true"
step inference 150 "$PY" benchmarks/inference.py --device "$DEVICE" "${INFERENCE[@]}" \
  --out "$OUT_DIR/inference.json"
step sync_count 90 "$PY" benchmarks/sync_count.py --device "$DEVICE" "${SYNC[@]}" \
  --out "$OUT_DIR/sync_count.json"
for amp in fp32 bf16; do
  mode=$amp
  [ "$amp" = fp32 ] && mode=none
  step "train_step_$amp" 90 "$PY" benchmarks/train_step.py --device "$DEVICE" "${TRAIN[@]}" \
    --amp "$mode" --no-fps --host-time --out "$OUT_DIR/train_step_$amp.json"
done
BENCHMARK=("$PY" -m drcnn benchmark "$CONFIG" --device "$DEVICE" "${BENCH[@]}"
  --set model.backbone.pretrained=null)
step benchmark_fp32 60 "${BENCHMARK[@]}" --out "$OUT_DIR/benchmark_fp32.json"
if selected benchmark_bf16; then
  HELP=$(timeout 20 "$PY" -m drcnn benchmark --help 2>&1)
  if grep -q -- --amp <<<"$HELP"; then
    step benchmark_bf16 60 "${BENCHMARK[@]}" --amp bf16 --out "$OUT_DIR/benchmark_bf16.json"
  else
    skip benchmark_bf16 "skipped (no --amp)" \
      "'drcnn benchmark --help' shows no --amp: $(tail -1 <<<"$HELP")"
  fi
fi
step profile_train 120 "$PY" benchmarks/profile_train.py --device "$DEVICE" "${PROFILE[@]}" \
  --out "$OUT_DIR/profile_train.txt"
step profile_train_bf16 120 "$PY" benchmarks/profile_train.py --device "$DEVICE" "${PROFILE[@]}" \
  --amp bf16 --out "$OUT_DIR/profile_train_bf16.txt"
# the main job on the GPU (issue #13 item 6: `make demo` in a minute or two there); its run
# folder stays outside OUT_DIR, the step's time is the figure. 300 s: on an H200 on 2026-11-27
# it took 138 and 152 s (--jobs 2), and the other steps about 250 s, within the 480-s budget
DEMO=${DEMO_DIR:-/tmp/gpu_check_demo}
if [ "$DEVICE" = cuda ]; then
  step demo 300 "$PY" -m drcnn run experiments/synthetic_quick.yaml --out "$DEMO" --jobs auto
  step demo_times 30 "$PY" benchmarks/run_times.py "$DEMO" --out "$OUT_DIR/demo_times.json"
else
  for name in demo demo_times; do
    selected "$name" && skip "$name" "skipped (cuda only)" \
      "the CPU main job takes far longer than this check (make demo)"
  done
fi
step train_step_bf16_compiled 240 "$PY" benchmarks/train_step.py --device "$DEVICE" "${TRAIN[@]}" \
  --amp bf16 --no-fps --compile-backbone --models drcnn_decoupled_rcnn \
  --out "$OUT_DIR/train_step_bf16_compiled.json"

# summary.json: the steps' status and every JSON result of the folder, in one file
timeout 30 "$PY" - "$OUT_DIR" "$DEVICE" "$(($(date +%s) - START))" <<'PY' 2>&1 | tee -a "$LOG"
import csv, json, sys
from pathlib import Path

out, device, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with open(out / "steps.tsv") as f:
    steps = list(csv.DictReader(f, delimiter="\t"))
results = {}
for path in sorted(out.glob("*.json")):
    if path.name != "summary.json":
        try:
            results[path.stem] = json.loads(path.read_text())
        except ValueError as exc:
            results[path.stem] = {"error": f"unreadable: {exc}"}
summary = {"device": device, "seconds": seconds, "steps": steps, "results": results}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
ok = [s["step"] for s in steps if s["status"] == "ok"]
skipped = [s["step"] for s in steps if s["status"].startswith("skipped")]
failed = [s["step"] for s in steps if s["step"] not in ok + skipped]
print(f"gpu_check: {seconds} s, {len(ok)} of {len(steps)} steps ok"
      + (f"; failed or timed out: {', '.join(failed)}" if failed else "")
      + (f"; skipped: {', '.join(skipped)}" if skipped else "")
      + f"; wrote {out / 'summary.json'}")
PY
