#!/usr/bin/env bash
# Train the demo model that ships in zoompipe/demo_model/ (what `zoompipe predict` uses without
# --model), with the project's own commands, on a small synthetic lesion cohort.
#
#   bash examples/train_demo_model.sh [WORK_DIR]       (about 20 minutes on 2 cores)
set -euo pipefail
WORK=${1:-demo_training}
ZP=${ZOOMPIPE:-$(command -v .venv/bin/zoompipe || command -v zoompipe)}
DEST=$(dirname "$0")/../zoompipe/demo_model

$ZP synth "$WORK/cohort" --n 24 --width 20480 --height 16384 --seed 1 --jobs 2
$ZP preprocess "$WORK/cohort/slides" --out "$WORK/pre"
# Narrow heads keep the shipped weights small (a few MB); K = 3 of about 12 base patches.
$ZP train --features "$WORK/pre/features" --labels "$WORK/cohort/labels.csv" --splits "$WORK/cohort/splits.csv" \
    --out "$WORK/run" --k 3 --hidden 128 --attn-hidden 64 --epochs 60 --seed 0
$ZP evaluate --model "$WORK/run" --features "$WORK/pre/features" --labels "$WORK/cohort/labels.csv" \
    --split test --out "$WORK/eval"
mkdir -p "$DEST"
cp "$WORK/run/model.safetensors" "$WORK/run/config.json" "$DEST/"
echo "demo model written to $DEST ($(du -sh "$DEST" | cut -f1)); test metrics in $WORK/eval/metrics.json"
