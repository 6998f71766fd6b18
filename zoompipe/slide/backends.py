"""The slide libraries zoompipe reads through, behind one small interface.

A backend knows levels only: ``read(level, x, y, width, height)`` takes a box in that level's
own pixels, already clipped to the level, and returns RGB uint8. Resolution, level choice,
resizing and padding live in :mod:`zoompipe.slide.reader`, once for every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

BACKENDS = ("openslide", "tiffslide")


def _on_white(pixels: np.ndarray) -> np.ndarray:
    """Composite RGBA on white: OpenSlide marks pixels outside scanned areas as transparent."""
    if pixels.shape[-1] == 3:
        return pixels
    alpha = pixels[..., 3:4]
    if alpha.min() == 255:  # the common case inside a scan: nothing to blend
        return pixels[..., :3]
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
    """tiffslide: pure Python over tifffile (SVS, generic pyramidal TIFF, OME-TIFF, NDPI, ...)."""

    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(str(path))
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)
        self.vendor = str(self.properties.get("tiffslide.vendor") or "generic-tiff")

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        location = (int(round(x * downsample)), int(round(y * downsample)))
        region = self._slide.read_region(location, level, (width, height), as_array=True)
        return _on_white(np.ascontiguousarray(region))

    def close(self) -> None:
        self._slide.close()


BACKEND_CLASSES = {"openslide": OpenSlideBackend, "tiffslide": TiffSlideBackend}
