"""Sparse training with a teacher, simulated: can what an exploration budget embeds teach the zoom?

``zoompipe train --sparse --explore-budget F`` lets the base step zoom only into each slide's
cover (:func:`zoompipe.sparse.explore_cover`), so training embeds only the children of those
patches. ``--teacher``, which gives the zoom heads their target on the dense benchmark, needs
every slide's dense 10x bag, which sparse training does not have. This script asks whether a
teacher trained on what the budget embeds would do, on a dense cohort (a ``zoom_vs_full.py``
folder) standing in for the slides:

1. for each slide, a feature file with the base grid in full and, above it, only the children
   of its cover: what a budgeted sparse run embeds;
2. per fold, ABMIL at the last magnification trained on those files (train and validation
   slides): the teacher;
3. ZoomMIL taught by it (``--teacher``, ``--teacher-target``), the training slides' files cut to
   the cover, the validation slides' dense (validation's hard top-K zooms anywhere, and sparse
   training embeds what it picks);
4. both scored on the dense test files: weighted F1, lesions reached, attention inside lesions
   (``lesion_attention.py``).

The patches counted are those of step 1 for the fold's training and validation slides, against
their dense count; what validation's hard top-K adds outside the cover is not counted.

``--per-parent M`` replaces the cover with a sub-grid: every base and middle patch, and at the last
magnification at most M children of each parent, drawn at random once per slide (1 of the 16 10x
children of a 2.5x patch). The teacher then sees every region of the tissue, thinly, instead of
each slide's most unusual patches; ZoomMIL's validation slides are cut to the sub-grid as well, so
nothing outside it is embedded during training. Test stays dense, as ``predict`` reads the slide.

Usage::

    python benchmarks/sparse_teacher.py --bench bench40 --out bench_teacher --budget 0.15 --seeds 0
    python benchmarks/sparse_teacher.py --bench bench40 --out bench_subgrid --per-parent 1 --seeds 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score
import torch

from lesion_attention import slide_localisation
from zoompipe.dataset import read_labels, read_splits
from zoompipe.features import FeatureFile, read_feature_file
from zoompipe.grid import children_index
from zoompipe.model import load_run
from zoompipe.model.topk import selectable_count, topk_indices
from zoompipe.model.zoommil import patches_to_zoom
from zoompipe.sparse import FeatureCache, explore_cover
from zoompipe.train import train_model
from zoompipe.train_defaults import DEFAULT_TAUGHT_ATTENTION_TARGET_WEIGHT, DEFAULT_TEACHER_TARGET, TEACHER_TARGETS


def _empty_cache(dense: Path, out: Path) -> tuple[FeatureFile, FeatureCache]:
    """``dense``'s feature file and a new sparse cache at ``out`` holding its base group only."""
    ff = read_feature_file(dense)
    out.unlink(missing_ok=True)  # a cache file that exists would be read back into the new one
    return ff, FeatureCache(out, ff.grids, ff.contract, ff.attrs, ff.features[0])


def _saved(cache: FeatureCache, ff: FeatureFile) -> tuple[int, int]:
    """Save ``cache``; (rows it holds, rows of the dense file ``ff``)."""
    cache.save()
    return sum(cache.count(level) for level in range(len(ff.grids))), sum(len(g) for g in ff.grids)


def write_cover_file(dense: Path, out: Path, budget: float, k: float) -> tuple[int, int]:
    """Write the sparse cache that a budgeted run would fill for ``dense``'s slide: its base grid and
    the descendants of its cover, features taken from ``dense``; (rows kept, rows in all)."""
    ff, cache = _empty_cache(dense, out)
    rows = np.flatnonzero(explore_cover(ff.features[0], children_index(ff.grids[0], ff.grids[1]), budget,
                                        patches_to_zoom(k, len(ff.grids[0])), ff.grids[0].tissue))
    for level, (grid, features) in enumerate(zip(ff.grids[1:], ff.features[1:]), start=1):
        rows = np.flatnonzero(np.isin(grid.parent, rows))
        cache.add(level, rows, features[rows])
    return _saved(cache, ff)


