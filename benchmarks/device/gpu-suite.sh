#!/usr/bin/env bash
# On the GPU machine, in one call: install the carried wheels, then the performance issue's GPU
# benchmarks, each under its own time limit so one stuck step cannot take the others' results.
# JSON reports, the GPU's description and one log go to $OUT (8 files at most come back).
#
#   bash benchmarks/device/fetch-wheels.sh                                   # here, first
#   run(command="bash benchmarks/device/gpu-suite.sh", carry=[".whl"], timeout_s=600)
#   then copy the JSON files into benchmarks/results/ and fill in benchmarks/README.md's GPU table.
#
# DEVICE=cpu QUICK=1 SKIP_INSTALL=1 PY=.venv/bin/python OUT=/tmp/x bash benchmarks/device/gpu-suite.sh
# runs the same steps here with tiny settings (to check the script, not to measure).
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh  # OUT, PY, DEVICE; installs the carried wheels
log="$OUT/gpu-suite.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import torch, deepspeed, webdataset, pydantic; print('torch', torch.__version__, 'deepspeed',
deepspeed.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$log" || exit 2

if [[ -n "${QUICK:-}" ]]; then
    TRAIN=(--quick) INFER=(--quick --models mimo-unet,mimo-unet-plus)
    # The script's plumbing, not the numbers: e-compile's CPU build takes minutes on a busy 2-core
    # box (test_benchmarks.py's train_throughput --quick run covers it); limits for shared cores.
    COMPILE=a-baseline,f-fused-adam SCALE=3
    # Two variants per step are enough to check the plumbing (every variant: the train_throughput test).
    B4=a-baseline,c-bf16 BATCHES=a-baseline
else
    TRAIN=(--models mimo-unet-plus --crop 256 --workers 8 --steps 10 --warmup 3)
    INFER=(--models mimo-unet,mimo-unet-plus --size 720x1280 --tile 512 --reps 5)
    COMPILE=a-baseline,e-compile,f-fused-adam SCALE=1
    B4=a-baseline,b-ds-fp32,c-bf16,d-bf16-cl BATCHES=a-baseline,c-bf16,d-bf16-cl
fi
# name, seconds, then the command
step() {
    local name="$1" limit="$(($2 * SCALE))"; shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$@" >>"$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0))s" | tee -a "$log"
}
# 1. The headline: every variant without compilation at batch 4 (the recipe's), ratios against (a).
step train-b4 120 "$PY" benchmarks/train_throughput.py --device "$DEVICE" "${TRAIN[@]}" --batch-sizes 4 \
    --variants "$B4" --out "$OUT/gpu-train_throughput.json"
# 2. torch.compile and fused Adam (compilation takes most of this), with the baseline again for the ratio.
step train-compile 200 "$PY" benchmarks/train_throughput.py --device "$DEVICE" "${TRAIN[@]}" --batch-sizes 4 \
    --variants "$COMPILE" --out "$OUT/gpu-train_throughput-compile.json"
# 3. Larger batches, up to the largest that fits.
step train-batches 120 "$PY" benchmarks/train_throughput.py --device "$DEVICE" "${TRAIN[@]}" \
    --batch-sizes "$([[ -n "${QUICK:-}" ]] && echo 8 || echo 8,16,max)" --variants "$BATCHES" \
    --out "$OUT/gpu-train_throughput-batches.json"
# 4. 1280x720 inference, both models.
step inference 90 "$PY" benchmarks/inference.py --device "$DEVICE" "${INFER[@]}" --out "$OUT/gpu-inference.json"
tail -n 60 "$log"
ls "$OUT"
