"""Embedding ahead in sparse training: one sparse run, with each lookahead (and on a cluster), side by side.

``train --sparse`` embeds, before each step, the children that step's soft selections reach.
With ``--lookahead L`` a background thread explores the next L slides on a copy of the model and
embeds what it reaches while the model trains (``zoompipe.prefetch``); with ``--cluster`` the
embedding runs on Dask workers. This script trains the same fold once per setting, each from an
empty cache, and reports:

- wall time of the training run (embedding included), and its ratio to the first setting;
- patches embedded in the steps, ahead of them, and of those ahead the share a step then used
  (the rest is compute spent for nothing);
- the largest difference of any weight from the first setting's model (it must be the same model).

The runs are sequential on the same machine, after one unreported epoch that warms the OS file
cache and the encoder's runtime; the ratio is the figure to read.

Usage::

    python benchmarks/sparse_lookahead.py --features bench_sparse10/base/features \\
        --labels bench40/cohort/labels.csv --splits bench40/splits/fold0.csv --n-train 8 --epochs 5 \\
        --lookaheads 0,1,2 --out bench_ahead
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

from safetensors.torch import load_file  # noqa: E402

from zoompipe.atomic import write_text  # noqa: E402
from zoompipe.dataset import read_splits, write_splits  # noqa: E402
from zoompipe.sparse import SparseSettings  # noqa: E402
from zoompipe.train import train_model  # noqa: E402

CASCADE = [1.25, 2.5, 10.0]


def subset_splits(splits_csv: Path, n_train: int | None, out: Path) -> Path:
    """The fold's splits with only its first ``n_train`` training and ``n_train // 2`` validation slides."""
    splits = read_splits(splits_csv)
    if n_train is None:
        return splits_csv
    keep: dict[str, str] = {}
    for split, n in (("train", n_train), ("val", max(1, n_train // 2))):
        keep.update({s: split for s in [s for s, v in splits.items() if v == split][:n]})
    write_splits(out, keep)
    return out


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="base feature files (preprocess --magnifications 1.25)")
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench_ahead"))
    parser.add_argument("--n-train", type=int, default=None, help="keep the fold's first N training slides (N/2 val)")
    parser.add_argument("--lookaheads", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--cluster", default=None,
                        help="also run the last lookahead with the embedding on this Dask cluster (local:N, ...)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=float, default=0.125)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu", help="where the model trains and the children are embedded")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    splits = subset_splits(args.splits, args.n_train, out / "splits.csv")
    settings = dict(k=args.k, hidden=args.hidden, attn_hidden=args.hidden // 2, epochs=args.epochs, lr=args.lr,
                    lr_patience=0, seed=args.seed, progress=False, magnifications=CASCADE, device=args.device)
    variants = [(f"lookahead {n}", SparseSettings(precision=args.precision, lookahead=n)) for n in args.lookaheads]
    if args.cluster:
        variants.append((f"lookahead {args.lookaheads[-1]}, {args.cluster}",
                         SparseSettings(precision=args.precision, lookahead=args.lookaheads[-1],
                                        cluster=args.cluster)))
    # One epoch first, not reported: the first setting would otherwise pay alone for reading the
    # slides into the OS cache and for building the encoder's runtime.
    train_model(args.features, args.labels, out / "runs" / "warm_up", splits_csv=splits,
                sparse=SparseSettings(precision=args.precision, lookahead=0), **{**settings, "epochs": 1})
    rows, first = [], None
    for name, sparse in variants:
        run = out / "runs" / name.replace(" ", "_").replace(",", "").replace(":", "")
        shutil.rmtree(run, ignore_errors=True)  # an empty cache: every run embeds what it needs itself
        start = time.perf_counter()
        summary = train_model(args.features, args.labels, run, splits_csv=splits, sparse=sparse, **settings)
        seconds = time.perf_counter() - start
        report = summary["sparse"]
        weights = load_file(run / "model.safetensors")
        first = first or weights
        ahead = sum(report["ahead"]["embedded"].values())
        used = sum(report["ahead"]["used"].values())
        rows.append({
            "setting": name, "train_s": seconds,
            "in_step": sum(sum(e.get(p, {}).values()) for e in report["per_epoch"] for p in ("train", "val")),
            "ahead": ahead, "used_ahead": used,
            "max_weight_difference": max(float((weights[k] - first[k]).abs().max()) for k in first),
            "best_val_f1": summary["best_val_f1"],
        })
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["train_s"]
    table = ["| setting | training (s) | vs first | embedded in the steps | embedded ahead (used) | "
             "largest weight difference |", "|---|---|---|---|---|---|"]
    for r in rows:
        used = f"{r['ahead']} ({100 * r['used_ahead'] / r['ahead']:.0f}% used)" if r["ahead"] else "0"
        table.append(f"| {r['setting']} | {r['train_s']:.0f} | {base / r['train_s']:.2f}x | {r['in_step']} | "
                     f"{used} | {r['max_weight_difference']:.1e} |")
    result = {"settings": {**vars(args), "out": str(out)}, "cores": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(), "device": _device_name(args.device), "runs": rows}
    write_text(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(out / "results.md", "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
