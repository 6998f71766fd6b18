"""Tissue masks: segmented from a slide thumbnail, or supplied by the user as a PNG or GeoJSON.

A :class:`TissueMask` is a boolean image whose pixel ``(i, j)`` covers the level-0 box
``[j * d, (j + 1) * d) x [i * d, (i + 1) * d)`` with ``d = mask.mpp / slide_mpp``, exactly the
geometry of ``Slide.thumbnail(mask.mpp)``. The mask may run past the slide's right and bottom
edges by less than one pixel; what lies outside the slide never counts as tissue.

Segmentation never raises on a slide without tissue: the empty mask is still worth drawing in
the QC image. The patch grid builder (:func:`zoompipe.grid.base_grid`) raises
:class:`~zoompipe.errors.NoTissueError` when no patch qualifies, naming the slide and the
threshold found here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import shapely
import shapely.affinity
import shapely.errors
import shapely.geometry
from shapely.geometry import Polygon

from .errors import MaskError
from .slide import Slide


@dataclass(frozen=True)
class TissueParams:
    """How tissue is told from glass. Lengths and areas are in microns, so they mean the same
    at any mask resolution.

    Parameters
    ----------
    mask_mpp : float
        Resolution of the thumbnail that is segmented (and of the resulting mask).
    saturation_threshold : float or None
        Fixed threshold on the HSV saturation (0-255); ``None`` uses Otsu's threshold.
    otsu_bounds : (float, float)
        Otsu's threshold is clipped into this range: the floor keeps glass noise out when a
        slide holds almost no tissue, the ceiling keeps pale tissue in when dark tissue
        dominates the histogram (and lets an all-tissue slide stay all tissue).
    median_um : float
        Side of the median filter applied to the saturation.
    closing_um : float
        Diameter of the disk of the morphological closing that joins tissue fragments.
    min_tissue_area_um2 : float
        Connected tissue pieces smaller than this are dropped (dust, debris).
    min_hole_area_um2 : float
        Holes in the tissue smaller than this are filled.
    dark_value : float
        Pixels whose HSV value (brightest channel, 0-255) is below this are black ink or dirt,
        whose hue and saturation are noise.
    pen_hues : (float, float) or None
        Hue range in degrees (0-360) of saturated pixels to drop as pen ink; H&E tissue is
        pink to purple (about 260-360 degrees), marker pens are mostly green and blue.
    """

    mask_mpp: float = 8.0
    saturation_threshold: float | None = None
    otsu_bounds: tuple[float, float] = (12.0, 30.0)
    median_um: float = 24.0
    closing_um: float = 48.0
    min_tissue_area_um2: float = 50_000.0
    min_hole_area_um2: float = 50_000.0
    dark_value: float = 40.0
    pen_hues: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.mask_mpp > 0:
            problems.append(f"mask_mpp must be positive, got {self.mask_mpp}")
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 255:
            problems.append(f"saturation_threshold must lie in 0-255, got {self.saturation_threshold}")
        if len(self.otsu_bounds) != 2 or not 0 <= self.otsu_bounds[0] <= self.otsu_bounds[1] <= 255:
            problems.append(f"otsu_bounds must be (low, high) within 0-255, got {self.otsu_bounds}")
        for name in ("median_um", "closing_um", "min_tissue_area_um2", "min_hole_area_um2", "dark_value"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pen_hues is not None and len(self.pen_hues) != 2:
            problems.append(f"pen_hues must be (low, high) in degrees, got {self.pen_hues}")
        if problems:
            raise MaskError("tissue parameters: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TissueParams":
        """The inverse of ``dataclasses.asdict``, also after a JSON round trip (lists become tuples)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MaskError(f"unknown tissue parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


PRESETS: dict[str, TissueParams] = {
    "default": TissueParams(),
    # Faintly stained or thin tissue: CLAM's fixed threshold, small fragments kept.
    "pale": TissueParams(saturation_threshold=8.0, min_tissue_area_um2=10_000.0),
    # Marked-up or dirty slides: only well-stained tissue, pen ink and dark debris removed.
    "strict": TissueParams(otsu_bounds=(20.0, 45.0), dark_value=80.0, pen_hues=(60.0, 245.0),
                           min_tissue_area_um2=200_000.0),
}


def get_params(preset: str = "default", **overrides: Any) -> TissueParams:
    """A preset from :data:`PRESETS`, with some parameters replaced.

    Raises
    ------
    MaskError
        Unknown preset or parameter name, or an invalid value.
    """
    if preset not in PRESETS:
        raise MaskError(f"unknown tissue preset {preset!r}; choose {', '.join(PRESETS)}")
    return TissueParams.from_dict({**dataclasses.asdict(PRESETS[preset]), **overrides})


def _odd_pixels(microns: float, mpp: float) -> int:
    """A filter side in pixels, odd so that the filter is centred (even sides round up)."""
    return 2 * int(microns / mpp // 2) + 1


def _fewer_pixels_than(area: float) -> int:
    """The largest whole number of pixels that is ``< area``: components of at most that many go."""
    return max(math.ceil(area) - 1, 0)


def _without_small_components(mask: np.ndarray, max_size: int, connectivity: int) -> np.ndarray:
    """``mask`` without its connected components of at most ``max_size`` pixels.

    scikit-image's ``remove_small_objects`` (``connectivity`` 1: 4-connected, 2: 8-connected),
    computed with OpenCV's labelling: 10-20x faster on a slide's thumbnail, the same result
    (``tests/test_tissue.py``).
    """
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.view(np.uint8), connectivity=4 if connectivity == 1 else 8, ltype=cv2.CV_32S)
    small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] <= max_size) + 1  # label 0 is outside the mask
    x, y, w, h = (stats[small, i] for i in range(4))
    if (w * h).sum() > labels.size // 4:  # many or sprawling pieces: one pass over the image
        keep = stats[:, cv2.CC_STAT_AREA] > max_size
        keep[0] = False
        return keep[labels]
    # Usually few pieces are small (none on most slides): clearing them in their bounding boxes
    # spares a lookup of every pixel's label (0.08 s per call on a 4096 x 3072 thumbnail).
    out = mask.copy()
    for label, x0, y0, width, height in zip(small, x, y, w, h):
        box = slice(y0, y0 + height), slice(x0, x0 + width)
        out[box] &= labels[box] != label
    return out


