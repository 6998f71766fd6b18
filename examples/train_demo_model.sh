#!/usr/bin/env bash
# Train the demo model that ships in zoompipe/demo_model/ (what `zoompipe predict` uses without
# --model), with the project's own commands, on a small synthetic lesion cohort.
#
#   bash examples/train_demo_model.sh [WORK_DIR]       (about 5 minutes on 2 cores)
set -euo pipefail
WORK=${1:-demo_training}
ZP=${ZOOMPIPE:-$(command -v .venv/bin/zoompipe || command -v zoompipe)}
DEST=$(dirname "$0")/../zoompipe/demo_model

$ZP synth "$WORK/cohort" --n 24 --width 20480 --height 16384 --seed 1 --jobs 2
$ZP preprocess "$WORK/cohort/slides" --out "$WORK/pre"
# The teacher (ABMIL on the dense 10x bags), then ZoomMIL taught by it, as examples/walkthrough.sh
# trains (the shipped model was trained when the zoom heads followed the teacher's evidence, the
# default until --teacher-target own-evidence replaced it; add --teacher-target evidence to remake
# it). Narrow heads keep the shipped weights small (a few MB); K = N/8 (the default), 2 of the
# 10-14 base patches of these slides.
$ZP train --features "$WORK/pre/features" --labels "$WORK/cohort/labels.csv" --splits "$WORK/cohort/splits.csv" \
    --out "$WORK/teacher" --architecture abmil --magnifications 10 --hidden 128 --attn-hidden 64 --epochs 60 --seed 0
$ZP train --features "$WORK/pre/features" --labels "$WORK/cohort/labels.csv" --splits "$WORK/cohort/splits.csv" \
    --out "$WORK/run" --hidden 128 --attn-hidden 64 --epochs 60 --seed 0 --teacher "$WORK/teacher"
$ZP evaluate --model "$WORK/run" --features "$WORK/pre/features" --labels "$WORK/cohort/labels.csv" \
    --split test --out "$WORK/eval"
mkdir -p "$DEST"
cp "$WORK/run/model.safetensors" "$WORK/run/config.json" "$DEST/"
echo "demo model written to $DEST ($(du -sh "$DEST" | cut -f1)); test metrics in $WORK/eval/metrics.json"
