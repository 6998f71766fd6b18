"""Sparse vs dense zoom training: the same ZoomMIL, trained with and without every child embedded.

On one synthetic lesion cohort (``zoompipe.synthetic.write_cohort``), one encoder and precision:

1. ``preprocess`` the cohort twice: the dense cascade (every patch of 1.25x, 2.5x, 10x, what
   dense training reads) and the base alone (``--magnifications 1.25``, what sparse training
   reads); each is timed;
2. for each fold of ``make_splits`` (fold f test, f + 1 validation), train ZoomMIL densely and
   sparsely with the same seed and settings (sparse with a fresh cache per fold, so its count is
   what one training run costs), each timed;
3. score both on the fold's test slides with ``evaluate_run`` on the dense test features (the
   same numbers as ``zoompipe predict`` on the raw slides, tests/test_engine.py).

Patches: dense training needs every patch of the cascade of its training and validation slides;
sparse training, their base patches plus whatever it embedded (``train_summary.json``, key
``sparse``). Wall time: preprocessing of the whole cohort plus training, per method.

Writes ``OUT/folds/foldN.json`` per fold, and ``OUT/results.json`` and ``OUT/results.md`` over every
fold run so far with the same settings (``--only-folds`` runs add up); the cohort and
preprocessing are reused.

Usage::

    python benchmarks/sparse_training.py --out bench_sparse                     # 60 slides, 5 folds
    python benchmarks/sparse_training.py --out bench_sparse_tiny --n 9 --width 16384 --height 12288 \\
        --folds 3 --epochs 10                                                   # a tiny cohort
    python benchmarks/sparse_training.py --out bench_sparse10 --cohort-from bench40 --sample 4 \\
        --epochs 60 --lr 2e-4 --k 0.125 --hidden 128 --lr-patience 0            # the zoom benchmark's cohort

``--cohort-from BENCH`` takes the cohort, dense features and folds of a
``benchmarks/zoom_vs_full.py`` output folder (its slides were preprocessed long before, so dense
preprocessing is timed again on ``--sample`` slides and scaled to the cohort by patch count: the
same per-patch cost, which is the encoder's). The base features are made and timed here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the zoompipe CLI does (cli/main.py)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from zoompipe.atomic import write_text  # noqa: E402
from zoompipe.dataset import make_splits, read_labels, write_splits  # noqa: E402
from zoompipe.evaluate import evaluate_run  # noqa: E402
from zoompipe.features import read_feature_file  # noqa: E402
from zoompipe.preprocess import PreprocessConfig, preprocess_slides  # noqa: E402
from zoompipe.sparse import SparseSettings  # noqa: E402
from zoompipe.synthetic import write_cohort  # noqa: E402
from zoompipe.train import train_model  # noqa: E402
from zoompipe.train_defaults import DEFAULT_CHILDREN_PER_PARENT, DEFAULT_LR_PATIENCE, DEFAULT_WARMUP  # noqa: E402

CASCADE = [1.25, 2.5, 10.0]


def preprocess(slides: list[str], out: Path, magnifications: list[float], args: argparse.Namespace) -> float:
    """Preprocess (or reuse) and return the seconds it took, as recorded when it ran."""
    if (out / "seconds.json").exists():
        return json.loads((out / "seconds.json").read_text())["seconds"]
    start = time.perf_counter()
    config = PreprocessConfig(magnifications=magnifications, precision=args.precision, workers=args.workers)
    failed = [s for s in preprocess_slides(slides, out, config, progress=True) if s.status == "failed"]
    if failed:
        raise SystemExit(f"preprocess failed: {failed}")
    seconds = time.perf_counter() - start
    (out / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def patch_count(feature_file: Path) -> int:
    """Patches of every magnification of a feature file."""
    return sum(len(grid) for grid in read_feature_file(feature_file, load_features=False).grids)


def scaled_dense_seconds(slides: list[str], features: Path, out: Path, args: argparse.Namespace) -> float:
    """Dense preprocessing of the cohort: ``--sample`` slides timed here, scaled by patch count."""
    sample = slides[:: max(1, len(slides) // args.sample)][: args.sample]
    seconds = preprocess(sample, out, CASCADE, args)
    done = sum(patch_count(out / "features" / f"{Path(s).stem}.h5") for s in sample)
    total = sum(patch_count(features / f"{Path(s).stem}.h5") for s in slides)
    return seconds * total / done


def with_limit(settings: dict) -> dict:
    """A fold's recorded settings; folds run before the per-parent limit existed had none (0)."""
    return {"children_per_parent": 0, **settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_sparse"))
    parser.add_argument("--n", type=int, default=60, help="slides in the cohort")
    parser.add_argument("--width", type=int, default=61440, help="slide width in pixels at --mpp")
    parser.add_argument("--height", type=int, default=49152)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--grade-strength", type=float, default=0.25)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", type=lambda t: [int(v) for v in t.split(",")], default=None,
                        help="run these test folds only (e.g. 0,1): a partial run, said so in the table")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--k", type=float, default=0.25)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-patience", type=int, default=DEFAULT_LR_PATIENCE,
                        help="epochs without a lower validation loss before the learning rate falls (0: constant)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--zoom-target-weight", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP,
                        help="fraction of the epochs on the zoom target alone (train --warmup), for both")
    parser.add_argument("--explore-budget", type=float, default=None,
                        help="train --explore-budget of the sparse runs (default: no limit)")
    parser.add_argument("--dense-from", type=Path, default=None,
                        help="take each fold's dense result from this earlier output folder, where it was run "
                             "with the same settings (dense training does not depend on the sparse ones)")
    parser.add_argument("--children-per-parent", type=int, default=DEFAULT_CHILDREN_PER_PARENT,
                        help="children a zoom step may take from one parent (0: no limit) [default: the training default]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cohort-from", type=Path, default=None,
                        help="a zoom_vs_full.py output folder: its cohort, dense features and folds")
    parser.add_argument("--sample", type=int, default=4, help="with --cohort-from: slides to time dense preprocessing")
    args = parser.parse_args()
    out: Path = args.out
    if args.cohort_from:
        bench: Path = args.cohort_from
        labels_csv = bench / "cohort" / "labels.csv"
        slides = [str(bench / "cohort" / "slides" / f"{slide_id}.svs") for slide_id in read_labels(labels_csv)]
        features = {"dense": bench / "pre" / "features", "sparse": out / "base" / "features"}
        seconds = {"dense": scaled_dense_seconds(slides, features["dense"], out / "dense_sample", args),
                   "sparse": preprocess(slides, out / "base", CASCADE[:1], args)}
    else:
        rows = write_cohort(out / "cohort", args.n, width=args.width, height=args.height, mpp=args.mpp,
                            n_classes=args.classes, grade_strength=args.grade_strength)
        slides = [r["path"] for r in rows]
        labels_csv = out / "cohort" / "labels.csv"
        seconds = {"dense": preprocess(slides, out / "dense", CASCADE, args),
                   "sparse": preprocess(slides, out / "base", CASCADE[:1], args)}
        features = {"dense": out / "dense" / "features", "sparse": out / "base" / "features"}
    settings = dict(k=args.k, hidden=args.hidden, attn_hidden=args.hidden // 2, epochs=args.epochs, lr=args.lr,
                    lr_patience=args.lr_patience, seed=args.seed, zoom_target_weight=args.zoom_target_weight,
                    warmup=args.warmup, children_per_parent=args.children_per_parent, progress=False)
    labels = read_labels(labels_csv)
    # Through JSON, so that it compares equal to the settings read back from a fold's file.
    recorded = json.loads(json.dumps({**settings, "precision": args.precision, "cascade": CASCADE}))
    if args.explore_budget is not None:
        recorded["explore_budget"] = args.explore_budget
    folds = []
    for fold in args.only_folds or range(args.folds):
        fold_csv = out / "folds" / f"fold{fold}.csv"
        fold_csv.parent.mkdir(parents=True, exist_ok=True)
        if args.cohort_from:
            shutil.copyfile(args.cohort_from / "splits" / f"fold{fold}.csv", fold_csv)
        else:
            write_splits(fold_csv, make_splits(labels, n_folds=args.folds, fold=fold))
        result: dict = {"fold": fold}
        if args.dense_from:
            earlier = json.loads((args.dense_from / "folds" / f"fold{fold}.json").read_text())
            if {k: v for k, v in recorded.items() if k != "explore_budget"} != with_limit(earlier["settings"]):
                raise SystemExit(f"{args.dense_from}: fold {fold} was run with other settings")
            result["dense"] = earlier["dense"]
        for method in ("sparse",) if args.dense_from else ("dense", "sparse"):
            run = out / "runs" / f"{method}_fold{fold}"
            shutil.rmtree(run, ignore_errors=True)  # a fresh cache: the count is one run's cost
            # No embedding ahead: the count is what the steps need (benchmarks/sparse_lookahead.py
            # measures what embedding ahead costs and saves).
            extra = {"magnifications": CASCADE, "sparse": SparseSettings(
                precision=args.precision, workers=args.workers, lookahead=0, explore_budget=args.explore_budget)} \
                if method == "sparse" else {}
            start = time.perf_counter()
            summary = train_model(features[method], labels_csv, run, splits_csv=fold_csv, **settings, **extra)
            train_s = time.perf_counter() - start
            metrics = evaluate_run(run, features["dense"], labels_csv, run / "eval", split="test")
            result[method] = {"weighted_f1": 100 * metrics["weighted_f1"], "accuracy": 100 * metrics["accuracy"],
                              "train_s": train_s, "best_epoch": summary["best_epoch"],
                              "best_val_f1": summary["best_val_f1"]}
            if method == "sparse":
                result["patches"] = {k: summary["sparse"][k] for k in
                                     ("dense_patches", "embedded_patches", "total_dense", "total_embedded",
                                      "fewer_by", "per_epoch")}
            print(f"fold {fold} {method}: F1 {result[method]['weighted_f1']:.1f}, train {train_s:.1f} s", flush=True)
        write_text(out / "folds" / f"fold{fold}.json", json.dumps({"settings": recorded, **result}, indent=2))
    # Folds run by earlier invocations with the same settings count too, so folds can run apart.
    for path in sorted((out / "folds").glob("fold*.json")):
        saved = json.loads(path.read_text())
        if with_limit(saved.pop("settings")) == recorded:
            folds.append(saved)
    folds.sort(key=lambda f: f["fold"])

    def mean(method: str, key: str) -> float:
        return float(np.mean([f[method][key] for f in folds]))

    dense_patches = sum(f["patches"]["total_dense"] for f in folds)
    sparse_patches = sum(f["patches"]["total_embedded"] for f in folds)
    summary = {
        "settings": {**vars(args), "out": str(out), "cascade": CASCADE},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "preprocess_s": seconds,
        "folds": folds,
        "weighted_f1": {m: mean(m, "weighted_f1") for m in ("dense", "sparse")},
        "train_s": {m: mean(m, "train_s") for m in ("dense", "sparse")},
        "patches_per_training_run": {"dense": dense_patches / len(folds), "sparse": sparse_patches / len(folds)},
        "fewer_by": round(dense_patches / max(sparse_patches, 1), 2),
    }
    summary["wall_s"] = {m: seconds[m] + summary["train_s"][m] for m in ("dense", "sparse")}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")  # paths as text
    scaled = f" (dense: {args.sample} slides timed, scaled by patch count)" if args.cohort_from else ""
    table = [
        "| | dense | sparse |", "|---|---|---|",
        f"| weighted F1, mean of {len(folds)} of {args.folds} folds | {summary['weighted_f1']['dense']:.1f} | "
        f"{summary['weighted_f1']['sparse']:.1f} |",
        f"| patches embedded per training run (train + val slides) | {dense_patches / len(folds):.0f} | "
        f"{sparse_patches / len(folds):.0f} ({summary['fewer_by']}x fewer) |",
        f"| preprocessing, whole cohort (s){scaled} | {seconds['dense']:.1f} | {seconds['sparse']:.1f} |",
        f"| training per fold, mean (s) | {summary['train_s']['dense']:.1f} | {summary['train_s']['sparse']:.1f} |",
    ]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
