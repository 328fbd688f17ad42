#!/usr/bin/env bash
# One device call that proves the whole pipeline on a GPU (about 5 minutes on one H100-class GPU):
# synth 1280x720 pairs -> pack -> `deepspeed --num_gpus 1 harness/train.py` MIMO-UNet+ in bf16 with
# validation (a carved val set), checkpoints and a final test -> SIGKILL mid-run -> `--resume auto`
# to the end -> validation ran on cuda, in fp32, fast enough (log.jsonl) -> an fp16 run whose loss
# scaler survives a resume -> `mimo export` -> `mimo eval --device cuda` = the trainer's final test
# PSNR to 1e-3 dB -> `mimo deblur --device cuda --ensemble` -> the pyfunc model on cuda = `mimo deblur`.
# Prints `PASS|FAIL|SKIP <check>` lines (also in $OUT/gpu-e2e.log); exits 1 on any FAIL.
#
#   bash benchmarks/device/fetch-wheels.sh                               # here, first
#   run(command="bash benchmarks/device/gpu-e2e.sh", carry=[".whl"], timeout_s=480)
#   then copy $OUT's files into benchmarks/results/ (gpu-e2e.log, gpu-e2e-summary.json, gpu-e2e-log.jsonl).
#
# DEVICE=cpu QUICK=1 SKIP_INSTALL=1 PY=.venv/bin/python OUT=/tmp/x bash benchmarks/device/gpu-e2e.sh
# runs the same steps here with a tiny model and 64x64 frames (tests/test_benchmarks.py does, ~1 min);
# the fp16 check is skipped there (DeepSpeed's fp16 loss scaling needs CUDA).
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh  # OUT, PY, DEVICE; installs the carried wheels
OUT="$(cd "$OUT" && pwd)"
log="$OUT/gpu-e2e.log"
: >"$log"
W="$(mktemp -d "${TMPDIR:-/tmp}/mimo-e2e.XXXXXX")"
trap 'rm -rf "$W"' EXIT
fails=0

say() { echo "$*" | tee -a "$log"; }
# name, then the command: PASS when it exits 0 (its output goes to the log)
step() {
    local name="$1"; shift
    local t0=$SECONDS
    if "$@" >>"$log" 2>&1; then say "PASS $name ($((SECONDS - t0)) s)"; else say "FAIL $name (exit $?, see $log)"; fails=$((fails + 1)); fi
}
# e2e_check.py prints its own PASS/FAIL lines
check() { "$PY" benchmarks/device/e2e_check.py "$@" 2>>"$log" | tee -a "$log"; [[ ${PIPESTATUS[0]} == 0 ]] || fails=$((fails + 1)); }
mimo() { timeout -k 10 300 "$PY" -m harness "$@"; }
port() { "$PY" -c "from harness.distributed import free_port; print(free_port())"; }

if [[ -n "${QUICK:-}" ]]; then
    SIZE=64x64 FRAMES=4 STEPS=24 EVERY=8 KILL_AT=11 MAX_S=10
    MODEL=("model.name=mimo-unet" "model.overrides={num_res: 1, base_channels: 8}" "data.crop=64"
           "data.workers=0" "train.threads=1" "train.channels_last=false")
else
    SIZE=720x1280 FRAMES=3 STEPS=30 EVERY=10 KILL_AT=14 MAX_S=1.0  # MIMO-UNet+ fp32: ~4.2 TFLOP a frame
    MODEL=("data.workers=4")
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__,
'cuda', torch.cuda.is_available())"; } >>"$log" 2>&1
say "== gpu-e2e on $DEVICE (${QUICK:+QUICK, }frames $SIZE, $STEPS steps), work dir $W"

