"""Synthetic pyramidal whole-slide images that OpenSlide and tiffslide both read.

Slides are written tile by tile from a *renderer*, a function that draws any box of any
pyramid level on demand, so a 40x slide of 100,000 x 80,000 px needs only a few tiles in
memory at a time. Two renderers are provided: :func:`array_renderer` (levels cut from arrays
held in memory, for pixel-exact tests) and :class:`SyntheticTissue` (procedural tissue blobs on
glass with nuclei, deterministic from a seed, for slides of any size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import tifffile

from .atomic import atomic_path, write_bytes, write_text

#: ``render(downsample, x, y, width, height)`` returns the (height, width, 3) uint8 RGB box
#: whose top-left pixel is (x, y) in the coordinates of the level with that downsample.
Renderer = Callable[[float, int, int, int, int], np.ndarray]

GLASS_RGB = (242, 242, 244)
EOSIN_RGB = np.array([232, 170, 205], dtype=np.float32)
HEMATOXYLIN_RGB = np.array([82, 52, 135], dtype=np.float32)


def pyramid_downsamples(width: int, height: int, factor: int = 4, min_side: int = 1024) -> list[int]:
    """Downsamples of an Aperio-like pyramid: powers of ``factor`` while the level stays large.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels.
    factor : int
        Ratio between successive levels (Aperio scanners use 4).
    min_side : int
        A reduced level is added only while its longer side is at least this many pixels.
    """
    downsamples = [1]
    while max(width, height) // (downsamples[-1] * factor) >= min_side:
        downsamples.append(downsamples[-1] * factor)
    return downsamples


def _level_size(width: int, height: int, downsample: float) -> tuple[int, int]:
    return max(1, int(width // downsample)), max(1, int(height // downsample))


def _tiles(render: Renderer, downsample: float, size: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    """Yield the tiles of one level in TIFF order, edge tiles padded with glass colour."""
    width, height = size
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            w, h = min(tile, width - tx), min(tile, height - ty)
            box = render(downsample, tx, ty, w, h)
            if (w, h) != (tile, tile):
                padded = np.empty((tile, tile, 3), np.uint8)
                padded[:] = GLASS_RGB
                padded[:h, :w] = box
                box = padded
            yield box


def write_slide(
    path: str | Path,
    width: int,
    height: int,
    render: Renderer,
    *,
    mpp: float | None,
    magnification: float | None = None,
    downsamples: Sequence[int] | None = None,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    flavour: str = "aperio",
    thumbnail_side: int = 768,
) -> list[tuple[int, int]]:
    """Write a tiled pyramidal TIFF, one tile in memory at a time.

    Parameters
    ----------
    path : str or Path
        Output file; ``.svs`` for the Aperio flavour by convention.
    width, height : int
        Level-0 size in pixels.
    render : Renderer
        Draws the pixels of any box of any level.
    mpp : float or None
        Microns per pixel at level 0; ``None`` writes a slide without resolution metadata.
    magnification : float, optional
        Objective power written as ``AppMag``; defaults to ``10 / mpp``.
    downsamples : sequence of int, optional
        Pyramid downsamples, starting with 1; default :func:`pyramid_downsamples`.
    tile : int
        Tile side in pixels.
    compression : str
        ``"jpeg"`` (what scanners write) or a lossless codec (``"zlib"``, ``"lzw"``, ``"none"``)
        for pixel-exact tests.
    quality : int
        JPEG quality.
    flavour : {"aperio", "generic"}
        ``"aperio"``: an SVS-like file (Aperio ImageDescription, stripped thumbnail in page 1,
        reduced levels tiled in later pages). ``"generic"``: a plain pyramidal TIFF whose
        resolution lives in the TIFF resolution tags.
    thumbnail_side : int
        Longer side of the Aperio thumbnail page.

    Returns
    -------
    list of (int, int)
        The (width, height) of every level written.
    """
    if flavour not in ("aperio", "generic"):
        raise ValueError(f"unknown flavour {flavour!r}")
    downsamples = list(downsamples or pyramid_downsamples(width, height))
    sizes = [_level_size(width, height, d) for d in downsamples]
    codec = None if compression == "none" else compression
    options: dict = dict(photometric="rgb", compression=codec, metadata=None)
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    bigtiff = width * height * 3 > 2**31
    power = magnification if magnification is not None else (10.0 / mpp if mpp else None)

    def description(size: tuple[int, int], reduced: bool) -> str | None:
        if flavour != "aperio":
            return None
        head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
        if reduced:
            head += f" -> {size[0]}x{size[1]}"
        head += f" {compression.upper()}/RGB Q={quality}"
        fields = []
        if power is not None:
            fields.append(f"AppMag = {power:g}")
        if mpp is not None:
            fields.append(f"MPP = {mpp:.4f}")
        return "|".join([head, *fields])

    def resolution(downsample: float) -> dict:
        if flavour != "generic" or mpp is None:
            return {}
        per_cm = 1e4 / (mpp * downsample)
        return dict(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for index, (downsample, size) in enumerate(zip(downsamples, sizes)):
            tif.write(
                _tiles(render, downsample, size, tile),
                shape=(size[1], size[0], 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=description(size, index > 0),
                subfiletype=1 if (index > 0 and flavour == "generic") else 0,
                **resolution(downsample),
                **options,
            )
            if index == 0 and flavour == "aperio":
                scale = max(width, height) / thumbnail_side
                thumb_size = _level_size(width, height, scale)
                thumb = render(scale, 0, 0, *thumb_size)
                tif.write(thumb, description=description(thumb_size, True), rowsperstrip=16, **options)
    return sizes


def array_renderer(levels: Sequence[np.ndarray], downsamples: Sequence[float]) -> Renderer:
    """A renderer that cuts boxes from level arrays held in memory (for small test slides)."""
    by_downsample = {float(d): a for d, a in zip(downsamples, levels)}

    def render(downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        level = by_downsample.get(float(downsample))
        if level is None:  # the Aperio thumbnail: any other scale, drawn from level 0
            level = cv2.resize(levels[0], _level_size(levels[0].shape[1], levels[0].shape[0], downsample),
                               interpolation=cv2.INTER_AREA)
        return level[y:y + h, x:x + w]

    return render


def write_array_slide(
    path: str | Path,
    image: np.ndarray,
    *,
    mpp: float | None,
    downsamples: Sequence[int] = (1, 4),
    **kwargs,
) -> list[np.ndarray]:
    """Write an RGB array as a pyramidal slide; reduced levels are area-averaged copies.

    Returns
    -------
    list of ndarray
        The array of every level, exactly as written (before any lossy compression).
    """
    height, width = image.shape[:2]
    levels = [image] + [
        cv2.resize(image, _level_size(width, height, d), interpolation=cv2.INTER_AREA) for d in downsamples[1:]
    ]
    write_slide(path, width, height, array_renderer(levels, downsamples), mpp=mpp,
                downsamples=downsamples, **kwargs)
    return levels


def _hash_uniform(seed: int, *keys: np.ndarray) -> np.ndarray:
    """Counter-based uniform numbers in [0, 1): the same cell gives the same number on every tile."""
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point of the hash
        h = np.full(np.broadcast(*keys).shape, np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
        for key in keys:
            h ^= np.asarray(key).astype(np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) + (h << np.uint64(6)) + (h >> np.uint64(2))
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


#: Nuclei inside lesions, per grade: (mean radius um, elongation, irregularity). Sizes and shapes
#: differ; the hematoxylin area share does not (see ``LESION_COVERAGE``), so the grades look the
#: same once nuclei are smaller than a pixel (1.25x) and differ only at high magnification.
GRADES = {
    0: (3.0, 1.0, 0.0),   # normal: small round nuclei
    1: (4.5, 1.7, 0.0),   # atypical: larger, elongated
    2: (6.0, 1.25, 0.35),  # malignant: large, pleomorphic
}
GRADE_NAMES = ("normal", "atypical", "malignant")
TISSUE_COVERAGE = 0.08  # hematoxylin area share of ordinary tissue
LESION_COVERAGE = 0.30  # ... and of a lesion, whatever its grade
_BACKGROUND_RADIUS_UM = 3.5
_DRAW_RADIUS_UM = 3.0  # nuclei are drawn on levels where this is at least one pixel, blended below


def lesion_nuclei(grade: int, strength: float = 1.0) -> tuple[float, float, float]:
    """Nucleus (radius um, elongation, irregularity) inside the lesions of a grade.

    Parameters
    ----------
    grade : int
        Key of :data:`GRADES`.
    strength : float
        Linear interpolation from the normal grade (0) to ``grade`` as written in :data:`GRADES`
        (1); the lesions' hematoxylin area share stays :data:`LESION_COVERAGE` either way.
    """
    normal, target = np.array(GRADES[0]), np.array(GRADES[grade])
    return tuple(float(v) for v in normal + strength * (target - normal))


def _cell_size(radius_um: float, elongation: float, irregularity: float, coverage: float, presence: float) -> float:
    """Lattice spacing (um) that gives a hematoxylin area share of ``coverage``."""
    # Radius factor 0.75 + 0.5u, u ~ U(0, 1): E[f^2] = 1.0208; irregularity scales radii by (1 + i(v - 0.5)).
    mean_area = math.pi * radius_um**2 * 1.0208 * (1 + irregularity**2 / 12)
    return math.sqrt(presence * mean_area / coverage)


@dataclass
class SyntheticTissue:
    """Procedural H&E-like tissue: pink blobs on glass, purple nuclei, optional graded lesions.

    Everything is a function of level-0 position and ``seed``, so any box of any pyramid level
    can be drawn on its own and the levels agree with each other.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels.
    mpp : float
        Microns per pixel at level 0.
    seed : int
        Seed of the tissue layout and of the nuclei.
    n_blobs : int
        Number of tissue pieces.
    tissue_fraction : float
        Rough share of the slide the blobs cover.
    n_lesions : int
        Suspicious regions: denser than the tissue around them at every magnification, with
        nuclei whose size and shape depend on ``grade``.
    lesion_um : (float, float)
        Range of lesion diameters in microns.
    grade : int
        Key of :data:`GRADES`, the class of the slide.
    grade_strength : float
        How far the lesion nuclei move from the normal grade towards ``grade``
        (:func:`lesion_nuclei`): 1 gives :data:`GRADES` as they are, smaller values subtler
        classes, 0 classes that no magnification tells apart.
    """

    width: int
    height: int
    mpp: float = 0.25
    seed: int = 0
    n_blobs: int = 5
    tissue_fraction: float = 0.3
    n_lesions: int = 0
    lesion_um: tuple[float, float] = (500.0, 2000.0)
    grade: int = 0
    grade_strength: float = 1.0

    def __post_init__(self) -> None:
        # The layout lives on coarse fields; every level samples them bilinearly so that borders
        # are smooth and identical across levels.
        self.field_downsample = max(self.width, self.height) / 512.0
        fw = max(2, math.ceil(self.width / self.field_downsample))
        fh = max(2, math.ceil(self.height / self.field_downsample))
        rng = np.random.default_rng(self.seed)
        field = np.zeros((fh, fw), np.float32)
        area_each = self.tissue_fraction * fw * fh / self.n_blobs
        for _ in range(self.n_blobs):
            ratio = rng.uniform(0.5, 1.0)
            a = math.sqrt(area_each / (math.pi * ratio))
            axes = (max(2, int(a)), max(2, int(a * ratio)))
            centre = (int(rng.uniform(0.2, 0.8) * fw), int(rng.uniform(0.2, 0.8) * fh))
            cv2.ellipse(field, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        wobble = cv2.GaussianBlur(rng.standard_normal((fh, fw)).astype(np.float32), (0, 0), 6)
        self.field = cv2.GaussianBlur(field, (0, 0), 3) + 2.0 * wobble
        self.lesion_field = self._place_lesions(rng)

    def _place_lesions(self, rng: np.random.Generator) -> np.ndarray:
        """Lesion ellipses centred on tissue, away from its border, on a field like the tissue's."""
        lesions = np.zeros_like(self.field)
        inner = cv2.erode((self.field > 0.5).astype(np.uint8), np.ones((9, 9), np.uint8))
        candidates = np.argwhere(inner > 0)
        um_per_cell = self.field_downsample * self.mpp
        for _ in range(self.n_lesions if len(candidates) else 0):
            cy, cx = candidates[rng.integers(len(candidates))]
            diameter = rng.uniform(*self.lesion_um) / um_per_cell
            ratio = rng.uniform(0.6, 1.0)
            axes = (max(1, round(diameter / 2)), max(1, round(diameter * ratio / 2)))
            cv2.ellipse(lesions, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        return cv2.GaussianBlur(lesions, (0, 0), 1.0) if self.n_lesions else lesions

    # -- layout -------------------------------------------------------------------------------

    def _sample(self, field: np.ndarray, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A coarse field sampled at the centres of a box of pixels of a level."""
        xs = ((x + np.arange(w) + 0.5) * downsample / self.field_downsample - 0.5).astype(np.float32)
        ys = ((y + np.arange(h) + 0.5) * downsample / self.field_downsample - 0.5).astype(np.float32)
        map_x, map_y = np.meshgrid(xs, ys)
        return cv2.remap(field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def _at_points(self, field: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """A coarse field at level-0 points (nearest cell)."""
        fx = np.clip(np.round(px / self.field_downsample - 0.5), 0, field.shape[1] - 1).astype(int)
        fy = np.clip(np.round(py / self.field_downsample - 0.5), 0, field.shape[0] - 1).astype(int)
        return field[fy, fx]

    def tissue_mask(self, downsample: float, x: int = 0, y: int = 0, w: int | None = None,
                    h: int | None = None) -> np.ndarray:
        """Ground-truth tissue mask of a box of the level with this downsample (whole level by default)."""
        lw, lh = _level_size(self.width, self.height, downsample)
        return self._sample(self.field, downsample, x, y, lw if w is None else w, lh if h is None else h) > 0.5

    def lesion_mask(self, downsample: float) -> np.ndarray:
        """Ground-truth lesion mask of the whole level with this downsample."""
        lw, lh = _level_size(self.width, self.height, downsample)
        return (self._sample(self.lesion_field, downsample, 0, 0, lw, lh) > 0.5) & self.tissue_mask(downsample)

    # -- pixels -------------------------------------------------------------------------------

    def _lattice(self, cell_um: float, salt: int, x0: float, y0: float, x1: float, y1: float):
        """Jittered lattice points (level-0 px) whose cells overlap a level-0 box, and their cell keys."""
        cell = cell_um / self.mpp
        cx = np.arange(math.floor(x0 / cell) - 1, math.ceil(x1 / cell) + 1)
        cy = np.arange(math.floor(y0 / cell) - 1, math.ceil(y1 / cell) + 1)
        gx, gy = (g.ravel() for g in np.meshgrid(cx, cy))
        px = (gx + _hash_uniform(self.seed, gx, gy, salt, 1)) * cell
        py = (gy + _hash_uniform(self.seed, gx, gy, salt, 2)) * cell
        return px, py, gx, gy

    def _nuclei(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Nuclei overlapping a level-0 box: rows (x, y, semi-axis a, semi-axis b, angle), level-0 px."""
        rows = []
        kinds = [(0, (_BACKGROUND_RADIUS_UM, 1.0, 0.0), TISSUE_COVERAGE, False)]
        if self.n_lesions:
            kinds.append((1, lesion_nuclei(self.grade, self.grade_strength), LESION_COVERAGE, True))
        for salt, (radius_um, elongation, irregularity), coverage, in_lesion in kinds:
            presence = 0.6 if not in_lesion else 0.9
            cell_um = _cell_size(radius_um, elongation, irregularity, coverage, presence)
            px, py, gx, gy = self._lattice(cell_um, salt, x0, y0, x1, y1)
            lesion = self._at_points(self.lesion_field, px, py) > 0.5
            keep = ((self._at_points(self.field, px, py) > 0.5) & (lesion == in_lesion)
                    & (_hash_uniform(self.seed, gx, gy, salt, 4) < presence))
            u = [_hash_uniform(self.seed, gx[keep], gy[keep], salt, k) for k in (3, 5, 6)]
            radius = radius_um / self.mpp * (0.75 + 0.5 * u[0]) * (1 + irregularity * (u[1] - 0.5))
            # Elongation keeps the area: a = r * sqrt(e), b = r / sqrt(e).
            rows.append(np.stack([px[keep], py[keep], radius * math.sqrt(elongation),
                                  radius / math.sqrt(elongation), u[2] * 180.0], axis=1))
        return np.concatenate(rows)

    def _grain(self, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixel noise of a box: a window of a small noise bank, chosen by position (fast, deterministic)."""
        if not hasattr(self, "_noise_bank"):
            rng = np.random.default_rng(self.seed)
            self._noise_bank = rng.normal(0, 4, size=(8, 512, 512, 1)).astype(np.float32)
        bank = self._noise_bank
        pick = _hash_uniform(self.seed, np.array([x]), y, int(downsample * 1000))[0]
        index, ox, oy = int(pick * 8), int(pick * 4099) % 256, int(pick * 7919) % 256
        if h + oy > 512 or w + ox > 512:  # boxes larger than the bank (thumbnails): tile it
            reps = (math.ceil((h + oy) / 512), math.ceil((w + ox) / 512), 1)
            return np.tile(bank[index], reps)[oy:oy + h, ox:ox + w]
        return bank[index, oy:oy + h, ox:ox + w]

    def render(self, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Draw a box of the level with this downsample (a :data:`Renderer`)."""
        tissue = self._sample(self.field, downsample, x, y, w, h) > 0.5
        out = np.empty((h, w, 3), np.uint8)
        out[:] = GLASS_RGB
        if not tissue.any():
            return out
        if _DRAW_RADIUS_UM / (self.mpp * downsample) >= 1.0:
            ink = np.zeros((h, w), np.uint8)
            shift = 4  # sub-pixel centres keep the drawing consistent between levels
            nuclei = self._nuclei(x * downsample, y * downsample, (x + w) * downsample, (y + h) * downsample)
            for cx, cy, a, b, angle in nuclei.tolist():
                cv2.ellipse(ink, (round((cx / downsample - x) * 16), round((cy / downsample - y) * 16)),
                            (round(a / downsample * 16), round(b / downsample * 16)), angle, 0, 360, 255, -1,
                            cv2.LINE_AA, shift)
            coverage = ink.astype(np.float32)[..., None] / 255.0
        else:
            # Nuclei smaller than a pixel: blend their area share instead of drawing them.
            lesion = self._sample(self.lesion_field, downsample, x, y, w, h) > 0.5
            coverage = np.where(lesion, LESION_COVERAGE, TISSUE_COVERAGE).astype(np.float32)[..., None]
        rgb = EOSIN_RGB + (HEMATOXYLIN_RGB - EOSIN_RGB) * coverage
        rgb += self._grain(downsample, x, y, w, h)
        np.copyto(out, np.clip(rgb, 0, 255).astype(np.uint8), where=tissue[..., None])
        return out


def write_synthetic_slide(
    path: str | Path,
    width: int = 8192,
    height: int = 6144,
    *,
    mpp: float = 0.25,
    seed: int = 0,
    layout: dict | None = None,
    **kwargs,
) -> SyntheticTissue:
    """Write a procedural tissue slide (Aperio SVS by default) and return its generator.

    The returned :class:`SyntheticTissue` gives the ground truth, e.g. its
    :meth:`~SyntheticTissue.tissue_mask` at any downsample. ``layout`` holds further
    :class:`SyntheticTissue` parameters (lesions, grade); extra keyword arguments go to
    :func:`write_slide`.
    """
    layout = layout or {}
    tissue = SyntheticTissue(width, height, mpp=mpp, seed=seed, **layout)
    write_slide(path, width, height, tissue.render, mpp=mpp, **kwargs)
    return tissue


REGIONS_MPP = 4.0  # resolution of the ground-truth lesion masks written beside cohort slides


def _cohort_slide(job: tuple[Path, Path, int, int, int, float, dict]) -> None:
    slide_path, regions_path, width, height, seed, mpp, layout = job
    tissue = SyntheticTissue(width, height, mpp=mpp, seed=seed, **layout)
    if not slide_path.exists():
        write_slide(slide_path, width, height, tissue.render, mpp=mpp)
    if not regions_path.exists():
        labels = cv2.connectedComponents(tissue.lesion_mask(REGIONS_MPP / mpp).astype(np.uint8))[1]
        write_bytes(regions_path, cv2.imencode(".png", labels.astype(np.uint16))[1].tobytes())


def write_cohort(
    out_dir: str | Path,
    n: int = 60,
    *,
    seed: int = 0,
    width: int = 20480,
    height: int = 16384,
    mpp: float = 0.5,
    n_classes: int = 3,
    lesions: tuple[int, int] = (2, 4),
    grade_strength: float = 1.0,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    jobs: int = 1,
) -> list[dict]:
    """Write a labelled cohort of lesion slides where only high magnification tells the classes apart.

    Every slide has tissue and a few lesions, denser than the tissue around them and so visible
    at 1.25x in every class. The class (:data:`GRADE_NAMES`) sets the size and shape of the
    nuclei inside the lesions only; their hematoxylin area share is the same in every class, so
    below about 3 um/px (1.25x reads at 8) the classes look identical.

    Writes ``slides/<slide_id>.svs``, ``regions/<slide_id>.png`` (16-bit labels of the lesions
    at :data:`REGIONS_MPP` um/px, 0 = none), ``labels.csv`` (slide_id,label) and ``splits.csv``
    (slide_id,split, stratified). Existing slides are kept, so a run can be resumed.
    ``grade_strength`` below 1 makes the grades subtler (see :func:`lesion_nuclei`).

    Returns
    -------
    list of dict
        One row per slide: slide_id, path, label, split, seed.
    """
    if not 2 <= n_classes <= len(GRADES):
        raise ValueError(f"n_classes must lie in 2..{len(GRADES)}")
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "regions").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    grades = [0, len(GRADES) - 1] if n_classes == 2 else list(range(n_classes))
    rows, jobs_list = [], []
    for index in range(n):
        grade = grades[index % n_classes]
        slide_seed = seed * 100_003 + index
        layout = dict(n_lesions=int(rng.integers(lesions[0], lesions[1] + 1)), grade=grade,
                      grade_strength=grade_strength,
                      tissue_fraction=float(rng.uniform(0.3, 0.45)), n_blobs=int(rng.integers(2, 5)))
        slide_id = f"cohort_{index:03d}"
        path = out / "slides" / f"{slide_id}.svs"
        rows.append({"slide_id": slide_id, "path": str(path), "label": GRADE_NAMES[grade], "seed": slide_seed})
        jobs_list.append((path, out / "regions" / f"{slide_id}.png", width, height, slide_seed, mpp, layout))
    for label in sorted({r["label"] for r in rows}):  # sorted: set order changes between runs
        members = [r for r in rows if r["label"] == label]
        order = rng.permutation(len(members))
        n_train = round(splits[0] * len(members))
        n_val = round(splits[1] * len(members))
        if n_train + n_val >= len(members) >= 3:  # small classes still get a test slide
            n_train -= 1
        for rank, i in enumerate(order):
            members[i]["split"] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    if jobs > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(jobs) as pool:
            list(pool.imap_unordered(_cohort_slide, jobs_list))
    else:
        for job in jobs_list:
            _cohort_slide(job)
    for name, column in (("labels.csv", "label"), ("splits.csv", "split")):
        write_text(out / name, "slide_id," + column + "\n" + "".join(f"{r['slide_id']},{r[column]}\n" for r in rows))
    return rows
