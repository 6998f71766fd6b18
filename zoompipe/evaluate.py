"""Evaluate a trained run on labelled feature files."""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zoompipe.contract import contract_difference
from zoompipe.dataset import SlideDataset, agreed_contract, read_labels, read_splits
from zoompipe.errors import ContractError, ZoompipeError
from zoompipe.metrics import classification_metrics
from zoompipe.model import RowSource, load_run

#: One slide as the training and evaluation loops see it: ``(bags, children, label)``; ``bags``
#: is a list of tensors, or a :class:`~zoompipe.model.RowSource` (sparse training).
Slide = tuple["list[Tensor] | RowSource", list[Tensor], int]


def on_device(bags: list[Tensor] | RowSource, children: list[Tensor],
              device: str | torch.device) -> tuple[list[Tensor] | RowSource, list[Tensor]]:
    """A slide's bags and children indices on ``device`` (a row source gives its rows there)."""
    bags = [b.to(device) for b in bags] if isinstance(bags, list) else bags.to(device)
    return bags, [c.to(device) for c in children]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, slides: Sequence[Slide], device: str | torch.device) -> Tensor:
    """Eval-mode logits of each slide.

    Parameters
    ----------
    model : nn.Module
        A registered model; put in eval mode (hard selection, no dropout).
    slides : sequence
        ``(bags, children, label)`` items, e.g. a :class:`~zoompipe.dataset.SlideDataset`.
    device : str or torch.device
        Device to run on.

    Returns
    -------
    Tensor
        Logits (n_slides, n_classes), on the CPU.
    """
    model.eval()
    logits = []
    for bags, children, _ in slides:
        out = model(*on_device(bags, children, device))
        logits.append(out.logits.cpu())
    return torch.stack(logits) if logits else torch.zeros(0, model.config.n_classes)


def evaluate_run(
    run_dir: str | os.PathLike,
    features_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate a run and write ``predictions.csv`` and ``metrics.json`` to ``out_dir``.

    Parameters
    ----------
    run_dir : path
        Run folder written by training.
    features_dir : path
        Folder of ``<slide_id>.h5`` feature files.
    labels_csv : path
        CSV ``slide_id,label``; labels are class names of the run.
    out_dir : path
        Output folder, created if needed.
    split : str, optional
        Only evaluate the slides of this split (train, val or test) in the run's
        ``splits.csv``.
    device : str
        Device to run on.

    Returns
    -------
    dict
        The content of ``metrics.json``: ``accuracy``, ``weighted_f1``, ``auc``,
        ``confusion_matrix``, ``class_names``, ``n_slides`` and the run folder.

    Notes
    -----
    ``predictions.csv`` has columns ``slide_id,label,pred,p_<class>...``, one row per slide.
    """
    labels = read_labels(labels_csv)
    model, config = load_run(run_dir, device)
    class_names = config.class_names
    if split is not None:
        splits = read_splits(Path(run_dir) / "splits.csv")
        labels = {s: label for s, label in labels.items() if splits.get(s) == split}
        if not labels:
            raise ZoompipeError(f"no slide of {labels_csv} is in the {split} split of {run_dir}")
    unknown = sorted(set(labels.values()) - set(class_names))
    if unknown:
        raise ZoompipeError(
            f"{labels_csv}: label '{unknown[0]}' is not a class of the model "
            f"({', '.join(class_names)})"
        )
    slide_ids = list(labels)
    targets = [class_names.index(labels[s]) for s in slide_ids]
    dataset = SlideDataset(
        features_dir,
        slide_ids,
        targets,
        model.config.magnifications,
        feature_dim=model.config.in_dim,
        cache=False,
    )
    features = agreed_contract(dataset.paths)
    difference = contract_difference(config.pipeline, features)
    if difference:
        raise ContractError(f"{features_dir}: the features were not made like the training features of "
                            f"{run_dir} ({difference})")
    probabilities = torch.softmax(predict_logits(model, dataset, device), dim=1).numpy()
    metrics = {
        **classification_metrics(np.array(targets), probabilities),
        "class_names": class_names,
        "n_slides": len(slide_ids),
        "run": str(run_dir),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "pred", *(f"p_{c}" for c in class_names)])
        for slide_id, target, probs in zip(slide_ids, targets, probabilities):
            writer.writerow(
                [slide_id, class_names[target], class_names[int(probs.argmax())],
                 *(f"{p:.6f}" for p in probs)]
            )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
