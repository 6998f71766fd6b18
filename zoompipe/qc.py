"""What people look at to check a slide: a thumbnail with tissue outlines and patch grids, and
the tissue as GeoJSON that QuPath opens. Files are written atomically (temporary name, then
``os.replace``), so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon

from .atomic import write_bytes

if TYPE_CHECKING:
    from .grid import PatchGrid
    from .tissue import TissueMask

TISSUE_RGB = (0, 200, 0)
#: Colours of the patch grids, from the base magnification up.
GRID_RGB = ((30, 60, 230), (255, 140, 0), (210, 0, 210), (0, 170, 200))
_SHIFT = 4  # fractional bits of the vertices handed to OpenCV's drawing functions


def overview_mpp(slide_mpp: float, dimensions: tuple[int, int], max_side: int = 2048) -> float:
    """Resolution at which a whole slide fits in ``max_side`` pixels, never finer than 1 um/px.

    QC images and heatmaps are drawn at it: fine enough to see 10x patches on a small slide,
    bounded in memory on a large one.
    """
    return max(slide_mpp * max(dimensions) / max_side, 1.0)


def tissue_geojson(mask: TissueMask) -> dict:
    """The tissue of a mask as a GeoJSON FeatureCollection in level-0 pixels.

    One Polygon feature (exterior and holes) per connected piece of tissue, classified as
    ``Tissue`` annotations, the way QuPath exports and imports them.
    """
    features = []
    for exterior, *holes in mask.polygons():
        polygon = Polygon(np.round(exterior, 2), [np.round(hole, 2) for hole in holes])
        features.append({
            "type": "Feature",
            "geometry": json.loads(shapely.to_geojson(polygon)),
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}},
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, obj: Any) -> None:
    """Write a JSON-serialisable object (e.g. :func:`tissue_geojson`) atomically."""
    write_bytes(path, json.dumps(obj).encode())


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB (H, W, 3) uint8 image as PNG atomically."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError(f"cannot encode a {rgb.shape} {rgb.dtype} array as PNG")
    write_bytes(path, data.tobytes())


def _to_pixels(level0: np.ndarray, scale: float) -> np.ndarray:
    """Level-0 positions to fixed-point image positions; OpenCV puts pixel centres on integers."""
    return np.round((np.asarray(level0, np.float64) / scale - 0.5) * (1 << _SHIFT)).astype(np.int32)


def qc_image(thumbnail: np.ndarray, mask: TissueMask, grids: Sequence[PatchGrid] = (),
             thumbnail_mpp: float | None = None) -> np.ndarray:
    """Draw tissue outlines and patch grids on a slide thumbnail.

    Parameters
    ----------
    thumbnail : ndarray
        (H, W, 3) uint8 RGB, ``slide.thumbnail(thumbnail_mpp)``.
    mask : TissueMask
        Its outlines are drawn in green.
    grids : sequence of PatchGrid
        Patch boxes drawn as thin rectangles, one colour per grid (:data:`GRID_RGB`): pass the
        base grid, and the zoomed-in grids to show where a model looked.
    thumbnail_mpp : float, optional
        Resolution of the thumbnail; by default the mask's, and the thumbnail must then have
        the mask's shape.

    Returns
    -------
    ndarray
        A new (H, W, 3) uint8 RGB image.
    """
    if thumbnail_mpp is None:
        if thumbnail.shape[:2] != mask.mask.shape:
            raise ValueError(f"thumbnail {thumbnail.shape[:2]} is not at the mask's resolution "
                             f"{mask.mask.shape}; pass thumbnail_mpp")
        thumbnail_mpp = mask.mpp
    scale = thumbnail_mpp / mask.slide_mpp  # level-0 pixels per thumbnail pixel
    image = np.ascontiguousarray(thumbnail[..., :3]).copy()
    for index, grid in enumerate(grids):
        colour = GRID_RGB[index % len(GRID_RGB)]
        for x0, y0, x1, y1 in _to_pixels(grid.boxes(), scale):
            cv2.rectangle(image, (x0, y0), (x1, y1), colour, 1, cv2.LINE_8, _SHIFT)
    outlines = [_to_pixels(ring, scale) for rings in mask.polygons() for ring in rings]
    thickness = max(1, round(max(image.shape[:2]) / 600))
    cv2.polylines(image, outlines, True, TISSUE_RGB, thickness, cv2.LINE_AA, _SHIFT)
    return image
