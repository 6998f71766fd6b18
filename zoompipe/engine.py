"""The zooming engine: classify a raw slide reading high magnifications only where the model zooms.

Base tissue patches are embedded in full; at every later magnification only the children of
the patches the model selected are read from the pyramid and embedded. Everything that decides
which patches exist (tissue parameters, grid cascade, patch size, minimum tissue) and how they
are embedded (encoder) comes from the run's ``config.json``, so the engine sees the very patches
the model was trained on. Precision and runtime are this machine's choice, not the run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .embed import embed_patches
from .encoders import create_encoder
from .errors import CheckpointError
from .grid import PatchGrid, base_grid, child_grid, magnification_ratios
from .model import load_run
from .slide import Slide, open_slide
from .tissue import TissueMask, TissueParams, tissue_mask


@dataclass
class MagnificationReport:
    """What the model saw at one magnification.

    Attributes
    ----------
    magnification, mpp : float
    boxes : ndarray
        (N, 4) int64 level-0 ``x0, y0, x1, y1`` of every patch attended at this magnification.
    rows : ndarray
        (N,) global rows of those patches in the full grid of this magnification (the row they
        have in a feature file written by ``preprocess``).
    attention : ndarray
        (N,) pooling attention, summing to one.
    selected : ndarray
        Indices into ``boxes`` of the patches zoomed into (empty at the last magnification).
    selection_scores : ndarray
        (N,) raw scores of the zoom head (empty at the last magnification).
    patches_embedded : int
        Patches read from the slide and embedded for this magnification.
    seconds : float
        Wall time of reading and embedding them.
    """

    magnification: float
    mpp: float
    boxes: np.ndarray
    rows: np.ndarray
    attention: np.ndarray
    selected: np.ndarray
    selection_scores: np.ndarray
    patches_embedded: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "magnification": self.magnification, "mpp": self.mpp,
            "patches_embedded": self.patches_embedded, "seconds": round(self.seconds, 4),
            "boxes": self.boxes.tolist(), "rows": self.rows.tolist(),
            "attention": [float(a) for a in self.attention],
            "selected": self.selected.tolist(),
            "selection_scores": [float(s) for s in self.selection_scores],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MagnificationReport":
        return cls(
            magnification=float(data["magnification"]), mpp=float(data["mpp"]),
            boxes=np.asarray(data["boxes"], np.int64).reshape(-1, 4), rows=np.asarray(data["rows"], np.int64),
            attention=np.asarray(data["attention"], np.float64), selected=np.asarray(data["selected"], np.int64),
            selection_scores=np.asarray(data["selection_scores"], np.float64),
            patches_embedded=int(data["patches_embedded"]), seconds=float(data["seconds"]))


@dataclass
class Prediction:
    """A slide's diagnosis and where the model looked to make it."""

    slide_id: str
    slide_path: str
    slide_mpp: float
    slide_dimensions: tuple[int, int]
    class_names: list[str]
    probabilities: np.ndarray
    magnifications: list[MagnificationReport]
    tissue: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    full_read_patches: int = 0
    encoder: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted(self) -> str:
        return self.class_names[int(np.argmax(self.probabilities))]

    @property
    def patches_embedded(self) -> int:
        return sum(m.patches_embedded for m in self.magnifications)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id, "slide_path": self.slide_path, "slide_mpp": self.slide_mpp,
            "slide_dimensions": list(self.slide_dimensions), "predicted": self.predicted,
            "probabilities": dict(zip(self.class_names, (float(p) for p in self.probabilities))),
            "patches_embedded": self.patches_embedded, "full_read_patches": self.full_read_patches,
            "timings": {k: round(v, 4) for k, v in self.timings.items()}, "tissue": self.tissue,
            "magnifications": [m.to_dict() for m in self.magnifications], "encoder": self.encoder,
            "zoompipe_version": __version__,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Prediction":
        names = list(data["probabilities"])
        return cls(
            slide_id=data["slide_id"], slide_path=data["slide_path"], slide_mpp=float(data["slide_mpp"]),
            slide_dimensions=tuple(data["slide_dimensions"]), class_names=names,
            probabilities=np.array([data["probabilities"][n] for n in names]),
            magnifications=[MagnificationReport.from_dict(m) for m in data["magnifications"]],
            tissue=data["tissue"], timings=data.get("timings", {}),
            full_read_patches=int(data.get("full_read_patches", 0)), encoder=data.get("encoder", {}))


