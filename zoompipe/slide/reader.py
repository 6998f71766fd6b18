"""One slide reader over several backends, addressed by resolution.

Coordinates are always level-0 pixels; sizes are always pixels at the resolution asked for,
given in microns per pixel (mpp). A read goes to the pyramid level just finer than the target
and is resized there with area interpolation, so no caller ever picks a level by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import SlideError, one_line
from .backends import BACKEND_CLASSES, BACKENDS
from .resolution import mpp_to_magnification, objective_power, resolve_mpp

# A level counts as fine enough for a target when it is at most this much coarser; it absorbs
# the rounding of level sizes (a 4x level of an odd-sized slide has a downsample of 4.0003).
_LEVEL_TOLERANCE = 1e-2
# The longest side, in level pixels, of one backend read while assembling a thumbnail.
_THUMBNAIL_CHUNK = 4096


class Slide:
    """An open whole-slide image.

    Use :func:`open_slide` to make one. Closes with ``close()`` or as a context manager.

    Attributes
    ----------
    path : Path
    slide_id : str
        File name without its extension.
    backend : str
        ``"openslide"`` or ``"tiffslide"``.
    vendor : str
    dimensions : (int, int)
        Level-0 (width, height).
    level_dimensions, level_downsamples : tuple
    mpp : float
        Microns per pixel at level 0.
    mpp_source : str
        Where ``mpp`` came from: ``"override"``, a metadata key, or ``"objective-power"``.
    """

    def __init__(self, path: Path, backend: Any, mpp: float, mpp_source: str) -> None:
        self.path = path
        self.slide_id = path.stem
        self._backend = backend
        self.backend: str = backend.name
        self.vendor: str = backend.vendor
        self.level_dimensions: tuple[tuple[int, int], ...] = backend.level_dimensions
        self.level_downsamples: tuple[float, ...] = backend.level_downsamples
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.properties = backend.properties
        self.mpp = mpp
        self.mpp_source = mpp_source

    # -- description --------------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def magnification(self) -> float:
        """Equivalent objective power, ``10 / mpp``."""
        return mpp_to_magnification(self.mpp)

    @property
    def objective_power(self) -> float | None:
        """The scanner's nominal objective power from the metadata, if it records one."""
        return objective_power(self.properties)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def info(self) -> dict:
        """What ``zoompipe info`` prints."""
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "magnification": round(self.magnification, 3),
            "objective_power": self.objective_power,
        }

    # -- reading ------------------------------------------------------------------------------

    def best_level(self, mpp: float) -> int:
        """The coarsest level at least as fine as ``mpp`` (level 0 when the target is finer still)."""
        fine_enough = [i for i in range(self.level_count)
                       if self.level_mpp(i) <= mpp * (1 + _LEVEL_TOLERANCE)]
        return max(fine_enough, key=self.level_mpp) if fine_enough else 0

    def read_region(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """Read a box of the slide at a resolution.

        Parameters
        ----------
        x, y : float
            Top-left corner in level-0 pixels.
        width, height : int
            Size in pixels at the target resolution.
        mpp : float
            Target microns per pixel.

        Returns
        -------
        ndarray
            (height, width, 3) uint8 RGB; what lies outside the slide is white.
        """
        level = self.best_level(mpp)
        downsample = self.level_downsamples[level]
        factor = mpp / self.mpp / downsample  # level pixels per output pixel
        lx, ly = x / downsample, y / downsample
        x0, y0 = math.floor(lx + 1e-6), math.floor(ly + 1e-6)
        x1 = math.ceil(lx + width * factor - 1e-6)
        y1 = math.ceil(ly + height * factor - 1e-6)
        level_w, level_h = self.level_dimensions[level]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, level_w), min(y1, level_h)
        pixels = None
        if cx1 > cx0 and cy1 > cy0:
            try:
                pixels = self._backend.read(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            except Exception as err:  # every backend has its own error types
                raise SlideError(f"{self.path.name}: cannot read level {level} at "
                                 f"({cx0}, {cy0}): {one_line(err)}") from err
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            box = pixels  # inside the slide: no white canvas to paste into
        else:
            box = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
            if pixels is not None:
                box[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = pixels
        if box.shape[:2] == (height, width):
            return np.ascontiguousarray(box)
        shrink = box.shape[1] > width
        return cv2.resize(box, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def thumbnail_size(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the whole slide at ``mpp``, rounded up so that it covers the slide."""
        scale = mpp / self.mpp
        return max(1, math.ceil(self.dimensions[0] / scale - 1e-6)), max(1, math.ceil(self.dimensions[1] / scale - 1e-6))

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp``, read in chunks from the coarsest adequate level.

        Memory stays bounded by the thumbnail itself plus one chunk, whatever the slide size.
        """
        width, height = self.thumbnail_size(mpp)
        scale = mpp / self.mpp
        factor = scale / self.level_downsamples[self.best_level(mpp)]
        chunk = max(1, int(_THUMBNAIL_CHUNK / max(factor, 1.0)))
        out = np.empty((height, width, 3), np.uint8)
        for ty in range(0, height, chunk):
            for tx in range(0, width, chunk):
                w, h = min(chunk, width - tx), min(chunk, height - ty)
                out[ty:ty + h, tx:tx + w] = self.read_region(tx * scale, ty * scale, w, h, mpp)
        return out

    # -- life cycle ---------------------------------------------------------------------------

    def reopen(self) -> "Slide":
        """A new, independent handle on the same file (one per reader thread)."""
        return open_slide(self.path, backend=self.backend, mpp=self.mpp if self.mpp_source == "override" else None)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.path.name!r}, {w}x{h}, {self.mpp:g} mpp, backend={self.backend})"


def _check_path(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file")


def _probe(slide: Slide) -> None:
    """Decode the first and last pixel of every level: truncated files fail here, not mid-run."""
    for level, (w, h) in enumerate(slide.level_dimensions):
        for x, y in ((0, 0), (w - 1, h - 1)):
            try:
                slide._backend.read(level, x, y, 1, 1)
            except Exception as err:
                raise SlideError(f"{slide.path}: damaged or truncated slide, level {level} "
                                 f"cannot be read ({one_line(err)})") from err


def open_slide(path: str | Path, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    Parameters
    ----------
    path : str or Path
    backend : {"auto", "openslide", "tiffslide"}
        ``"auto"`` tries OpenSlide first and falls back to tiffslide for what it cannot open.
    mpp : float, optional
        Level-0 microns per pixel, overriding the metadata (for slides that lack it).

    Raises
    ------
    SlideError
        Missing, empty or unreadable file, not a slide, truncated slide, or unknown resolution.
    """
    path = Path(path)
    _check_path(path)
    if backend not in ("auto", *BACKENDS):
        raise SlideError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    failures = []
    for name in BACKENDS if backend == "auto" else (backend,):
        try:
            handle = BACKEND_CLASSES[name](path)
        except Exception as err:  # each library signals "not mine" with its own types
            failures.append(f"{name}: {one_line(err)}")
            continue
        try:
            mpp_value, source = resolve_mpp(handle.properties, mpp, name=str(path))
            slide = Slide(path, handle, mpp_value, source)
            _probe(slide)
        except SlideError:
            handle.close()
            raise
        return slide
    raise SlideError(f"{path}: not a whole-slide image this tool can read ({'; '.join(failures)})")
