#!/usr/bin/env bash
# zoompipe end to end on a synthetic cohort small enough for a laptop (about 4 minutes on 2 cores):
# synth -> preprocess -> train the teacher -> train ZoomMIL -> evaluate -> predict -> heatmap.
#
#   bash examples/walkthrough.sh [OUT]        (default OUT=walkthrough; uses .venv/bin/zoompipe if present)
set -euo pipefail
OUT=${1:-walkthrough}
ZP=${ZOOMPIPE:-$(command -v .venv/bin/zoompipe || command -v zoompipe)}

# 1. 18 slides, 3 classes: lesions visible at 1.25x in every class, the class only at 10x.
$ZP synth "$OUT/cohort" --n 18 --width 20480 --height 16384 --jobs 2

# 2. Tissue, grids at 1.25x / 2.5x / 10x, features of every patch (what training needs).
#    Look at $OUT/pre/masks/*.png: tissue outlines and the 1.25x grid.
$ZP preprocess "$OUT/cohort/slides" --out "$OUT/pre"

# 3. The teacher: ABMIL on the dense 10x bags. Its per-patch class evidence tells the zoom heads
#    where the diagnosis is, for every class (README, "Where the attention looks").
$ZP train --features "$OUT/pre/features" --labels "$OUT/cohort/labels.csv" \
    --splits "$OUT/cohort/splits.csv" --out "$OUT/teacher" --epochs 40 \
    --architecture abmil --magnifications 10

# 4. ZoomMIL, zooming into K = N/8 of each slide's base patches per step (the default), its last
#    level and classifier started from the teacher, its zoom heads following that level's evidence,
#    and its 10x attention pulled towards the teacher's evidence (the defaults with a teacher) so
#    that the heatmaps show the lesions of every class (README, "What the zoom heads follow").
$ZP train --features "$OUT/pre/features" --labels "$OUT/cohort/labels.csv" \
    --splits "$OUT/cohort/splits.csv" --out "$OUT/run" --epochs 40 --teacher "$OUT/teacher"

# 5. Test-split metrics on the dense features: accuracy, weighted F1, AUC, confusion matrix.
$ZP evaluate --model "$OUT/run" --features "$OUT/pre/features" --labels "$OUT/cohort/labels.csv" \
    --split test --out "$OUT/eval"

# 6. From the raw test slides, reading 2.5x and 10x only where the model zooms.
TEST=$(awk -F, '$2 == "test" {print $1}' "$OUT/cohort/splits.csv" | sed "s|^|$OUT/cohort/slides/|; s|$|.svs|")
$ZP predict $TEST --model "$OUT/run" --out "$OUT/predictions" --heatmap --geojson --profile

# 7. Heatmaps can be redrawn from a saved prediction.
FIRST=$(basename "$(echo "$TEST" | head -n 1)" .svs)
$ZP heatmap "$OUT/predictions/$FIRST.json" "$OUT/cohort/slides/$FIRST.svs" --out "$OUT/heatmaps"
echo "done: see $OUT/eval/metrics.json and $OUT/predictions/*_panel.png"