def _segment(rgb: np.ndarray, mpp: float, params: TissueParams) -> tuple[np.ndarray, float]:
    """The tissue mask and the saturation threshold that made it."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)
    hue, raw_saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    saturation = cv2.medianBlur(raw_saturation, _odd_pixels(params.median_um, mpp))
    if params.saturation_threshold is None:
        otsu = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[0]
        threshold = float(np.clip(otsu, *params.otsu_bounds))
    else:
        threshold = float(params.saturation_threshold)
    tissue = (saturation > threshold) & (value >= params.dark_value)
    if params.pen_hues is not None:
        low, high = (h / 2 for h in params.pen_hues)  # OpenCV stores hue in 0-180
        tissue &= ~((hue >= low) & (hue <= high) & (raw_saturation > threshold))
    side = int(round(params.closing_um / mpp))
    if side >= 2:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
        tissue = cv2.morphologyEx(tissue.view(np.uint8), cv2.MORPH_CLOSE, disk).view(bool)
    pixel_area = mpp * mpp
    tissue = _without_small_components(tissue, _fewer_pixels_than(params.min_tissue_area_um2 / pixel_area), 2)
    # Background is 4-connected where tissue is 8-connected, so that the two never cross. Glass
    # that reaches the edge is open, not a hole: a glass frame larger than any hole joins it
    # into one piece that is never filled.
    largest_hole = _fewer_pixels_than(params.min_hole_area_um2 / pixel_area)
    side = math.isqrt(largest_hole) + 1
    glass = ~np.pad(tissue, side)
    holes = glass & ~_without_small_components(glass, largest_hole, 1)
    return (~glass | holes)[side:-side, side:-side], threshold


def segment_tissue(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Segment tissue in an RGB image of a slide.

    HSV saturation, median blur, Otsu's or a fixed threshold, removal of dark and pen pixels,
    morphological closing, removal of small pieces and filling of small holes.

    Parameters
    ----------
    rgb : ndarray
        (H, W, 3) uint8 image (RGBA is accepted, alpha is ignored).
    mpp : float
        Microns per pixel of ``rgb``; converts the micron-sized parameters into pixels.
    params : TissueParams, optional
        Default ``PRESETS["default"]``; its ``mask_mpp`` is not used here.

    Returns
    -------
    ndarray
        (H, W) bool, True on tissue. Blank, constant or all-tissue images are valid input.
    """
    return _segment(rgb, mpp, params or PRESETS["default"])[0]


