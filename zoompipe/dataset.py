"""Feature bags for training and evaluation, slide labels and train/val/test splits.

Feature files are read with :func:`zoompipe.features.read_feature_file` (zoompipe's layout,
one group per magnification, or CLAM/TRIDENT's as one magnification); the parent -> children
index comes from :func:`zoompipe.grid.children_index`, built from the ``parent`` rows and the
lattice cells, never from the order of rows.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoompipe.contract import PipelineContract, first_disagreement
from zoompipe.errors import ContractError, FeatureFileError, GridError, UsageError, ZoompipeError
from zoompipe.features import read_feature_file
from zoompipe.grid import children_index
from zoompipe.tables import read_table

SPLIT_NAMES = ("train", "val", "test")


def feature_path(features_dir: str | os.PathLike, slide_id: str) -> Path:
    """Path of a slide's feature file."""
    return Path(features_dir) / f"{slide_id}.h5"


def check_feature_files(features_dir: str | os.PathLike, slide_ids: Sequence[str]) -> list[Path]:
    """The feature files of ``slide_ids``.

    Raises
    ------
    FeatureFileError
        Some are missing (how many, and the first).
    """
    paths = [feature_path(features_dir, s) for s in slide_ids]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FeatureFileError(
            f"{len(missing)} of {len(paths)} feature files are missing "
            f"(first: {missing[0]}); run preprocess on those slides"
        )
    return paths


def read_bags(
    path: str | os.PathLike, magnifications: Sequence[float]
) -> tuple[list[Tensor], list[Tensor], list[np.ndarray]]:
    """Read a slide's feature bags at the given magnifications.

    Parameters
    ----------
    path : path
        Feature file.
    magnifications : sequence of float
        Ascending magnifications to read; a subset of the file's, e.g. ``[1.25, 10]`` from a
        1.25x -> 2.5x -> 10x file, or ``[10]`` alone (all 10x rows: ABMIL at 10x). A file in
        the CLAM/TRIDENT layout only feeds a single magnification.

    Returns
    -------
    bags : list of Tensor
        Per magnification, float32 features (N_i, D).
    children : list of Tensor
        Per magnification but the last, LongTensor (N_i, r_i * r_i), r_i = m_{i+1} / m_i: the
        rows of each patch's descendants at the next requested magnification in raster order
        of their cells, -1 where the file has no such patch.
    coords : list of ndarray
        Per magnification, int64 level-0 top-left corners (N_i, 2) as (x, y).

    Raises
    ------
    FeatureFileError
        If the file is missing, unreadable, lacks a magnification or is inconsistent.
    """
    path = Path(path)
    mags = [float(m) for m in magnifications]
    data = read_feature_file(path, mags)
    if len(data.grids) != len(mags):
        raise FeatureFileError(
            f"{path} holds a single magnification (CLAM/TRIDENT layout) and cannot feed a "
            f"model with magnifications {', '.join(f'{m:g}x' for m in mags)}"
        )
    bags = [torch.from_numpy(np.asarray(f, dtype=np.float32)) for f in data.features]
    if len({b.shape[1] for b in bags}) > 1:
        raise FeatureFileError(f"{path} mixes feature dimensions across magnifications")
    available = [float(m) for m in data.attrs.get("magnifications", mags)]
    children = []
    for low, high in zip(data.grids, data.grids[1:]):
        between = [m for m in available if low.magnification < m < high.magnification]
        if between:
            # Skipped magnifications: follow the parent rows through them to `low`.
            ancestor = high.parent
            for grid in reversed(read_feature_file(path, between, load_features=False).grids):
                ancestor = np.where(ancestor >= 0, grid.parent[ancestor.clip(min=0)], -1)
            high = replace(high, parent=ancestor)
        try:
            children.append(torch.from_numpy(children_index(low, high)))
        except GridError as err:
            raise FeatureFileError(f"{path}: {err}") from None
    return bags, children, [g.coords for g in data.grids]


