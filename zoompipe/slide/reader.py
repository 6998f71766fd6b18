"""One slide reader over several backends, addressed by resolution.

Coordinates are always level-0 pixels; sizes are always pixels at the resolution asked for,
given in microns per pixel (mpp). A read goes to the pyramid level just finer than the target
and is resized there with area interpolation, so no caller ever picks a level by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ..errors import SlideError, one_line
from .backends import BACKEND_CLASSES, BACKENDS
from .resolution import mpp_to_magnification, objective_power, resolve_mpp
from .source import SlideSource, slide_source

if TYPE_CHECKING:
    from .remote import RemoteSettings, TransferStats

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
    source : SlideSource
        Where the slide lives: a local path or a URL.
    name : str
        The path, or the URL without credentials: what messages and outputs show.
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

    def __init__(self, source: SlideSource, backend: Any, mpp: float, mpp_source: str, owner: bool = True) -> None:
        self.source = source
        self.name = source.name
        self.slide_id = source.slide_id
        self._backend = backend
        self._owner = owner  # False for a view that shares another Slide's backend
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
            "path": self.name,
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
            "transfer": stats.to_dict() if (stats := self.transfer_stats()) is not None else None,
        }

    # -- reading ------------------------------------------------------------------------------

    def best_level(self, mpp: float) -> int:
        """The coarsest level at least as fine as ``mpp`` (level 0 when the target is finer still)."""
        fine_enough = [i for i in range(self.level_count)
                       if self.level_mpp(i) <= mpp * (1 + _LEVEL_TOLERANCE)]
        return max(fine_enough, key=self.level_mpp) if fine_enough else 0

    def _level_box(self, x: float, y: float, width: int, height: int, mpp: float
                   ) -> tuple[int, tuple[int, int, int, int], tuple[int, int, int, int]]:
        """The level a read goes to, its box there and that box clipped to the level (x0, y0, x1, y1)."""
        level = self.best_level(mpp)
        downsample = self.level_downsamples[level]
        factor = mpp / self.mpp / downsample  # level pixels per output pixel
        lx, ly = x / downsample, y / downsample
        x0, y0 = math.floor(lx + 1e-6), math.floor(ly + 1e-6)
        x1 = math.ceil(lx + width * factor - 1e-6)
        y1 = math.ceil(ly + height * factor - 1e-6)
        level_w, level_h = self.level_dimensions[level]
        return level, (x0, y0, x1, y1), (max(x0, 0), max(y0, 0), min(x1, level_w), min(y1, level_h))

    def prefetch(self, coords: np.ndarray, width: int, height: int, mpp: float) -> None:
        """Announce reads of ``width`` x ``height`` px at ``mpp`` at level-0 ``coords`` (N, 2).

        A remote slide fetches all their tiles now, neighbours merged into one request each; a
        local slide has nothing to do.
        """
        if not self.source.remote or len(coords) == 0:
            return
        boxes: dict[int, list[tuple[int, int, int, int]]] = {}
        for x, y in coords:
            level, _, (cx0, cy0, cx1, cy1) = self._level_box(float(x), float(y), width, height, mpp)
            if cx1 > cx0 and cy1 > cy0:
                boxes.setdefault(level, []).append((cx0, cy0, cx1 - cx0, cy1 - cy0))
        for level, level_boxes in boxes.items():
            self._backend.prefetch(level, level_boxes)

    def transfer_stats(self) -> TransferStats | None:
        """Bytes and requests spent on a remote slide so far; None for a local one."""
        return self._backend.remote_file.stats() if self.source.remote else None

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
        level, (x0, y0, x1, y1), (cx0, cy0, cx1, cy1) = self._level_box(x, y, width, height, mpp)
        pixels = None
        if cx1 > cx0 and cy1 > cy0:
            try:
                pixels = self._backend.read(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            except Exception as err:  # every backend has its own error types
                if isinstance(err, SlideError):  # a remote fault, already one line
                    raise
                raise SlideError(self.source.scrub(f"{self.name}: cannot read level {level} at "
                                                   f"({cx0}, {cy0}): {one_line(err)}")) from err
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
        """A handle for another reader thread.

        A new, independent handle on a local file. A remote slide's handles share its header,
        connection pool and range cache instead: the view is valid while this slide is open.
        """
        if self.source.remote:
            return Slide(self.source, self._backend, self.mpp, self.mpp_source, owner=False)
        return open_slide(self.source, backend=self.backend, mpp=self.mpp if self.mpp_source == "override" else None)

    def close(self) -> None:
        if self._owner:
            self._backend.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.name!r}, {w}x{h}, {self.mpp:g} mpp, backend={self.backend})"


#: OpenSlide vendors that tiffslide reads pixel for pixel as OpenSlide does, faster: both decode
#: the same JPEG tiles with libjpeg-turbo, but OpenSlide also composites every tile through
#: cairo (a 448 px region of an Aperio slide: 7-11 ms against 3.4-3.8 ms, identical pixels).
TIFFSLIDE_VENDORS = ("aperio", "generic-tiff")


def _faster_reader(handle: Any, path: Path) -> Any:
    """tiffslide in place of an OpenSlide ``handle`` of the same pyramid; ``handle`` if tiffslide cannot."""
    try:
        faster = BACKEND_CLASSES["tiffslide"](path)
    except Exception:  # OpenSlide reads it: keep OpenSlide
        return handle
    if (faster.level_dimensions, faster.level_downsamples) != (handle.level_dimensions, handle.level_downsamples):
        faster.close()
        return handle
    handle.close()
    return faster


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
                if isinstance(err, SlideError):  # a remote fault, already one line
                    raise
                raise SlideError(slide.source.scrub(f"{slide.name}: damaged or truncated slide, level {level} "
                                                    f"cannot be read ({one_line(err)})")) from err


def open_slide(path: str | Path | SlideSource, backend: str = "auto", mpp: float | None = None,
               remote: RemoteSettings | None = None) -> Slide:
    """Open a whole-slide image, from a local path or a URL.

    Parameters
    ----------
    path : str, Path or SlideSource
        A file, or a URL that fsspec reads (``https://``, ``s3://bucket/key``, ...). URLs are read
        with tiffslide through range requests; credentials come from fsspec's usual places
        (environment, ``~/.aws``, fsspec config, the URL itself) and never reach a message.
    backend : {"auto", "openslide", "tiffslide"}
        ``"auto"`` lets OpenSlide recognise the format and falls back to tiffslide for what it
        cannot open. Formats in :data:`TIFFSLIDE_VENDORS` (Aperio SVS, generic tiled TIFF) are
        then read with tiffslide, which decodes their tiles to the same pixels 2-3x faster
        (``tests/test_slide.py``). For a URL it means tiffslide, since OpenSlide reads local
        files only.
    mpp : float, optional
        Level-0 microns per pixel, overriding the metadata (for slides that lack it).
    remote : RemoteSettings, optional
        Timeouts, retries and cache of remote reads [default: :meth:`RemoteSettings.from_env`].

    Raises
    ------
    SlideError
        Missing, empty or unreadable file, not a slide, truncated slide, or unknown resolution;
        for a URL also not found, refused, timed out or dropped connection
        (:class:`~zoompipe.slide.remote.RemoteError`).
    """
    source = slide_source(path)
    if backend not in ("auto", *BACKENDS):
        raise SlideError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if source.remote:
        if backend == "openslide":
            raise SlideError(f"{source}: OpenSlide reads local files only; use --backend tiffslide (or auto) for URLs")
        from .remote import RemoteFile

        names: tuple[str, ...] = ("tiffslide",)
        target: Any = RemoteFile.open(source, remote)
    else:
        _check_path(source.local_path)
        names = BACKENDS if backend == "auto" else (backend,)
        target = source.local_path
    failures = []
    for name in names:
        try:
            handle = BACKEND_CLASSES[name](target)
        except SlideError:
            raise  # a remote fault while reading the header: not a verdict on the format
        except Exception as err:  # each library signals "not mine" with its own types
            failures.append(f"{name}: {one_line(err)}")
            continue
        if backend == "auto" and handle.name == "openslide" and handle.vendor in TIFFSLIDE_VENDORS:
            handle = _faster_reader(handle, target)
        try:
            mpp_value, mpp_source = resolve_mpp(handle.properties, mpp, name=source.name)
            slide = Slide(source, handle, mpp_value, mpp_source)
            _probe(slide)
        except SlideError:
            handle.close()
            raise
        return slide
    raise SlideError(source.scrub(f"{source}: not a whole-slide image this tool can read ({'; '.join(failures)})"))