@dataclass(eq=False)
class TissueMask:
    """A tissue mask of a whole slide, with the geometry that maps it onto level 0.

    Attributes
    ----------
    mask : ndarray
        (h, w) bool, True on tissue.
    mpp : float
        Microns per pixel of the mask.
    level0_size : (int, int)
        Level-0 (width, height) of the slide the mask covers.
    slide_mpp : float
        Level-0 microns per pixel of that slide.
    params : TissueParams or None
        How the mask was segmented; None for user-supplied masks.
    threshold : float or None
        Saturation threshold used; None for user-supplied masks.
    slide_id : str
        Name of the slide, for messages.
    source : str
        How the mask was made, for messages.
    """

    mask: np.ndarray
    mpp: float
    level0_size: tuple[int, int]
    slide_mpp: float
    params: TissueParams | None = None
    threshold: float | None = None
    slide_id: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        self.mask = np.ascontiguousarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"a tissue mask is 2-D, got shape {self.mask.shape}")
        self.level0_size = (int(self.level0_size[0]), int(self.level0_size[1]))

    @property
    def downsample(self) -> float:
        """Level-0 pixels per mask pixel."""
        return self.mpp / self.slide_mpp

    @cached_property
    def _integral(self) -> np.ndarray:
        return cv2.integral(self.mask.view(np.uint8), sdepth=cv2.CV_64F)

    def _area(self, x0: np.ndarray | float, y0: np.ndarray | float, x1: np.ndarray | float,
              y1: np.ndarray | float) -> np.ndarray:
        """Tissue area, in mask pixels, of level-0 boxes clipped to the slide."""
        width, height = self.level0_size
        h, w = self.mask.shape
        integral = self._integral

        def cumulative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            # The area function is bilinear inside each mask pixel, so interpolating the
            # integral image bilinearly is exact for boxes with fractional corners.
            u = np.clip(np.clip(x, 0, width) / self.downsample, 0, w)
            v = np.clip(np.clip(y, 0, height) / self.downsample, 0, h)
            i = np.minimum(np.floor(u).astype(np.int64), w - 1)
            j = np.minimum(np.floor(v).astype(np.int64), h - 1)
            fu, fv = u - i, v - j
            return ((1 - fu) * (1 - fv) * integral[j, i] + fu * (1 - fv) * integral[j, i + 1]
                    + (1 - fu) * fv * integral[j + 1, i] + fu * fv * integral[j + 1, i + 1])

        return cumulative(x1, y1) - cumulative(x0, y1) - cumulative(x1, y0) + cumulative(x0, y0)

    def fraction(self) -> float:
        """Share of the slide's area that is tissue."""
        width, height = self.level0_size
        area = self._area(0.0, 0.0, float(width), float(height))
        return float(np.clip(area * self.downsample**2 / (width * height), 0.0, 1.0))

    def tissue_fraction(self, coords_level0: np.ndarray, size_level0: float) -> np.ndarray:
        """Share of each square box ``[x, x + size) x [y, y + size)`` (level 0) that is tissue.

        Parts of a box outside the slide count as glass.

        Parameters
        ----------
        coords_level0 : ndarray
            (N, 2) top-left corners (x, y) in level-0 pixels.
        size_level0 : float
            Side of the boxes in level-0 pixels (may be fractional).

        Returns
        -------
        ndarray
            (N,) float32 in [0, 1].
        """
        xy = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
        x0, y0 = xy[:, 0], xy[:, 1]
        area = self._area(x0, y0, x0 + size_level0, y0 + size_level0)
        # Rounded: differences of the integral image leave ~1e-13 of noise where there is no tissue.
        return np.clip(np.round(area * (self.downsample / size_level0) ** 2, 6), 0.0, 1.0).astype(np.float32)

    def polygons(self) -> list[list[np.ndarray]]:
        """Outlines of the tissue pieces in level-0 pixels.

        Each piece is ``[exterior, *holes]``, rings of (K, 2) float (x, y) through the centres
        of the boundary pixels (tissue pixels for the exterior, glass pixels for the holes), so
        that filling the exterior and clearing the holes at the mask's resolution gives the mask
        back; vertices are clipped to the slide. Pieces and holes one pixel thin have no area as
        polygons and are left out.
        """
        pieces = []
        count, labels, stats, _ = cv2.connectedComponentsWithStats(self.mask.view(np.uint8), connectivity=8)
        for label in range(1, count):
            x, y, w, h = stats[label, :4]
            # Padded with glass, so that the glass around the piece is one component, not a hole.
            piece = np.pad(labels[y:y + h, x:x + w] == label, 1)
            exterior = _rings(piece, (x - 1, y - 1))
            if not exterior:
                continue
            holes = []
            hole_count, hole_labels, hole_stats, _ = cv2.connectedComponentsWithStats((~piece).view(np.uint8),
                                                                                       connectivity=4)
            outside = hole_labels[0, 0]
            for hole in range(1, hole_count):
                if hole == outside:
                    continue
                hx, hy, hw, hh = hole_stats[hole, :4]
                holes += _rings(hole_labels[hy:hy + hh, hx:hx + hw] == hole, (x - 1 + hx, y - 1 + hy))
            # The last mask pixels run past the slide's edge, and with them their centres.
            pieces.append([np.minimum((ring + 0.5) * self.downsample, self.level0_size)
                           for ring in exterior + holes])
        return pieces


