"""Multi-magnification patch grids whose patches nest exactly.

Every magnification ``m`` has a lattice anchored at level-0 (0, 0). Its patches are
``patch_size`` pixels at ``mpp_m = 10 / m``, so ``s_m = patch_size * mpp_m / slide_mpp`` level-0
pixels (fractional in general: 513.03 at 10x on a 0.499 mpp slide). The patch in lattice cell
``(col, row)`` has its level-0 top-left corner at ``(round(col * s_m), round(row * s_m))``,
halves rounded up, and spans up to the corner of the next cell, so the patches of one
magnification tile the plane without gaps or overlaps.

When ``r = m_next / m`` is an integer, the children of cell ``(col, row)`` are the cells
``(col * r + a, row * r + b)``, ``a, b in 0..r-1``; they tile their parent exactly because the
corners are computed in exact rational arithmetic: ``s_m`` is the fraction ``K / m`` with ``K``
(the level-0 side of a patch at 1x) held to 1/65536 of a pixel, common to all magnifications.
``K`` is recovered exactly from ``patch_size_level0``, so a grid rebuilt from stored fields
(e.g. a feature file) still nests with its children.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Sequence

import numpy as np

from .errors import GridError, NoTissueError
from .slide import magnification_to_mpp
from .tissue import TissueMask

# The level-0 side of a 1x patch is held to 1/65536 px: fine enough to be exact to far below a
# pixel across any slide, coarse enough for the corner arithmetic to stay within int64.
_SUBPIXEL = 1 << 16
# Magnifications are read as fractions with small denominators (1.25 = 5/4, 0.625 = 5/8).
_MAX_DENOMINATOR = 1000


def _exact(magnification: float) -> Fraction:
    if not magnification > 0:
        raise GridError(f"magnification must be positive, got {magnification}")
    fraction = Fraction(magnification).limit_denominator(_MAX_DENOMINATOR)
    if abs(fraction - Fraction(magnification)) > 1e-9 * magnification:
        raise GridError(f"magnification {magnification} is not a simple fraction such as 1.25 or 2.5")
    return fraction


def _ratio(low: float, high: float) -> int:
    ratio = _exact(high) / _exact(low)
    if ratio.denominator != 1 or ratio < 2:
        raise GridError(f"magnifications must increase by integer ratios: {low:g}x -> {high:g}x "
                        f"is a ratio of {float(ratio):.4g}")
    return ratio.numerator


def magnification_ratios(magnifications: Sequence[float]) -> list[int]:
    """The integer zoom factor between each magnification and the next.

    Raises
    ------
    GridError
        Empty list, a magnification that is not positive, or a ratio that is not an integer >= 2.
    """
    if len(magnifications) == 0:
        raise GridError("at least one magnification is needed")
    _exact(magnifications[0])
    return [_ratio(low, high) for low, high in zip(magnifications, magnifications[1:])]


def _unit(level0_side_at_1x: float) -> Fraction:
    """The level-0 side of a patch at 1x, the ``K`` all magnifications of a cascade share."""
    return Fraction(round(level0_side_at_1x * _SUBPIXEL), _SUBPIXEL)


def _corners(index: np.ndarray, step: Fraction) -> np.ndarray:
    """``round(index * step)``, halves up, in exact integer arithmetic."""
    index = np.asarray(index, np.int64)
    if index.size and 2 * (int(np.abs(index).max()) + 1) * step.numerator >= 2**63:
        raise GridError(f"lattice index {int(np.abs(index).max())} is too large for exact corners")
    return (2 * index * step.numerator + step.denominator) // (2 * step.denominator)


@dataclass(eq=False)
class PatchGrid:
    """The patches of one magnification.

    Attributes
    ----------
    magnification : float
    mpp : float
        ``10 / magnification``, the resolution patches are read at.
    patch_size : int
        Patch side in pixels at ``mpp``.
    patch_size_level0 : float
        Patch side in level-0 pixels (``patch_size * mpp / slide_mpp``, fractional).
    cells : ndarray
        (N, 2) int64 lattice cells (col, row).
    coords : ndarray
        (N, 2) int64 level-0 top-left corners (x, y).
    tissue : ndarray
        (N,) float32 tissue fraction of each patch; NaN where no mask was given.
    parent : ndarray
        (N,) int64 row of each patch's parent in the previous magnification's grid; -1 in a
        base grid.
    """

    magnification: float
    mpp: float
    patch_size: int
    patch_size_level0: float
    cells: np.ndarray
    coords: np.ndarray
    tissue: np.ndarray
    parent: np.ndarray

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def step(self) -> Fraction:
        """``patch_size_level0`` as the exact fraction the corners are computed from."""
        # patch_size_level0 is float(K / m): K, a multiple of 1/65536, comes back exactly.
        return _unit(self.patch_size_level0 * self.magnification) / _exact(self.magnification)

    def boxes(self) -> np.ndarray:
        """(N, 4) int64 level-0 boxes ``x0, y0, x1, y1``, ends exclusive.

        ``(x1, y1)`` is the corner of the next lattice cell, so sides are the floor or the
        ceiling of ``patch_size_level0`` and the boxes of a grid never overlap.
        """
        step = self.step
        return np.concatenate([_corners(self.cells, step), _corners(self.cells + 1, step)], axis=1)

    def take(self, rows: np.ndarray) -> PatchGrid:
        """The patches at ``rows`` (indices or a boolean mask), in that order."""
        return replace(self, cells=self.cells[rows], coords=self.coords[rows], tissue=self.tissue[rows],
                       parent=self.parent[rows])


def _grid(cells: np.ndarray, magnification: float, patch_size: int, step: Fraction,
          mask: TissueMask | None, parent: np.ndarray) -> PatchGrid:
    coords = _corners(cells, step)
    if mask is None:
        tissue = np.full(len(cells), np.nan, np.float32)
    else:
        tissue = mask.tissue_fraction(coords, float(step))
    return PatchGrid(magnification=float(magnification), mpp=magnification_to_mpp(magnification),
                     patch_size=patch_size, patch_size_level0=float(step), cells=cells, coords=coords,
                     tissue=tissue, parent=parent)


def base_grid(mask: TissueMask, slide_mpp: float, magnification: float, patch_size: int = 256,
              min_tissue: float = 0.1) -> PatchGrid:
    """The tissue patches of the lowest magnification.

    Every lattice cell whose corner lies inside the slide is a candidate; patches that run
    past the slide's edge are kept (they read as white beyond it). Those with a tissue
    fraction of at least ``min_tissue`` are kept, ordered by (row, col).

    Parameters
    ----------
    mask : TissueMask
    slide_mpp : float
        Level-0 resolution; must be the mask's ``slide_mpp``.
    magnification : float
    patch_size : int
        Patch side in pixels at ``10 / magnification`` mpp.
    min_tissue : float
        Least tissue fraction of a kept patch, in [0, 1].

    Raises
    ------
    NoTissueError
        No patch has enough tissue; the message names the slide, ``min_tissue`` and the mask's
        threshold.
    GridError
        ``slide_mpp`` is not the mask's, or an invalid magnification, patch size or ``min_tissue``.
    """
    if not np.isclose(slide_mpp, mask.slide_mpp, rtol=1e-9, atol=0):
        raise GridError(f"slide_mpp {slide_mpp:g} differs from the tissue mask's {mask.slide_mpp:g}")
    if not 0 <= min_tissue <= 1:
        raise GridError(f"min_tissue must lie in [0, 1], got {min_tissue}")
    if int(patch_size) != patch_size or patch_size < 1:
        raise GridError(f"patch_size must be a positive integer, got {patch_size}")
    patch_size = int(patch_size)
    step = _unit(patch_size * magnification_to_mpp(1.0) / slide_mpp) / _exact(magnification)
    width, height = mask.level0_size
    # Candidates up to one past floor(size / step), so that rounding cannot drop an edge cell.
    cols = np.arange(int(width / step) + 2)
    rows = np.arange(int(height / step) + 2)
    cols, rows = cols[_corners(cols, step) < width], rows[_corners(rows, step) < height]
    grid_rows, grid_cols = np.meshgrid(rows, cols, indexing="ij")
    cells = np.stack([grid_cols.ravel(), grid_rows.ravel()], axis=1).astype(np.int64)
    grid = _grid(cells, magnification, patch_size, step, mask, np.full(len(cells), -1, np.int64))
    keep = grid.tissue >= min_tissue
    if not keep.any():
        raise NoTissueError(
            f"{mask.slide_id or 'slide'}: none of {len(cells)} patches of {patch_size} px at {magnification:g}x "
            f"has a tissue fraction >= {min_tissue:g} (tissue {mask.fraction():.1%} of the slide, "
            f"{mask.source or 'given mask'}); lower min_tissue or use the 'pale' tissue preset")
    return grid.take(keep)


def child_grid(parent: PatchGrid, magnification: float, slide_mpp: float | None = None,
               mask: TissueMask | None = None, rows: Sequence[int] | np.ndarray | None = None) -> PatchGrid:
    """The children, at a higher magnification, of some patches of a grid.

    Children are ordered by parent (in the order of ``rows``), then in raster order (row, then
    column) inside their parent; all ``r * r`` children of each parent are kept whatever their
    tissue, so that a parent's bag of children is always complete.

    Parameters
    ----------
    parent : PatchGrid
    magnification : float
        An integer multiple ``r`` of ``parent.magnification``.
    slide_mpp : float, optional
        Level-0 resolution, only checked against the parent's patch size when given.
    mask : TissueMask, optional
        Fills ``tissue``; NaN without one.
    rows : sequence of int, optional
        Rows of ``parent`` to zoom into (e.g. the selected patches); all rows by default.

    Returns
    -------
    PatchGrid
        ``parent`` holds the row of ``parent`` each child belongs to.

    Raises
    ------
    GridError
        ``magnification`` is not an integer multiple of the parent's, or ``slide_mpp`` does not
        match the parent.
    IndexError
        ``rows`` that are not rows of ``parent``.
    """
    if slide_mpp is not None and not np.isclose(parent.patch_size * parent.mpp / slide_mpp,
                                                parent.patch_size_level0, rtol=1e-6, atol=0):
        raise GridError(f"slide_mpp {slide_mpp:g} does not match the parent grid ({parent.patch_size} px "
                        f"at {parent.mpp:g} mpp = {parent.patch_size_level0:g} level-0 px)")
    r = _ratio(parent.magnification, magnification)
    rows = np.arange(len(parent)) if rows is None else np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= len(parent)):
        raise IndexError(f"rows must lie in 0..{len(parent) - 1}, the rows of the parent grid")
    b, a = np.divmod(np.arange(r * r), r)
    cells = (parent.cells[rows][:, None, :] * r + np.stack([a, b], axis=1)[None]).reshape(-1, 2)
    return _grid(cells, magnification, parent.patch_size, parent.step / r, mask, np.repeat(rows, r * r))


def build_cascade(mask: TissueMask, slide_mpp: float, magnifications: Sequence[float] = (1.25, 2.5, 10),
                  patch_size: int = 256, min_tissue: float = 0.1) -> list[PatchGrid]:
    """The base grid of tissue patches and all their descendants at each next magnification.

    This is what training needs (every child of every tissue patch); inference instead calls
    :func:`child_grid` with the selected rows only.

    Raises
    ------
    GridError
        Magnifications that do not increase by integer ratios.
    NoTissueError
        No base patch has enough tissue.
    """
    magnification_ratios(magnifications)
    grids = [base_grid(mask, slide_mpp, magnifications[0], patch_size, min_tissue)]
    for magnification in magnifications[1:]:
        grids.append(child_grid(grids[-1], magnification, mask=mask))
    return grids


def children_index(parent: PatchGrid, child: PatchGrid) -> np.ndarray:
    """Where each parent's children are in ``child``.

    Built from ``child.parent`` and the cells, not from the order of rows.

    Returns
    -------
    ndarray
        (len(parent), r * r) int64 rows of ``child``, each parent's children in raster order
        (row, then column) of their cells; -1 for children not in ``child``.

    Raises
    ------
    GridError
        A child that does not lie in the parent it names, or two children in the same cell.
    """
    r = _ratio(parent.magnification, child.magnification)
    index = np.full((len(parent), r * r), -1, np.int64)
    if ((child.parent < 0) | (child.parent >= len(parent))).any():
        raise GridError("child grid names parents that are not rows of the parent grid")
    offset = child.cells - parent.cells[child.parent] * r
    if (offset < 0).any() or (offset >= r).any():
        raise GridError("child grid has patches outside the parents they name")
    slot = offset[:, 1] * r + offset[:, 0]
    if len(np.unique(child.parent * r * r + slot)) != len(child):
        raise GridError("child grid has two patches in the same cell")
    index[child.parent, slot] = np.arange(len(child))
    return index