def file_magnifications(path: str | os.PathLike) -> list[float]:
    """Magnifications stored in a feature file, in cascade order.

    Raises
    ------
    FeatureFileError
        If the file cannot be read, or is in the CLAM/TRIDENT layout and does not record its
        magnification.
    """
    return read_feature_file(path, load_features=False).magnifications


def agreed_contract(paths: Sequence[str | os.PathLike]) -> PipelineContract | None:
    """The pipeline contract that every feature file of a training set shares, for its run.

    Returns
    -------
    PipelineContract or None
        :meth:`~zoompipe.contract.PipelineContract.for_run` of the first file's contract; None
        when the files are all in the CLAM/TRIDENT layout, which records none.

    Raises
    ------
    ContractError
        Two files that disagree (another encoder, weights, tissue or grid setting), or a mix of
        files with and without a contract; the message names both files and the first field.
    """
    first_path, first = None, None
    for path in paths:
        contract = read_feature_file(path, load_features=False).contract
        if first_path is None:
            first_path, first = path, contract
            continue
        if (contract is None) != (first is None):
            raise ContractError(f"{path} and {first_path}: only one of them records how it was preprocessed "
                                "(a CLAM/TRIDENT file); train on files of one kind")
        difference = contract and first_disagreement(first, contract)
        if difference:
            raise ContractError(f"{path} was preprocessed unlike {first_path} ({difference}); "
                                "train on features made with the same settings")
    return first.for_run() if first is not None else None


def read_labels(path: str | os.PathLike) -> dict[str, str]:
    """Read a labels CSV with columns ``slide_id,label``.

    Returns
    -------
    dict
        Slide id to class name, in file order.

    Raises
    ------
    UsageError
        Unreadable file, missing column, no rows, or a slide with two labels.
    """
    labels: dict[str, str] = {}
    for row in read_table(path, ("slide_id", "label")):
        slide_id, label = row["slide_id"], row["label"]
        if labels.get(slide_id, label) != label:
            raise UsageError(f"{path}: slide {slide_id} has two labels")
        labels[slide_id] = label
    return labels


def read_splits(path: str | os.PathLike) -> dict[str, str]:
    """Read a splits CSV with columns ``slide_id,split``, split one of train, val, test."""
    splits = {}
    for row in read_table(path, ("slide_id", "split")):
        if row["split"] not in SPLIT_NAMES:
            raise UsageError(
                f"{path}: split '{row['split']}' of slide {row['slide_id']} is not one of "
                f"{', '.join(SPLIT_NAMES)}"
            )
        splits[row["slide_id"]] = row["split"]
    return splits


def make_splits(
    labels: dict[str, str],
    n_folds: int = 5,
    fold: int = 0,
    seed: int = 0,
    patients: dict[str, str] | None = None,
) -> dict[str, str]:
    """Seeded k-fold split, stratified by class and grouped by patient.

    The patients of each class are shuffled and dealt into ``n_folds`` folds; fold ``fold`` is
    the test set, fold ``fold + 1`` (cyclically) the validation set and the rest the training
    set. A patient's slides always share a fold, so no patient is on both sides of a split.
    Dealing continues from one class to the next, so fold sizes stay balanced, and a class
    with at least ``n_folds`` patients reaches every fold: with 5 folds the split is 60/20/20
    and the 5 choices of ``fold`` test every slide once. A class with 3 to ``n_folds - 1``
    patients gets one test and one validation patient in every choice of ``fold`` and the
    rest in training.

    Parameters
    ----------
    labels : dict
        Slide id to class name.
    n_folds : int
        Number of folds, at least 3.
    fold : int
        Test fold, in ``range(n_folds)``.
    seed : int
        Seed of the shuffle; independent of any training seed, so that runs with different
        initialisations share their split.
    patients : dict, optional
        Slide id to patient id; by default every slide is its own patient. A patient's class
        is that of its first slide in ``labels``.

    Returns
    -------
    dict
        Slide id to split name.

    Raises
    ------
    UsageError
        If a class has fewer than 3 patients, so cannot appear in all three splits.
    """
    if n_folds < 3 or not 0 <= fold < n_folds:
        raise ZoompipeError(f"need n_folds >= 3 and 0 <= fold < n_folds, got {n_folds}, {fold}")
    patients = patients or {}
    slides_of: dict[str, list[str]] = {}
    for slide_id in labels:
        slides_of.setdefault(patients.get(slide_id, slide_id), []).append(slide_id)
    rng = np.random.default_rng(seed)
    roles = {fold: "test", (fold + 1) % n_folds: "val"}
    train_folds = [f for f in range(n_folds) if f not in roles]
    splits = {}
    dealt = 0
    for name in sorted(set(labels.values())):
        group = sorted(p for p, slides in slides_of.items() if labels[slides[0]] == name)
        if len(group) < 3:
            raise UsageError(
                f"class '{name}' has {len(group)} patient(s); a split needs at least 3 "
                "(one each for train, val and test)"
            )
        order = [group[i] for i in rng.permutation(len(group))]
        if len(group) >= n_folds:
            assigned = [(dealt + j) % n_folds for j in range(len(order))]
            dealt += len(order)
        else:
            assigned = [fold, (fold + 1) % n_folds, *(
                train_folds[j % len(train_folds)] for j in range(len(order) - 2))]
        for patient, f in zip(order, assigned):
            for slide_id in slides_of[patient]:
                splits[slide_id] = roles.get(f, "train")
    return splits


