#!/bin/bash
# The whole pipeline on a GPU, with the CPU side by side where they do the same work:
# synth -> preprocess (base, and one slide dense on the GPU and on the CPU) -> sparse training with
# lookahead 0/1/2 on the GPU (benchmarks/sparse_lookahead.py) -> predict on the GPU and on the CPU.
# Each step's wall time goes to OUT/times.txt, its output to OUT/<step>.log.
#
# usage: bash benchmarks/gpu_pipeline.sh OUT [DEVICE] [PYTHON]
#   9 slides of 30720 x 24576 px at 1.0 um/px (6 train, 3 validation), 2 epochs; run from the repository root.
#   WIDTH, HEIGHT and EPOCHS in the environment change those (a quick check: WIDTH=8192 HEIGHT=6144).
set -u
OUT=${1:?usage: gpu_pipeline.sh OUT [DEVICE] [PYTHON]}; DEV=${2:-cuda}; PY=${3:-python}
Z="$PY -m zoompipe.cli.main"
W=$OUT/work
mkdir -p "$W"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() {  # step NAME COMMAND...: run, log, time
  local name=$1; shift
  local start; start=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}") s rc=$rc" | tee -a "$OUT/times.txt"
}
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" \
    | tee -a "$OUT/times.txt"
step synth $Z synth "$W/cohort" --n 9 --width "${WIDTH:-30720}" --height "${HEIGHT:-24576}" --mpp 1.0 --seed 3 --jobs "$(nproc)"
step base_features $Z preprocess "$W/cohort/slides" --out "$W/base" --magnifications 1.25 --device "$DEV" --precision fp32 --workers 8
first=$(ls "$W"/cohort/slides/*.svs | head -1)
for device in "$DEV" cpu; do
  step "dense_one_slide_$device" $Z preprocess "$first" --out "$W/dense_$device" --magnifications 1.25,2.5,10 \
      --device "$device" --precision fp32 --workers 8 --batch-size 64
done
(echo slide_id,split; for i in 0 1 2 3 4 5; do echo cohort_00$i,train; done; for i in 6 7 8; do echo cohort_00$i,val; done) \
    > "$W/splits.csv"
step sparse_lookahead $PY benchmarks/sparse_lookahead.py --features "$W/base/features" --labels "$W/cohort/labels.csv" \
    --splits "$W/splits.csv" --epochs "${EPOCHS:-2}" --lookaheads 0,1,2 --device "$DEV" --out "$W/ahead"
for device in "$DEV" cpu; do
  step "predict_$device" $Z predict $(ls "$W"/cohort/slides/*.svs | head -3) --out "$W/predict_$device" \
      --device "$device" --profile
done
