"""The slide libraries zoompipe reads through, behind one small interface.

A backend knows levels only: ``read(level, x, y, width, height)`` takes a box in that level's
own pixels, already clipped to the level, and returns RGB uint8. Resolution, level choice,
resizing and padding live in :mod:`zoompipe.slide.reader`, once for every backend.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

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


#: Decoded tiles kept per handle of a local tiled TIFF. A 10x patch (448 px of a 20x level) spans
#: 4-9 tiles of 256 px, and the patches beside it share most of them: tiffslide alone decodes
#: every tile of every read anew. 32 MiB holds 170 such tiles: the 7 x 7 under the 4 x 4
#: children of a zoomed 2.5x patch, or a row of 10x patches in a grid.
TILE_CACHE_BYTES = 32 * 2**20


class TileCache:
    """Tiles of a local tiled TIFF, decoded by tifffile as tiffslide decodes them, the last ones kept.

    Reads boxes of a level from tiles of chunky (RGB or RGBA) uint8 pages; :meth:`read` returns
    None for any other layout, which the caller then reads through tiffslide.
    """

    def __init__(self, series: Any, filehandle: Any, max_bytes: int = TILE_CACHE_BYTES) -> None:
        self._pages = [level.keyframe if len(level.pages) == 1 and self._readable(level.keyframe) else None
                       for level in series.levels]
        self._file = filehandle
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes, self._max_bytes = 0, max_bytes

    @staticmethod
    def _readable(page: Any) -> bool:
        return (page.is_tiled and page.planarconfig == 1 and page.tiledepth == 1 and page.imagedepth == 1
                and page.dtype == np.uint8 and page.samplesperpixel in (3, 4)
                and all(page.databytecounts))  # sparse tiles: tiffslide's fill rules apply

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """The box (level pixels, inside the level) as (height, width, 3 or 4) uint8, or None."""
        page = self._pages[level]
        if page is None:
            return None
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        out = np.empty((height, width, page.samplesperpixel), np.uint8)
        for ty in range(y // th, (y + height - 1) // th + 1):
            y0, y1 = max(y, ty * th), min(y + height, (ty + 1) * th)
            for tx in range(x // tw, (x + width - 1) // tw + 1):
                x0, x1 = max(x, tx * tw), min(x + width, (tx + 1) * tw)
                tile = self._tile(level, page, ty * across + tx)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty * th:y1 - ty * th, x0 - tx * tw:x1 - tx * tw]
        return out

    def _tile(self, level: int, page: Any, index: int) -> np.ndarray:
        key = (level, index)
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
            return tile
        with self._file.lock:
            self._file.seek(page.dataoffsets[index])
            data = self._file.read(page.databytecounts[index])
        tile = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)[0][0]
        self._tiles[key] = tile
        self._bytes += tile.nbytes
        while self._bytes > self._max_bytes and len(self._tiles) > 1:
            self._bytes -= self._tiles.popitem(last=False)[1].nbytes
        return tile


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
        tiff = self._slide.ts_tifffile
        # Remote tiles are fetched in batches by prefetch(); a cache of decoded tiles is for files.
        self._tiles = (TileCache(tiff.series[self.properties["tiffslide.series-index"]], tiff.filehandle)
                       if self.remote_file is None and "tiffslide.series-composition" not in self.properties
                       else None)

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
        cached = None if self._tiles is None else self._tiles.read(level, x, y, width, height)
        if cached is not None:
            return _on_white(cached)
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