def write_subgrid_file(dense: Path, out: Path, per_parent: int, seed: int) -> tuple[int, int]:
    """Write ``dense``'s slide with every patch below the last magnification and, at the last, at most
    ``per_parent`` children of each parent drawn at random (``seed``); (rows kept, rows in all)."""
    ff, cache = _empty_cache(dense, out)
    for level in range(1, len(ff.grids) - 1):
        cache.add(level, np.arange(len(ff.grids[level])), ff.features[level])
    last = ff.grids[-1]
    order = np.random.default_rng(seed).permutation(len(last))
    # The first per_parent children of each parent in the random order: the per-parent top-K that
    # the zoom uses, on scores that fall along that order.
    priority = torch.empty(len(last))
    priority[torch.from_numpy(order)] = -torch.arange(len(last), dtype=torch.float32)
    groups = torch.from_numpy(last.parent).long()
    count = selectable_count(torch.ones(1, len(last), dtype=torch.bool), groups, per_parent)
    rows = topk_indices(priority, count, groups, per_parent).numpy()
    cache.add(len(ff.grids) - 1, rows, ff.features[-1][rows])
    return _saved(cache, ff)


def linked_features(folder: Path, splits: dict[str, str], sparse: Path, dense: Path, cut: set[str]) -> Path:
    """A features folder whose slides of the splits in ``cut`` link to the sparse files (cover or sub-grid),
    the rest to the dense."""
    folder.mkdir(parents=True, exist_ok=True)
    for slide_id, split in splits.items():
        link = folder / f"{slide_id}.h5"
        target = (sparse if split in cut else dense) / f"{slide_id}.h5"
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target.resolve())
    return folder


