"""Per-slide feature files (HDF5): one group per magnification, written atomically.

Layout of ``<slide_id>.h5``::

    /                 attrs: pipeline (the PipelineContract as JSON), slide_id, slide_path,
                             slide_width, slide_height, magnifications, zoompipe_version
    /1.25x/coords     (N, 2) int64   level-0 top-left x, y
    /1.25x/features   (N, D) float32
    /1.25x/parent     (N,)   int64   row of the parent in the previous group (-1 at the base)
    /1.25x/cells      (N, 2) int64   lattice column, row at this magnification
    /1.25x/tissue     (N,)   float32 tissue fraction
                      attrs: magnification, mpp, patch_size, patch_size_level0
    /2.5x/...

Files in the CLAM / TRIDENT layout (root datasets ``coords`` and ``features``) are read too, as
one magnification; they carry no pipeline contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from . import __version__
from .atomic import atomic_path
from .contract import PipelineContract
from .errors import FeatureFileError
from .grid import PatchGrid


def group_name(magnification: float) -> str:
    """HDF5 group of a magnification: ``1.25x``, ``2.5x``, ``10x``."""
    return f"{magnification:g}x"


@dataclass
class FeatureFile:
    """The content of one feature file.

    Attributes
    ----------
    attrs : dict
        Root attributes about the slide (id, path, size).
    contract : PipelineContract or None
        How the patches were made; None for CLAM/TRIDENT files.
    grids : list of PatchGrid
        One per magnification read, in cascade order.
    features : list of ndarray
        (N_i, D) float32, row-aligned with ``grids[i]``.
    """

    attrs: dict
    contract: PipelineContract | None
    grids: list[PatchGrid]
    features: list[np.ndarray] = field(default_factory=list)

    @property
    def magnifications(self) -> list[float]:
        return [g.magnification for g in self.grids]


def _attr(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def write_feature_file(path: str | Path, contract: PipelineContract, attrs: dict, grids: Sequence[PatchGrid],
                       features: Sequence[np.ndarray]) -> None:
    """Write a feature file under a temporary name, then rename it.

    An interrupted write leaves no file that looks complete (:func:`zoompipe.atomic.atomic_path`).
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({**attrs, "pipeline": contract.to_json(), "zoompipe_version": __version__,
                        "magnifications": [g.magnification for g in grids]})
        for grid, feats in zip(grids, features):
            if len(feats) != len(grid):
                raise ValueError(f"{len(feats)} feature rows for {len(grid)} patches at {grid.magnification}x")
            g = f.create_group(group_name(grid.magnification))
            g.create_dataset("coords", data=grid.coords.astype(np.int64))
            g.create_dataset("features", data=np.asarray(feats, np.float32), chunks=True)
            g.create_dataset("parent", data=grid.parent.astype(np.int64))
            g.create_dataset("cells", data=grid.cells.astype(np.int64))
            g.create_dataset("tissue", data=grid.tissue.astype(np.float32))
            g.attrs.update(magnification=grid.magnification, mpp=grid.mpp, patch_size=grid.patch_size,
                           patch_size_level0=grid.patch_size_level0)


def read_feature_file(path: str | Path, magnifications: Sequence[float] | None = None,
                      load_features: bool = True) -> FeatureFile:
    """Read a zoompipe feature file, or a CLAM/TRIDENT one as a single magnification.

    Parameters
    ----------
    path : str or Path
    magnifications : sequence of float, optional
        Groups to read (all by default). For a CLAM/TRIDENT file, the magnification its
        features were taken at (required unless the file records it).
    load_features : bool
        False reads only the grids (coordinates, hierarchy), which is cheap.

    Raises
    ------
    FeatureFileError
        Missing, unreadable or incomplete file, or a magnification it does not hold.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such feature file")
    try:
        with h5py.File(path, "r") as f:
            if "coords" in f and "features" in f:
                return _read_clam(f, path, magnifications, load_features)
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            contract = PipelineContract.from_json(attrs.pop("pipeline", "{}"), path)
            available = [float(m) for m in attrs.get("magnifications", [])]
            wanted = list(magnifications) if magnifications is not None else available
            missing = [m for m in wanted if group_name(m) not in f]
            if missing or not wanted:
                raise FeatureFileError(f"{path}: no features at {', '.join(group_name(m) for m in missing) or 'any magnification'}"
                                       f" (file holds {', '.join(group_name(m) for m in available) or 'none'})")
            grids, features = [], []
            for m in wanted:
                g = f[group_name(m)]
                grids.append(PatchGrid(
                    magnification=float(g.attrs["magnification"]), mpp=float(g.attrs["mpp"]),
                    patch_size=int(g.attrs["patch_size"]), patch_size_level0=float(g.attrs["patch_size_level0"]),
                    cells=g["cells"][:], coords=g["coords"][:], tissue=g["tissue"][:], parent=g["parent"][:]))
                if load_features:
                    features.append(g["features"][:])
    except OSError as err:
        raise FeatureFileError(f"{path}: not a readable HDF5 feature file ({' '.join(str(err).split())})") from None
    except KeyError as err:
        raise FeatureFileError(f"{path}: incomplete feature file, {err.args[0]} is missing") from None
    return FeatureFile(attrs, contract, grids, features)


def _read_clam(f: h5py.File, path: Path, magnifications: Sequence[float] | None, load_features: bool) -> FeatureFile:
    """CLAM / TRIDENT: ``coords`` (N, 2) level-0 and ``features`` (N, D) at the root."""
    coords_attrs = {k: _attr(v) for k, v in f["coords"].attrs.items()}
    attrs = {k: _attr(v) for k, v in f.attrs.items()}
    recorded = attrs.get("magnification", coords_attrs.get("target_magnification"))
    if magnifications:
        magnification = float(magnifications[0])
    elif recorded is not None:
        magnification = float(recorded)
    else:
        raise FeatureFileError(f"{path}: CLAM/TRIDENT file without a recorded magnification; pass it "
                               "(e.g. --magnifications 20)")
    coords = f["coords"][:].astype(np.int64)
    n = len(coords)
    patch_size = int(coords_attrs.get("patch_size", 256))
    level0 = float(coords_attrs.get("patch_size_level0", patch_size))
    grid = PatchGrid(magnification=magnification, mpp=10.0 / magnification, patch_size=patch_size,
                     patch_size_level0=level0, cells=np.round(coords / level0).astype(np.int64), coords=coords,
                     tissue=np.ones(n, np.float32), parent=np.full(n, -1, np.int64))
    features = [np.asarray(f["features"][:], np.float32).reshape(n, -1)] if load_features else []
    attrs.setdefault("feature_dim", int(f["features"].shape[-1]))
    attrs.setdefault("slide_id", path.stem)
    attrs["magnifications"] = [magnification]
    attrs["layout"] = "clam"
    return FeatureFile(attrs, None, [grid], features)
