"""The zooming engine: classify a raw slide reading high magnifications only where the model zooms.

Base tissue patches are embedded in full; at every later magnification only the children of
the patches the model selected are read from the pyramid and embedded. Everything that decides
which patches exist (tissue parameters, grid cascade, patch size, minimum tissue) and how they
are embedded (encoder and its weights) comes from the pipeline contract in the run's
``config.json`` and goes through the same slide path as preprocessing
(:func:`zoompipe.tiling.tile_slide`), so the engine sees the very patches the model was trained
on. The model says what it needs: a model on one magnification gets its whole bag, ZoomMIL gets
the base and a callback that embeds the children of what it selects. Precision
and runtime are this machine's choice, not the run's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .embed import embed_patches
from .contract import PipelineContract
from .encoders import Encoder, create_encoder
from .errors import CheckpointError
from .grid import PatchGrid
from .model import load_run
from .predictor_settings import PredictorSettings
from .prediction import MagnificationReport, Prediction
from .run_config import predict_contract
from .slide import Slide, open_slide
from .tiling import SlideTiles, cascade_tiles, check_mask_dir, tile_slide
from .tissue import TissueMask


def contract_encoder(contract: PipelineContract, weights: str | None = None, device: str = "cpu",
                     precision: str = "auto", runtime: str = "auto") -> Encoder:
    """The encoder a pipeline contract names, built for this machine.

    Weights known by digest are checked before the encoder is built: other weights are refused
    (``UsageError``).
    """
    encoder = contract.encoder
    expected = encoder.weights if encoder.weights.startswith("sha256:") else None
    return create_encoder(encoder.name, weights=weights, device=device, precision=precision, runtime=runtime,
                          expect_weights=expected)


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
        Weights file for encoders whose weights do not ship with zoompipe; it must be the file
        the training features were made with.
    batch_size, workers : int
        Encoder batch and patch reader threads.
    mask_dir : str, optional
        Folder of the user-drawn tissue masks, required when the run was preprocessed with them.

    Raises
    ------
    UsageError
        ``mask_dir`` or ``encoder_weights`` that do not match the run's pipeline contract.
    CheckpointError
        A run that cannot predict from raw slides.
    """

    def __init__(self, run_dir: str | Path, device: str = "cpu", precision: str = "auto", runtime: str = "auto",
                 encoder_weights: str | None = None, batch_size: int = 32, workers: int = 2,
                 mask_dir: str | Path | None = None) -> None:
        self.settings = PredictorSettings(Path(run_dir), device, precision, runtime, encoder_weights, batch_size,
                                          workers, mask_dir)
        self.run_dir = Path(run_dir)
        self.model, self.config = load_run(self.run_dir, device=device)
        self.pipeline = predict_contract(self.config, self.run_dir)
        check_mask_dir(self.pipeline, mask_dir)
        self.mask_dir = mask_dir
        self.model_magnifications = [float(m) for m in self.model.config.magnifications]
        self.grid_magnifications = [float(m) for m in self.pipeline.grid.magnifications]
        if not set(self.model_magnifications) <= set(self.grid_magnifications):
            raise CheckpointError(f"{self.run_dir}: model magnifications {self.model_magnifications} are not "
                                  f"part of the grid cascade {self.grid_magnifications}")
        encoder = self.pipeline.encoder
        self.encoder = contract_encoder(self.pipeline, encoder_weights, device, precision, runtime)
        self.encoder_report = {"name": self.encoder.name, "precision": self.encoder.precision,
                               "runtime": self.encoder.runtime, "training_precision": encoder.precision}
        if self.encoder.feature_dim != self.model.config.in_dim:
            raise CheckpointError(f"{self.run_dir}: encoder {encoder.name} gives {self.encoder.feature_dim}-d "
                                  f"features, the model expects {self.model.config.in_dim}")
        self.batch_size = batch_size
        self.workers = workers

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    def _descend(self, layout: list[PatchGrid], level: int, rows: np.ndarray,
                 target: float) -> tuple[PatchGrid, np.ndarray, np.ndarray]:
        """The descendants of ``rows`` of ``layout[level]`` at magnification ``target``.

        ``layout`` is the slide's cascade as preprocessing lays it out
        (:func:`~zoompipe.tiling.cascade_tiles`; only tissue fractions, nothing read from the
        slide), so descendants are rows of the same grids, children policy included, and a row
        means the same patch in a prediction as in a feature file.

        Returns
        -------
        PatchGrid, ndarray, ndarray
            The descendants, their ascending rows in the layout's grid at ``target``, and for
            each the position in ``rows`` (ascending) of the patch it descends from.
        """
        origin = np.arange(len(rows))
        while layout[level].magnification < target:
            level += 1
            parent = layout[level].parent
            below = np.flatnonzero(np.isin(parent, rows))
            origin, rows = origin[np.searchsorted(rows, parent[below])], below
        return layout[level].take(rows), rows, origin

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
            A file or a URL (:func:`~zoompipe.slide.open_slide`).
        mpp : float, optional
            Level-0 microns per pixel, for slides whose metadata lacks it.
        backend : str
            Slide library.
        progress : bool
            Show a progress bar per magnification.
        """
        with open_slide(path, backend=backend, mpp=mpp) as slide:
            return self.predict_slide(slide, progress=progress)[0]

    def predict_slide(self, slide: Slide, progress: bool = False, tiles: SlideTiles | None = None,
                      tissue_seconds: float = 0.0) -> tuple[Prediction, TissueMask]:
        """Classify an open slide; also return its tissue mask, for heatmaps.

        ``tiles``: the slide's tissue and base grid as the run's contract makes them
        (:func:`~zoompipe.tiling.tile_slide`), when the caller made them already, in
        ``tissue_seconds`` (counted in the prediction's timings).
        """
        timings: dict[str, float] = {}
        start = time.perf_counter() - tissue_seconds
        if tiles is None:
            tiles = tile_slide(slide, self.pipeline, self.mask_dir)
        layout = cascade_tiles(tiles, self.pipeline.grid)
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

        # Rows of each embedded grid in the layout, ascending (see _descend), so that a layout
        # row maps to its position in the embedded grid by binary search.
        levels = [self.grid_magnifications.index(m) for m in mags]
        first, first_rows, _ = self._descend(layout, 0, np.arange(len(layout[0])), mags[0])
        global_rows = [first_rows]
        h0 = embed_at(first)

        def fetch(step: int, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            child, child_rows, origin = self._descend(layout, levels[step], parents.numpy(), mags[step + 1])
            global_rows.append(child_rows)
            return embed_at(child), torch.from_numpy(child_rows), torch.from_numpy(origin)

        def zoomable(step: int, rows: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(_has_descendants(layout, levels[step], levels[step + 1])[rows.numpy()])

        t_model = time.perf_counter()
        with torch.inference_mode():
            out = self.model.infer(h0, fetch, zoomable) if self.model.needs == "zoom" else self.model([h0], [])
        timings["model"] = time.perf_counter() - t_model - sum(seconds[1:])
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
        prediction = Prediction(
            slide_id=slide.slide_id, slide_path=slide.name, slide_mpp=slide.mpp,
            slide_dimensions=slide.dimensions, class_names=self.class_names,
            probabilities=out.probabilities.float().cpu().numpy(), magnifications=reports,
            pipeline=self.pipeline, timings=timings, full_read_patches=len(layout[levels[-1]]),
            encoder=dict(self.encoder_report), transfer=slide.transfer_stats())
        return prediction, tiles.mask


def _has_descendants(layout: list[PatchGrid], level: int, target: int) -> np.ndarray:
    """Which patches of ``layout[level]`` have at least one descendant in ``layout[target]``."""
    rows = np.arange(len(layout[target]))
    for above in range(target, level, -1):
        rows = layout[above].parent[rows]
    has = np.zeros(len(layout[level]), bool)
    has[rows] = True
    return has