def score(run: Path, bench: Path, labels: dict[str, str]) -> dict:
    """Test weighted F1 on the dense files, with the lesions reached and the attention inside them."""
    dense = bench / "pre" / "features"
    model, config = load_run(run)
    splits = read_splits(run / "splits.csv")
    with torch.no_grad():
        slides = [slide_localisation(model, config.class_names, dense, bench / "cohort" / "regions", s)
                  for s in sorted(s for s in labels if splits.get(s) == "test")]
    # The eval forward's predictions, so each test slide runs through the model once; the
    # weighted F1 of evaluate_run over the same predictions.
    f1 = f1_score([labels[e["slide_id"]] for e in slides], [e["predicted"] for e in slides],
                  labels=config.class_names, average="weighted", zero_division=0)
    return {"weighted_f1": float(f1),
            "best_val_f1": json.loads((run / "train_summary.json").read_text())["best_val_f1"],
            "lesions_reached": sum(e["lesions_reached"] for e in slides) / max(sum(e["lesions"] for e in slides), 1),
            "attention_in_lesions": float(np.mean([e["attention_in_lesions"] for e in slides]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, required=True, help="a zoom_vs_full.py output folder (dense features)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=0.15, help="share of each slide's base patches explored")
    parser.add_argument("--per-parent", type=int, default=0,
                        help="instead of the cover: every patch below the last magnification and at most this many "
                             "random children of each parent at the last (0: the cover)")
    parser.add_argument("--folds", type=lambda t: [int(f) for f in t.split(",")], default=[0, 1, 2, 3, 4])
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0])
    parser.add_argument("--k", type=float, default=0.125)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--attn-hidden", type=int, default=64)
    parser.add_argument("--teacher-weight-decay", type=float, default=0.0,
                        help="the teacher's Adam weight decay (its bags are small enough to learn by heart)")
    parser.add_argument("--teacher-target", choices=TEACHER_TARGETS, default=DEFAULT_TEACHER_TARGET,
                        help="what ZoomMIL's zoom heads follow (zoompipe train --teacher-target)")
    parser.add_argument("--attention-target-weight", type=float, default=DEFAULT_TAUGHT_ATTENTION_TARGET_WEIGHT,
                        help="pull of ZoomMIL's last attention towards the teacher's target "
                             "(zoompipe train --attention-target-weight)")
    args = parser.parse_args()
    labels_csv = args.bench / "cohort" / "labels.csv"
    labels = read_labels(labels_csv)
    dense = args.bench / "pre" / "features"
    sparse = args.out / (f"subgrid{args.per_parent}" if args.per_parent else f"cover{args.budget:g}")
    sparse.mkdir(parents=True, exist_ok=True)
    counts = {}
    for index, slide_id in enumerate(sorted(labels)):
        if args.per_parent:
            counts[slide_id] = write_subgrid_file(dense / f"{slide_id}.h5", sparse / f"{slide_id}.h5",
                                                  args.per_parent, seed=index)
        else:
            counts[slide_id] = write_cover_file(dense / f"{slide_id}.h5", sparse / f"{slide_id}.h5", args.budget,
                                                args.k)
    # A budgeted run's validation reads outside the cover (not counted); a sub-grid run's does not.
    zoom_cut = {"train", "val"} if args.per_parent else {"train"}
    common = {"epochs": args.epochs, "lr": args.lr, "lr_patience": 0, "hidden": args.hidden,
              "attn_hidden": args.attn_hidden, "progress": False}
    results = []
    for fold in args.folds:
        splits_csv = args.bench / "splits" / f"fold{fold}.csv"
        splits = read_splits(splits_csv)
        used = [counts[s] for s in splits if splits[s] in ("train", "val")]
        kept, total = sum(c[0] for c in used), sum(c[1] for c in used)
        for seed in args.seeds:
            name = f"fold{fold}_seed{seed}"
            teacher = args.out / "teacher" / name
            if not (teacher / "train_summary.json").exists():
                train_model(linked_features(args.out / "features" / f"teacher_fold{fold}", splits, sparse, dense,
                                            {"train", "val"}),
                            labels_csv, teacher, architecture="abmil", splits_csv=splits_csv,
                            magnifications=[10.0], weight_decay=args.teacher_weight_decay, seed=seed, **common)
            zoom = args.out / "zoommil" / name
            if not (zoom / "train_summary.json").exists():
                train_model(linked_features(args.out / "features" / f"zoommil_fold{fold}", splits, sparse, dense,
                                            zoom_cut),
                            labels_csv, zoom, splits_csv=splits_csv, magnifications=[1.25, 2.5, 10.0], k=args.k,
                            teacher=teacher, teacher_target=args.teacher_target,
                            attention_target_weight=args.attention_target_weight, seed=seed,
                            **common)
            entry = {"fold": fold, "seed": seed, "patches_embedded": kept, "dense_patches": total,
                     "teacher": score(teacher, args.bench, labels), "zoommil": score(zoom, args.bench, labels)}
            results.append(entry)
            print(f"fold {fold} seed {seed}: patches {kept} of {total} ({total / kept:.2f}x fewer); "
                  f"teacher val {entry['teacher']['best_val_f1']:.3f}, dense test F1 {entry['teacher']['weighted_f1']:.3f}; "
                  f"ZoomMIL val {entry['zoommil']['best_val_f1']:.3f}, test F1 {entry['zoommil']['weighted_f1']:.3f}, "
                  f"lesions {entry['zoommil']['lesions_reached']:.0%}, "
                  f"attention inside {entry['zoommil']['attention_in_lesions']:.0%}", flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": results}, indent=1))
    f1 = [r["zoommil"]["weighted_f1"] for r in results]
    print(f"ZoomMIL taught on the {sparse.name}: mean test weighted F1 {100 * np.mean(f1):.1f} over {len(f1)} runs")


if __name__ == "__main__":
    main()
