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

    tmp = Path(str(path) + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
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
    tmp.replace(path)
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


@dataclass
class SyntheticTissue:
    """Procedural H&E-like tissue: pink blobs on glass, with purple nuclei.

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
    nucleus_um : float
        Mean nucleus diameter in microns.
    """

    width: int
    height: int
    mpp: float = 0.25
    seed: int = 0
    n_blobs: int = 5
    tissue_fraction: float = 0.3
    nucleus_um: float = 8.0

    def __post_init__(self) -> None:
        # The tissue layout lives on a coarse field; every level samples it bilinearly so that
        # tissue borders are smooth and identical across levels.
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
        field = cv2.GaussianBlur(field, (0, 0), 3) + 2.0 * wobble
        self.field = field

    # -- layout -------------------------------------------------------------------------------

    def _field_at(self, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The tissue field sampled at the centres of a box of pixels of a level."""
        xs = ((x + np.arange(w) + 0.5) * downsample / self.field_downsample - 0.5).astype(np.float32)
        ys = ((y + np.arange(h) + 0.5) * downsample / self.field_downsample - 0.5).astype(np.float32)
        map_x, map_y = np.meshgrid(xs, ys)
        return cv2.remap(self.field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def tissue_mask(self, downsample: float, x: int = 0, y: int = 0, w: int | None = None,
                    h: int | None = None) -> np.ndarray:
        """Ground-truth tissue mask of a box of the level with this downsample (whole level by default)."""
        lw, lh = _level_size(self.width, self.height, downsample)
        return self._field_at(downsample, x, y, lw if w is None else w, lh if h is None else h) > 0.5

    # -- pixels -------------------------------------------------------------------------------

    def _nuclei(self, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, ...]:
        """Nuclei (centre x, y, radius, all level-0 px) whose cells overlap a level-0 box."""
        cell = 2.5 * self.nucleus_um / self.mpp
        cx = np.arange(math.floor(x0 / cell) - 1, math.ceil(x1 / cell) + 1)
        cy = np.arange(math.floor(y0 / cell) - 1, math.ceil(y1 / cell) + 1)
        gx, gy = np.meshgrid(cx, cy)
        px = (gx + _hash_uniform(self.seed, gx, gy, 1)) * cell
        py = (gy + _hash_uniform(self.seed, gx, gy, 2)) * cell
        radius = 0.5 * self.nucleus_um / self.mpp * (0.75 + 0.5 * _hash_uniform(self.seed, gx, gy, 3))
        fx = np.clip(px / self.field_downsample - 0.5, 0, self.field.shape[1] - 1).astype(int)
        fy = np.clip(py / self.field_downsample - 0.5, 0, self.field.shape[0] - 1).astype(int)
        keep = (self.field[fy, fx] > 0.5) & (_hash_uniform(self.seed, gx, gy, 4) < 0.6)
        return px[keep], py[keep], radius[keep]

    def render(self, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Draw a box of the level with this downsample (a :data:`Renderer`)."""
        tissue = self._field_at(downsample, x, y, w, h) > 0.5
        out = np.empty((h, w, 3), np.uint8)
        out[:] = GLASS_RGB
        if not tissue.any():
            return out
        rgb = np.broadcast_to(EOSIN_RGB, (h, w, 3)).copy()
        mean_radius = 0.5 * self.nucleus_um / self.mpp / downsample
        px, py, radius = self._nuclei(x * downsample, y * downsample, (x + w) * downsample, (y + h) * downsample)
        if mean_radius >= 1.0:
            ink = np.zeros((h, w), np.uint8)
            shift = 4  # sub-pixel centres keep the drawing consistent between levels
            for cx, cy, r in zip(px / downsample - x, py / downsample - y, radius / downsample):
                cv2.circle(ink, (int(cx * 16), int(cy * 16)), int(r * 16), 255, -1, cv2.LINE_AA, shift)
            coverage = ink.astype(np.float32)[..., None] / 255.0
        else:
            # Nuclei smaller than a pixel: blend their expected area share instead of drawing them.
            cell = 2.5 * self.nucleus_um / self.mpp
            share = 0.6 * math.pi * (0.5 * self.nucleus_um / self.mpp) ** 2 * 1.0208 / cell**2  # E[(0.75 + 0.5u)^2] = 1.0208
            coverage = np.float32(share)
        rgb = rgb * (1 - coverage) + HEMATOXYLIN_RGB * coverage
        rng = np.random.default_rng([self.seed, int(x), int(y), int(downsample * 1000)])
        rgb += rng.normal(0, 4, size=(h, w, 1)).astype(np.float32)
        out[tissue] = np.clip(rgb[tissue], 0, 255).astype(np.uint8)
        return out


def write_synthetic_slide(
    path: str | Path,
    width: int = 8192,
    height: int = 6144,
    *,
    mpp: float = 0.25,
    seed: int = 0,
    **kwargs,
) -> SyntheticTissue:
    """Write a procedural tissue slide (Aperio SVS by default) and return its generator.

    The returned :class:`SyntheticTissue` gives the ground truth, e.g. its
    :meth:`~SyntheticTissue.tissue_mask` at any downsample. Extra keyword arguments go to
    :func:`write_slide`.
    """
    tissue = SyntheticTissue(width, height, mpp=mpp, seed=seed)
    write_slide(path, width, height, tissue.render, mpp=mpp, **kwargs)
    return tissue