def read_patients(path: str | os.PathLike) -> dict[str, str]:
    """Patient of each slide from the optional ``patient_id`` column of a labels CSV.

    Returns
    -------
    dict
        Slide id to patient id; empty when the CSV has no ``patient_id`` column. Slides with
        an empty patient id are left out (each is then its own patient).
    """
    return {
        row["slide_id"]: row["patient_id"]
        for row in read_table(path, ("slide_id",))
        if row.get("patient_id")
    }


def write_splits(path: str | os.PathLike, splits: dict[str, str]) -> None:
    """Write a splits CSV (``slide_id,split``) readable by :func:`read_splits`."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "split"])
        writer.writerows(sorted(splits.items()))


class SlideDataset(Dataset):
    """Feature bags and class indices of labelled slides.

    Parameters
    ----------
    features_dir : path
        Folder of ``<slide_id>.h5`` feature files.
    slide_ids : sequence of str
        Slides, in dataset order.
    labels : sequence of int
        Class index of each slide.
    magnifications : sequence of float
        Magnifications to read (see :func:`read_bags`).
    feature_dim : int, optional
        Expected feature dimension, by default that of the first slide read; a file with
        another one raises ``FeatureFileError``.
    cache : bool
        Keep bags in memory after the first read. Dense bags at 10x take about
        ``64 * N_base * D * 4`` bytes per slide, so turn this off for large datasets.

    Notes
    -----
    Item ``i`` is ``(bags, children, label)`` as returned by :func:`read_bags`, without coords.
    """

    def __init__(
        self,
        features_dir: str | os.PathLike,
        slide_ids: Sequence[str],
        labels: Sequence[int],
        magnifications: Sequence[float],
        feature_dim: int | None = None,
        cache: bool = True,
    ) -> None:
        self.slide_ids = list(slide_ids)
        self.labels = [int(y) for y in labels]
        self.magnifications = [float(m) for m in magnifications]
        self.feature_dim = feature_dim
        self.paths = check_feature_files(features_dir, self.slide_ids)
        self._cache: dict[int, tuple[list[Tensor], list[Tensor]]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, index: int) -> tuple[list[Tensor], list[Tensor], int]:
        if self._cache is not None and index in self._cache:
            bags, children = self._cache[index]
        else:
            bags, children, _ = read_bags(self.paths[index], self.magnifications)
            if self.feature_dim is None:
                self.feature_dim = bags[0].shape[1]
            if bags[0].shape[1] != self.feature_dim:
                raise FeatureFileError(
                    f"{self.paths[index]} has {bags[0].shape[1]}-d features, expected "
                    f"{self.feature_dim}; were all slides embedded with the same encoder?"
                )
            if self._cache is not None:
                self._cache[index] = (bags, children)
        return bags, children, self.labels[index]

