"""Where trained runs look, per class: their last magnification's attention inside the lesions.

The zoom benchmark (``zoom_vs_full.py``) reports, per fold, the share of ZoomMIL's 10x attention
inside the cohort's lesions. This script splits that share by the slides' class, for any runs
(ABMIL at 10x over its dense bag, ZoomMIL over the 10x patches it zoomed into), scored on the
dense feature files of a ``zoom_vs_full.py`` output folder: the model's eval forward, which is
what ``predict`` computes from the raw slides (``tests/test_engine.py``). A zoom target taken
from a model's attention teaches the zoom heads to look where that model looks, class by class.
A third table says which zoom head lost the lesions that no 10x patch read reaches, and how far
below its K it ranked them.

Usage::

    python benchmarks/lesion_attention.py --bench bench40 --runs RUN [RUN ...] [--split test|val|all]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.metrics import f1_score

from zoom_vs_full import lesion_labels, localise
from zoompipe.dataset import feature_path, read_bags, read_labels, read_splits
from zoompipe.features import read_feature_file
from zoompipe.model import load_run


def slide_localisation(model: torch.nn.Module, class_names: list[str], features: Path, regions_dir: Path,
                       slide_id: str) -> dict:
    """Prediction and localisation of one slide by a model in eval mode, from its dense feature file."""
    path = feature_path(features, slide_id)
    magnifications = model.config.magnifications
    bags, children, coords = read_bags(path, magnifications)
    with torch.no_grad():
        out = model(bags, children)
    last = read_feature_file(path, magnifications[-1:], load_features=False).grids[0]
    slide_mpp = last.patch_size * last.mpp / last.patch_size_level0
    rows = out.rows[-1].numpy()
    boxes = np.concatenate([coords[-1][rows], coords[-1][rows] + last.patch_size_level0], axis=1)
    regions = cv2.imread(str(regions_dir / f"{slide_id}.png"), cv2.IMREAD_UNCHANGED)
    hit, n_lesions, mass = localise(boxes, out.attention[-1].numpy(), regions, slide_mpp)
    _, _, share = localise(boxes, np.full(len(rows), 1 / len(rows)), regions, slide_mpp)
    lesion_of = lesion_labels(np.concatenate([coords[-1], coords[-1] + last.patch_size_level0], axis=1),
                              regions, slide_mpp)
    # The lesions under every patch of every magnification, from the last one down.
    below = [[{int(label)} - {0} for label in lesion_of]]
    for index in reversed(children):
        below.insert(0, [set().union(*(below[0][c] for c in row if c >= 0)) for row in index.tolist()])
    # Where a lesion is lost: each zoom head ranks the patches of its bag and keeps K; a lesion
    # under some patch of that bag (one of the patch's last-magnification descendants lies in it)
    # and under none of the K was lost by that head. ``under`` counts the lesions under the
    # patches read at each middle magnification; ``missed`` gives, per lost lesion, the head, the
    # rank (1 = first) of the best patch over it, K, and how many of the K lay on other lesions.
    under, missed = {}, []
    for step in range(len(magnifications) - 1):
        lesions = [below[step][row] for row in out.rows[step].tolist()]
        present = set().union(*lesions)
        if step > 0:
            under[f"{magnifications[step]:g}x"] = len(present)
        chosen = np.flatnonzero(np.isin(out.rows[step].numpy(), out.selected[step].numpy()))
        kept = set().union(*(lesions[i] for i in chosen))
        on_lesions = sum(bool(lesions[i]) for i in chosen)
        rank = np.empty(len(lesions), dtype=int)
        rank[np.argsort(-out.selection_scores[step].numpy(), kind="stable")] = np.arange(1, len(lesions) + 1)
        for lesion in sorted(present - kept):
            missed.append({"head": f"{magnifications[step]:g}x", "k": len(chosen),
                           "rank": int(min(rank[i] for i, found in enumerate(lesions) if lesion in found)),
                           "k_on_lesions": on_lesions})
    return {"slide_id": slide_id, "predicted": class_names[int(out.logits.argmax())],
            "lesions_reached": hit, "lesions": n_lesions, "lesions_under": under, "missed": missed,
            "attention_in_lesions": mass,
            "patches_in_lesions": share, "patches_read": int(sum(len(r) for r in out.rows))}


def float_magnification(name: str) -> float:
    """``"2.5x"`` -> 2.5."""
    return float(name.rstrip("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, required=True,
                        help="a zoom_vs_full.py output folder (cohort/labels.csv, cohort/regions, pre/features)")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders, each with its splits.csv")
    parser.add_argument("--split", default="test",
                        help="the split of each run to score; 'all': every slide of --bench, for a cohort that "
                             "no run was trained or tuned on")
    parser.add_argument("--out", type=Path, help="write every slide's figures here as JSON")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    labels = read_labels(args.bench / "cohort" / "labels.csv")
    slides = []
    for run in args.runs:
        model, config = load_run(run)
        splits = read_splits(run / "splits.csv")
        for slide_id in sorted(s for s in labels if args.split in ("all", splits.get(s))):
            entry = slide_localisation(model, config.class_names, args.bench / "pre" / "features",
                                       args.bench / "cohort" / "regions", slide_id)
            slides.append({"run": str(run), "label": labels[slide_id], **entry})
    print(f"{len(args.runs)} runs, {args.split} slides\n")
    middle = sorted({m for e in slides for m in e["lesions_under"]}, key=float_magnification)
    print("| run | slides right | weighted F1 | " + "".join(f"lesions under the {m} patches read | " for m in middle)
          + "lesions reached | attention inside lesions | patches read / slide |")
    print("|---|---|---|---|" + "---|" * len(middle) + "---|---|")
    for run in args.runs:
        group = [e for e in slides if e["run"] == str(run)]
        lesions = max(sum(e["lesions"] for e in group), 1)
        f1 = f1_score([e["label"] for e in group], [e["predicted"] for e in group], average="weighted", zero_division=0)
        print(f"| {run} | {sum(e['predicted'] == e['label'] for e in group)} / {len(group)} | {100 * f1:.1f} | "
              + "".join(f"{100 * sum(e['lesions_under'][m] for e in group) / lesions:.0f}% | "
                        if m in group[0]["lesions_under"] else "- | " for m in middle)
              + f"{100 * sum(e['lesions_reached'] for e in group) / lesions:.0f}% "
              f"| {100 * np.mean([e['attention_in_lesions'] for e in group]):.0f}% "
              f"| {np.mean([e['patches_read'] for e in group]):.0f} |")
    by_class: dict[str, list[dict]] = defaultdict(list)
    for entry in slides:
        by_class[entry["label"]].append(entry)
    print("\n| class | slides | right | lesions reached | attention inside lesions "
          "| last-magnification patches read inside lesions |")
    print("|---|---|---|---|---|---|")
    for name in sorted(by_class):
        group = by_class[name]
        right = sum(e["predicted"] == name for e in group)
        reached = sum(e["lesions_reached"] for e in group) / max(sum(e["lesions"] for e in group), 1)
        print(f"| {name} | {len(group)} | {right} | {100 * reached:.0f}% "
              f"| {100 * np.mean([e['attention_in_lesions'] for e in group]):.0f}% "
              f"| {100 * np.mean([e['patches_in_lesions'] for e in group]):.1f}% |")
    missed = [m for e in slides for m in e["missed"]]
    if missed:
        print("\n| zoom head | lesions it lost | ranked K + 1 to K + 3 | ranked lower "
              "| lost with all K chosen on other lesions |")
        print("|---|---|---|---|---|")
        for head in sorted({m["head"] for m in missed}, key=float_magnification):
            lost = [m for m in missed if m["head"] == head]
            near = sum(m["rank"] - m["k"] <= 3 for m in lost)
            print(f"| {head} | {len(lost)} | {near} | {len(lost) - near} "
                  f"| {sum(m['k_on_lesions'] == m['k'] for m in lost)} |")
    if args.out:
        args.out.write_text(json.dumps(slides, indent=1))


if __name__ == "__main__":
    main()
