"""What ``--precision int8`` changes in predictions: the same slides, the same model, fp32 and int8.

Writes (once, kept) a small lesion cohort (``zoompipe.synthetic.write_cohort``) and predicts
every slide with a trained run twice in one process, the encoder in OpenVINO fp32 and in
OpenVINO int8, slide by slide in alternation so that other load falls on both alike. Reports,
over the slides:

- the predicted class: agreement between the two, and accuracy of each against the labels;
- the probabilities: largest and mean absolute difference;
- the zoom: per magnification above the base, the share of int8's patches that fp32 read too
  (the regions the cascade chose);
- the encoder's rate (patches embedded / seconds reading and embedding them), each.

Usage: python benchmarks/int8_predictions.py [--out bench_int8] [--n 9] [--model RUN_DIR]
       (default model: the demo model; needs: pip install nncf)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the zoompipe CLI does (cli/main.py)

import argparse  # noqa: E402
from pathlib import Path

import numpy as np

from zoompipe.engine import ZoomPredictor
from zoompipe.predict import demo_run_dir
from zoompipe.prediction import Prediction
from zoompipe.synthetic import write_cohort

PRECISIONS = ("fp32", "int8")


def shared_patches(a: Prediction, b: Prediction) -> list[float]:
    """Per magnification above the base, the share of ``b``'s patches that ``a`` read too."""
    shares = []
    for ours, theirs in zip(a.magnifications[1:], b.magnifications[1:]):
        boxes = {tuple(box) for box in ours.boxes.tolist()}
        shares.append(np.mean([tuple(box) in boxes for box in theirs.boxes.tolist()]) if len(theirs.boxes) else 1.0)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_int8"))
    parser.add_argument("--n", type=int, default=9, help="slides (classes in turn)")
    parser.add_argument("--width", type=int, default=20480)
    parser.add_argument("--height", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=11, help="cohort seed (the demo model was trained on others)")
    parser.add_argument("--model", type=Path, default=None, help="run folder [default: the demo model]")
    args = parser.parse_args()

    rows = write_cohort(args.out / "cohort", args.n, seed=args.seed, width=args.width, height=args.height, jobs=2)
    run = args.model or demo_run_dir()
    predictors = {p: ZoomPredictor(run, precision=p, runtime="openvino") for p in PRECISIONS}
    results: dict[str, list[Prediction]] = {p: [] for p in PRECISIONS}
    for row in rows:
        for precision, predictor in predictors.items():
            results[precision].append(predictor.predict(row["path"]))

    labels = [row["label"] for row in rows]
    fp32, int8 = results["fp32"], results["int8"]
    agree = np.mean([a.predicted == b.predicted for a, b in zip(fp32, int8)])
    diff = np.abs(np.stack([a.probabilities for a in fp32]) - np.stack([b.probabilities for b in int8]))
    shares = np.array([shared_patches(a, b) for a, b in zip(fp32, int8)])
    print(f"model {run}, {len(rows)} slides of {args.width} x {args.height} px (cohort seed {args.seed})")
    for precision in PRECISIONS:
        predictions = results[precision]
        accuracy = np.mean([p.predicted == label for p, label in zip(predictions, labels)])
        embedded = sum(m.patches_embedded for p in predictions for m in p.magnifications)
        seconds = sum(m.seconds for p in predictions for m in p.magnifications)
        print(f"{precision}: accuracy {accuracy:.2f}, encoder {embedded / seconds:.1f} patches/s "
              f"({embedded} patches)")
    print(f"same predicted class: {agree:.2f}; |probability difference| max {diff.max():.3f}, mean {diff.mean():.3f}")
    names = [f"{m.magnification:g}x" for m in fp32[0].magnifications[1:]]
    print("int8's zoomed patches that fp32 read too: "
          + ", ".join(f"{name} {share:.2f} (min {low:.2f})"
                      for name, share, low in zip(names, shares.mean(axis=0), shares.min(axis=0))))


if __name__ == "__main__":
    main()