def _rings(region: np.ndarray, offset: tuple[int, int]) -> list[np.ndarray]:
    """Outer boundary rings (through pixel centres, in mask pixels) of the pieces of a region."""
    # A glass margin, so that pieces on the crop's edge are traced along that edge.
    padded = np.pad(region, 1).view(np.uint8)
    contours = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
    return [c[:, 0, :].astype(np.float64) + offset - 1 for c in contours if len(c) >= 3]


def tissue_mask(slide: Slide, params: TissueParams | None = None, *,
                thumbnail: np.ndarray | None = None) -> TissueMask:
    """Segment a slide's tissue on its thumbnail at ``params.mask_mpp``.

    Only the thumbnail is read, from the coarsest adequate pyramid level, so memory is bounded
    by the thumbnail whatever the slide's size.

    Parameters
    ----------
    slide : Slide
    params : TissueParams, optional
        Default ``PRESETS["default"]``.
    thumbnail : ndarray, optional
        ``slide.thumbnail(params.mask_mpp)`` when the caller already has it (for the QC image).

    Returns
    -------
    TissueMask
        Possibly empty: a slide without tissue is reported by the grid builder.
    """
    params = params or PRESETS["default"]
    if thumbnail is None:
        thumbnail = slide.thumbnail(params.mask_mpp)
    expected = slide.thumbnail_size(params.mask_mpp)
    if thumbnail.shape[1::-1] != expected:
        raise ValueError(f"thumbnail is {thumbnail.shape[1]}x{thumbnail.shape[0]}, "
                         f"slide.thumbnail({params.mask_mpp:g}) is {expected[0]}x{expected[1]}")
    mask, threshold = _segment(thumbnail, params.mask_mpp, params)
    how = "Otsu saturation threshold" if params.saturation_threshold is None else "saturation threshold"
    return TissueMask(mask, params.mask_mpp, slide.dimensions, slide.mpp, params=params, threshold=threshold,
                      slide_id=slide.slide_id, source=f"{how} {threshold:g}")


def _empty_mask(slide: Slide, mask_mpp: float) -> np.ndarray:
    width, height = slide.thumbnail_size(mask_mpp)
    return np.zeros((height, width), bool)


def mask_from_png(path: str | Path, slide: Slide, mask_mpp: float = TissueParams.mask_mpp) -> TissueMask:
    """A user-drawn tissue mask: a PNG of any size covering the whole slide, nonzero on tissue.

    The PNG is resampled onto the grid of ``slide.thumbnail(mask_mpp)``. In colour PNGs any
    nonzero colour channel means tissue; an alpha channel is ignored.

    Raises
    ------
    MaskError
        The file cannot be read, or its aspect ratio is not the slide's.
    """
    path = Path(path)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise MaskError(f"{path}: cannot read as an image")
    drawn = image[..., :3].any(axis=-1) if image.ndim == 3 else image > 0
    width, height = slide.dimensions
    png_h, png_w = drawn.shape
    if abs(png_h - png_w * height / width) > max(1.0, 0.02 * png_h):
        raise MaskError(f"{path}: a {png_w}x{png_h} mask cannot cover {slide.slide_id} "
                        f"({width}x{height}): the aspect ratios differ")
    downsample = mask_mpp / slide.mpp
    # The slide spans a fractional number of mask pixels; the rest of the last ones is glass.
    span = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    resized = cv2.resize(drawn.astype(np.float32), span, interpolation=cv2.INTER_AREA) >= 0.5
    mask = _empty_mask(slide, mask_mpp)
    h, w = min(mask.shape[0], span[1]), min(mask.shape[1], span[0])
    mask[:h, :w] = resized[:h, :w]
    return TissueMask(mask, mask_mpp, slide.dimensions, slide.mpp, slide_id=slide.slide_id,
                      source=f"mask file {path.name}")


