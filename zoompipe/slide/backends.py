"""The slide libraries zoompipe reads through, behind one small interface.

A backend knows levels only: ``read(level, x, y, width, height)`` takes a box in that level's
own pixels, already clipped to the level, and returns RGB uint8. Resolution, level choice,
resizing and padding live in :mod:`zoompipe.slide.reader`, once for every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import cv2
import numpy as np

if TYPE_CHECKING:
    from .remote import RemoteFile

BACKENDS = ("openslide", "tiffslide")


def _on_white(pixels: np.ndarray) -> np.ndarray:
    """Composite RGBA on white: OpenSlide marks pixels outside scanned areas as transparent."""
    if pixels.shape[-1] == 3:
        return pixels
    alpha = pixels[..., 3:4]
    if alpha.min() == 255:  # the common case inside a scan: nothing to blend
        # OpenCV drops the channel 5-7x faster than numpy copies the strided view, and every
        # later step (resize, the encoder's input) wants contiguous pixels.
        return cv2.cvtColor(pixels, cv2.COLOR_RGBA2RGB)
    alpha = alpha.astype(np.uint16)
    rgb = pixels[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


class OpenSlideBackend:
    """OpenSlide 4 (Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana, DICOM, generic TIFF)."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self._slide.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties: Mapping[str, object] = dict(self._slide.properties)
        self.vendor = str(self.properties.get("openslide.vendor") or "unknown")

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        # OpenSlide takes the location in level-0 pixels whatever the level.
        downsample = self.level_downsamples[level]
        location = (int(round(x * downsample)), int(round(y * downsample)))
        region = self._slide.read_region(location, level, (width, height))
        return _on_white(np.asarray(region))

    def close(self) -> None:
        self._slide.close()


class TiffSlideBackend:
    """tiffslide: pure Python over tifffile (SVS, generic pyramidal TIFF, OME-TIFF, NDPI, ...).

    Also reads a :class:`~zoompipe.slide.remote.RemoteFile`; then the tiles a read needs are
    announced to it first, so that it fetches them in few requests.
    """

    name = "tiffslide"

    def __init__(self, path: Path | RemoteFile) -> None:
        import tiffslide

        self.remote_file = None if isinstance(path, Path) else path
        self._slide = tiffslide.TiffSlide(str(path) if self.remote_file is None else path)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)
        self.vendor = str(self.properties.get("tiffslide.vendor") or "generic-tiff")

    def prefetch(self, level: int, boxes: Sequence[tuple[int, int, int, int]]) -> None:
        """Fetch the tiles under ``boxes`` (x, y, width, height in level pixels) of a remote file together."""
        if self.remote_file is None:
            return
        series = self._slide.ts_tifffile.series[self.properties["tiffslide.series-index"]]
        page = series.levels[level].keyframe
        # Tile i of a contiguous tiled page is row-major; other layouts are read tile by tile on demand.
        if not page.is_tiled or page.planarconfig != 1 or page.tiledepth != 1:
            return
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        offsets, counts = page.dataoffsets, page.databytecounts
        ranges = []
        for x, y, w, h in boxes:
            for ty in range(y // th, (y + h - 1) // th + 1):
                for tx in range(x // tw, (x + w - 1) // tw + 1):
                    i = ty * across + tx
                    if i < len(offsets) and counts[i]:
                        ranges.append((int(offsets[i]), int(offsets[i]) + int(counts[i])))
        self.remote_file.prefetch(ranges)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        self.prefetch(level, [(x, y, width, height)])
        downsample = self.level_downsamples[level]
        location = (int(round(x * downsample)), int(round(y * downsample)))
        region = self._slide.read_region(location, level, (width, height), as_array=True)
        return _on_white(np.ascontiguousarray(region))

    def close(self) -> None:
        self._slide.close()
        if self.remote_file is not None:
            self.remote_file.close()


BACKEND_CLASSES = {"openslide": OpenSlideBackend, "tiffslide": TiffSlideBackend}
