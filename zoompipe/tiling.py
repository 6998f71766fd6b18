"""The one slide path: a slide and a pipeline contract give the tissue mask and the patch grids.

``preprocess``, ``predict`` and ``heatmap`` all call :func:`tile_slide` and
:func:`cascade_tiles`, so the patches a model sees at prediction are the ones it was trained on,
user-drawn masks and the children policy included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import GridSettings, PipelineContract
from .errors import UsageError
from .grid import PatchGrid, base_grid, child_grid
from .slide import Slide
from .tissue import TissueMask, mask_from_geojson, mask_from_png, tissue_mask

_MASK_READERS = ((".geojson", mask_from_geojson), (".png", mask_from_png))


@dataclass(frozen=True)
class SlideTiles:
    """A slide's tissue and its base patch grid.

    Attributes
    ----------
    mask : TissueMask
    base : PatchGrid
        Tissue patches at the contract's base magnification.
    mask_file : Path or None
        The user-drawn mask used, None where tissue was segmented.
    """

    mask: TissueMask
    base: PatchGrid
    mask_file: Path | None


def user_mask_file(mask_dir: str | Path, slide_id: str) -> Path | None:
    """``<slide_id>.geojson`` (QuPath export) or ``<slide_id>.png`` in ``mask_dir``, if either exists."""
    for suffix, _ in _MASK_READERS:
        path = Path(mask_dir) / f"{slide_id}{suffix}"
        if path.exists():
            return path
    return None


def check_mask_dir(contract: PipelineContract, mask_dir: str | Path | None) -> None:
    """Refuse to tile without the masks a contract was made with, or with masks it was made without.

    Raises
    ------
    UsageError
    """
    masks = contract.tissue.user_masks
    if masks is not None and mask_dir is None:
        raise UsageError(f"the features were made with the tissue masks of {masks.dir}; pass them with --mask-dir")
    if masks is None and mask_dir is not None:
        raise UsageError("the features were made by segmenting tissue, not from masks; leave out --mask-dir")


def tile_slide(slide: Slide, contract: PipelineContract, mask_dir: str | Path | None = None,
               thumbnail: np.ndarray | None = None) -> SlideTiles:
    """Tissue mask and base grid of a slide as the contract prescribes.

    Parameters
    ----------
    slide : Slide
    contract : PipelineContract
    mask_dir : str or Path, optional
        Folder of user-drawn masks; required exactly when the contract was made with them.
        A slide without a mask file there is segmented.
    thumbnail : ndarray, optional
        ``slide.thumbnail(contract.tissue.segmentation.mask_mpp)`` when the caller has it.

    Raises
    ------
    UsageError
        ``mask_dir`` does not match the contract.
    MaskError, NoTissueError
        An unreadable mask, or no base patch with enough tissue.
    """
    check_mask_dir(contract, mask_dir)
    params = contract.tissue.segmentation
    mask_file = user_mask_file(mask_dir, slide.slide_id) if mask_dir is not None else None
    if mask_file is None:
        mask = tissue_mask(slide, params, thumbnail=thumbnail)
    else:
        reader = dict(_MASK_READERS)[mask_file.suffix]
        mask = reader(mask_file, slide, params.mask_mpp)
    grid = contract.grid
    base = base_grid(mask, slide.mpp, grid.magnifications[0], grid.patch_size, grid.min_tissue)
    return SlideTiles(mask, base, mask_file)


def cascade_tiles(tiles: SlideTiles, grid: GridSettings) -> list[PatchGrid]:
    """Every grid of the cascade as the contract prescribes: what preprocessing embeds.

    Each patch's ``parent`` is its parent's row in the previous grid. Under
    ``children="tissue"``, patches at the cascade's last magnification are kept only with a
    tissue fraction of at least ``min_tissue``, the rule a single-magnification pipeline tiles
    with: glass is neither embedded nor offered to the last attention head. Lower magnifications
    keep all r * r children of every patch, so that each zoom head ranks complete bags.
    """
    grids = [tiles.base]
    for magnification in grid.magnifications[1:]:
        child = child_grid(grids[-1], magnification, mask=tiles.mask)
        if grid.children == "tissue" and magnification == grid.magnifications[-1]:
            child = child.take(child.tissue >= grid.min_tissue)
        grids.append(child)
    return grids