def _polygon_geometries(node: Any) -> Iterator[dict]:
    """The Polygon and MultiPolygon geometries anywhere in a GeoJSON document."""
    if isinstance(node, list):
        for item in node:
            yield from _polygon_geometries(item)
    elif isinstance(node, dict):
        kind = node.get("type")
        if kind in ("Polygon", "MultiPolygon"):
            yield node
        elif kind == "FeatureCollection":
            yield from _polygon_geometries(node.get("features", []))
        elif kind == "Feature":
            yield from _polygon_geometries(node.get("geometry"))
        elif kind == "GeometryCollection":
            yield from _polygon_geometries(node.get("geometries", []))


def _fill_polygon(mask: np.ndarray, polygon: Polygon) -> None:
    """Set the pixels whose centres lie in a polygon or on its edge (coordinates in mask pixels)."""
    x0, y0, x1, y1 = polygon.bounds
    cols = np.arange(max(math.ceil(x0 - 0.5), 0), min(math.floor(x1 - 0.5) + 1, mask.shape[1]))
    rows = np.arange(max(math.ceil(y0 - 0.5), 0), min(math.floor(y1 - 0.5) + 1, mask.shape[0]))
    if not len(cols) or not len(rows):
        return
    xs, ys = np.meshgrid(cols + 0.5, rows + 0.5)
    exterior = Polygon(polygon.exterior)
    shapely.prepare(exterior)
    inside = shapely.intersects_xy(exterior, xs, ys)
    for hole in polygon.interiors:  # a centre on a hole's edge is glass
        inside &= ~shapely.intersects_xy(Polygon(hole), xs, ys)
    # Each polygon on its own: its holes must not clear other polygons (islands in lakes).
    mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] |= inside


def mask_from_geojson(path: str | Path, slide: Slide, mask_mpp: float = TissueParams.mask_mpp) -> TissueMask:
    """A tissue mask from GeoJSON annotations in level-0 pixels (QuPath's export).

    Accepts a FeatureCollection, a list of features, a single feature or geometry; every
    Polygon and MultiPolygon (holes included) counts as tissue, other geometries are ignored.
    Polygons are rasterised at ``mask_mpp``: a mask pixel is tissue when its centre is inside.

    Raises
    ------
    MaskError
        The file cannot be read, is not JSON, or holds no valid polygon.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MaskError(f"{path}: cannot read GeoJSON ({' '.join(str(err).split())})") from err
    mask = _empty_mask(slide, mask_mpp)
    downsample = mask_mpp / slide.mpp
    found = 0
    for geometry in _polygon_geometries(document):
        try:
            shapes = shapely.geometry.shape(geometry)
            if not np.isfinite(shapely.get_coordinates(shapes)).all():
                raise ValueError("coordinates must be finite numbers")
        except (TypeError, ValueError, IndexError, AttributeError, shapely.errors.ShapelyError) as err:
            raise MaskError(f"{path}: malformed polygon coordinates ({' '.join(str(err).split())})") from err
        for polygon in getattr(shapes, "geoms", [shapes]):
            if polygon.area > 0:  # rings of fewer than 3 vertices enclose nothing
                # Vertices snapped to 1/16 mask pixel, so that outlines traced through pixel
                # centres (tissue_geojson) and rounded in level-0 pixels pass through them again.
                scaled = shapely.affinity.scale(polygon, 1 / downsample, 1 / downsample, origin=(0, 0))
                snapped = shapely.set_precision(scaled, 1 / 16)
                for part in getattr(snapped, "geoms", [snapped]):  # snapping may split a thin polygon
                    if isinstance(part, Polygon) and not part.is_empty:
                        _fill_polygon(mask, part)
                found += 1
    if not found:
        raise MaskError(f"{path}: no Polygon or MultiPolygon with at least 3 vertices")
    return TissueMask(mask, mask_mpp, slide.dimensions, slide.mpp, slide_id=slide.slide_id,
                      source=f"mask file {path.name}")