# 1. data: train (2 scenes), a validation set carved off (its own scene) and a test set
step synth mimo synth --out "$W/src" --scenes 2 --frames "$FRAMES" --size "$SIZE" --seed 0 --split train
step synth-val mimo synth --out "$W/val" --scenes 1 --frames 2 --size "$SIZE" --seed 1 --split train
step synth-test mimo synth --out "$W/src" --scenes 1 --frames 2 --size "$SIZE" --seed 2 --split test
step pack mimo pack gopro --root "$W/src" --split train --out "$W/shards/train" --no-progress
step pack-val mimo pack gopro --root "$W/val" --split train --out "$W/shards/val" --no-progress
step pack-test mimo pack gopro --root "$W/src" --split test --out "$W/shards/test" --no-progress

# 2. bf16 training with validation + checkpoints, SIGKILL mid-run, --resume auto to the end
RUN="$W/run"
ARGS=(--recipe recipes/plus.yaml --run-dir "$RUN" "data.train=$W/shards/train" "data.val=$W/shards/val"
      "data.test=$W/shards/test" train.epochs=null "train.steps=$STEPS" schedule.name=constant train.log_every=1
      "eval.every=$EVERY" "checkpoint.every=$EVERY" checkpoint.keep=3 eval.images=0 "${MODEL[@]}")
P="$(port)"
check launch-and-signal --run-dir "$RUN" --at-step "$KILL_AT" --total "$STEPS" --signal KILL --port "$P" \
    --log "$log" -- "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$P" harness/train.py "${ARGS[@]}"
P="$(port)"
step resume timeout -k 15 300 "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$P" harness/train.py \
    "${ARGS[@]}" --resume auto
rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$P"_* 2>/dev/null
check validation --run-dir "$RUN" --device "${DEVICE%%:*}" --max-seconds "$MAX_S"
cp "$RUN/summary.json" "$OUT/gpu-e2e-summary.json" 2>/dev/null
cp "$RUN/log.jsonl" "$OUT/gpu-e2e-log.jsonl" 2>/dev/null

# 3. fp16: the dynamic loss scale (moved off its start by overflows) survives a stop + resume
if [[ "${DEVICE%%:*}" == cuda ]]; then
    F16=(--recipe recipes/plus.yaml --run-dir "$W/fp16" "data.train=$W/shards/train" data.val=null data.test=null
         train.epochs=null train.steps=24 schedule.name=constant train.log_every=1 train.precision=fp16
         deepspeed.fp16.initial_scale_power=20 train.max_nonfinite=50 checkpoint.every=4 "${MODEL[@]}")
    P="$(port)"
    check launch-and-signal --run-dir "$W/fp16" --at-step 12 --total 24 --signal TERM --port "$P" --log "$log" \
        -- "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$P" harness/train.py "${F16[@]}"
    P="$(port)"
    step fp16-resume timeout -k 15 300 "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$P" \
        harness/train.py "${F16[@]}" --resume auto
    check loss-scale --run-dir "$W/fp16"
else
    say "SKIP fp16 loss scaler resume: DeepSpeed's fp16 loss scaling needs CUDA (DEVICE=$DEVICE)"
fi

# 4. export -> eval on the device = the trainer's final fp32 test PSNR; deblur (+ ensemble); pyfunc
step export mimo export "$RUN" --out "$W/export.pkl"
step eval mimo eval --weights "$W/export.pkl" --shards "$W/shards/test" --device "$DEVICE" --json "$W/eval.json"
check same-psnr --eval-json "$W/eval.json" --summary "$RUN/summary.json" --tolerance 1e-3
IMG="$(ls "$W"/src/test/*/blur/*.png | head -n 1)"
step deblur-ensemble mimo deblur --weights "$W/export.pkl" --device "$DEVICE" --ensemble rot4 "$IMG" "$W/ensemble.png"
step deblur mimo deblur --weights "$W/export.pkl" --device "$DEVICE" "$IMG" "$W/deblurred.png"
check pyfunc --weights "$W/export.pkl" --image "$IMG" --deblurred "$W/deblurred.png" --device "${DEVICE%%:*}"

say "== gpu-e2e: $fails failed check(s)"
[[ $fails == 0 ]]