class ZoomPredictor:
    """A trained run, ready to classify raw slides.

    Parameters
    ----------
    run_dir : str or Path
        Folder with ``model.safetensors`` and ``config.json`` (``zoompipe train``).
    device : str
        Where the encoder and the model run.
    precision, runtime : str
        Encoder precision and runtime (see :func:`~zoompipe.encoders.create_encoder`); ``auto``
        picks what this machine runs fastest. The precision of the training features is
        reported (:attr:`encoder_report`), not imposed: bf16 and fp32 features lead to the same
        decisions (``tests/test_precision.py``), and bf16 is emulated and slow on most CPUs.
    encoder_weights : str, optional
        Weights file for encoders whose weights do not ship with zoompipe.
    batch_size, workers : int
        Encoder batch and patch reader threads.
    """

    def __init__(self, run_dir: str | Path, device: str = "cpu", precision: str = "auto", runtime: str = "auto",
                 encoder_weights: str | None = None, batch_size: int = 32, workers: int = 2) -> None:
        self.run_dir = Path(run_dir)
        self.model, self.config = load_run(self.run_dir, device=device)
        try:
            encoder = self.config["encoder"]
            self.tissue_params = TissueParams.from_dict(self.config["tissue"])
            self.patch_size = int(self.config["patch_size"])
            self.min_tissue = float(self.config.get("min_tissue", 0.1))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{self.run_dir}: config.json lacks the preprocessing settings "
                                  f"a prediction needs ({err})") from None
        self.model_magnifications = [float(m) for m in self.model.config.magnifications]
        self.grid_magnifications = [float(m) for m in self.config.get("grid_magnifications",
                                                                      self.model_magnifications)]
        if not set(self.model_magnifications) <= set(self.grid_magnifications):
            raise CheckpointError(f"{self.run_dir}: model magnifications {self.model_magnifications} are not "
                                  f"part of the grid cascade {self.grid_magnifications}")
        magnification_ratios(self.grid_magnifications)
        self.encoder = create_encoder(encoder["name"], weights=encoder_weights, device=device,
                                      precision=precision, runtime=runtime)
        self.encoder_report = {"name": self.encoder.name, "precision": self.encoder.precision,
                               "runtime": self.encoder.runtime, "training_precision": encoder.get("precision")}
        if self.encoder.feature_dim != self.model.config.in_dim:
            raise CheckpointError(f"{self.run_dir}: encoder {encoder['name']} gives {self.encoder.feature_dim}-d "
                                  f"features, the model expects {self.model.config.in_dim}")
        self.batch_size = batch_size
        self.workers = workers

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    def _descend(self, grid: PatchGrid, rows: np.ndarray, global_rows: np.ndarray, target: float,
                 mask: TissueMask) -> tuple[PatchGrid, np.ndarray]:
        """Children of ``rows`` of ``grid`` down the grid cascade to magnification ``target``.

        Global rows follow the layout of ``build_cascade``: child ``j`` of the patch at global
        row ``p`` has global row ``p * r * r + j``.
        """
        level = self.grid_magnifications.index(grid.magnification)
        while grid.magnification < target:
            level += 1
            child = child_grid(grid, self.grid_magnifications[level], mask=mask, rows=rows)
            per_parent = len(child) // max(len(rows), 1)
            global_rows = (global_rows[:, None] * per_parent + np.arange(per_parent)).reshape(-1)
            grid, rows = child, np.arange(len(child))
        return grid, global_rows

    def _embed(self, slide: Slide, grid: PatchGrid, desc: str | None) -> torch.Tensor:
        features = embed_patches(slide, grid.coords, grid.mpp, grid.patch_size, self.encoder,
                                 batch_size=self.batch_size, workers=self.workers, desc=desc)
        return torch.from_numpy(features).to(self.encoder.device)

    def predict(self, path: str | Path, mpp: float | None = None, backend: str = "auto",
                progress: bool = False) -> Prediction:
        """Classify one slide from its raw file.

        Parameters
        ----------
        path : str or Path
        mpp : float, optional
            Level-0 microns per pixel, for slides whose metadata lacks it.
        backend : str
            Slide library.
        progress : bool
            Show a progress bar per magnification.
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        with open_slide(path, backend=backend, mpp=mpp) as slide:
            mask = tissue_mask(slide, self.tissue_params)
            base = base_grid(mask, slide.mpp, self.grid_magnifications[0], self.patch_size, self.min_tissue)
            timings["tissue"] = time.perf_counter() - start
            mags = self.model_magnifications
            grids: list[PatchGrid] = []
            seconds: list[float] = []

            def embed_at(grid: PatchGrid) -> torch.Tensor:
                t0 = time.perf_counter()
                features = self._embed(slide, grid, f"{slide.slide_id} {grid.magnification:g}x" if progress else None)
                seconds.append(time.perf_counter() - t0)
                grids.append(grid)
                return features

            # Global rows of each embedded grid, ascending in grid order (see _descend), so a
            # global row maps to its position in the grid by binary search.
            first, first_rows = self._descend(base, np.arange(len(base)), np.arange(len(base)), mags[0], mask)
            global_rows = [first_rows]
            h0 = embed_at(first)

            def fetch(step: int, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                local = np.searchsorted(global_rows[step], parents.numpy())
                child, child_rows = self._descend(grids[step], local, parents.numpy(), mags[step + 1], mask)
                global_rows.append(child_rows)
                return embed_at(child), torch.from_numpy(child_rows)

            t_model = time.perf_counter()
            with torch.inference_mode():
                out = self.model.infer(h0, fetch)
            timings["model"] = time.perf_counter() - t_model - sum(seconds[1:])
            full = len(base)
            for low, high in zip(self.grid_magnifications, self.grid_magnifications[1:]):
                if low < mags[-1]:
                    full *= round(high / low) ** 2
            reports = []
            for step, grid in enumerate(grids):
                rows = out.rows[step].numpy()
                local = np.searchsorted(global_rows[step], rows)
                selected = (np.searchsorted(rows, out.selected[step].numpy()) if step < len(out.selected)
                            else np.zeros(0, np.int64))
                scores = (out.selection_scores[step].float().cpu().numpy() if step < len(out.selection_scores)
                          else np.zeros(0))
                timings[f"embed_{grid.magnification:g}x"] = seconds[step]
                reports.append(MagnificationReport(
                    magnification=grid.magnification, mpp=grid.mpp, boxes=grid.boxes()[local], rows=rows,
                    attention=out.attention[step].float().cpu().numpy(), selected=selected,
                    selection_scores=scores, patches_embedded=len(grid), seconds=seconds[step]))
            timings["total"] = time.perf_counter() - start
            return Prediction(
                slide_id=slide.slide_id, slide_path=str(path), slide_mpp=slide.mpp,
                slide_dimensions=slide.dimensions, class_names=self.class_names,
                probabilities=out.probabilities.float().cpu().numpy(), magnifications=reports,
                tissue=self.config["tissue"], timings=timings, full_read_patches=full,
                encoder=dict(self.encoder_report))
