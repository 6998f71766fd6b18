"""Attention heatmaps on a slide thumbnail, memory bounded whatever the slide size.

Per magnification, every attended patch is painted with its rank-normalised attention (so one
dominant patch does not wash the rest out), inside tissue only, alpha-blended over the
thumbnail. A composite outlines the regions the model zoomed into, one colour per magnification.
A panel puts them side by side with titles and a colour bar, for people to read.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from .prediction import MagnificationReport, Prediction
from .qc import GRID_RGB, overview_mpp, write_png
from .slide import Slide
from .tissue import TissueMask

#: Longest side of a heatmap thumbnail, in pixels.
MAX_SIDE = 2048
_COLORMAP = cv2.COLORMAP_TURBO


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1], ties sharing their mean rank (equal attention, equal colour)."""
    # scipy.stats takes a second to import: only runs that draw heatmaps pay it.
    from scipy.stats import rankdata

    values = np.asarray(values, np.float64)
    if len(values) <= 1:
        return np.ones(len(values))
    return (rankdata(values, method="average") - 1) / (len(values) - 1)


def _pixel_boxes(boxes: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """Level-0 boxes to thumbnail pixel boxes, clipped; every box covers at least one pixel."""
    px = np.floor(np.asarray(boxes, np.float64) / scale).astype(np.int64)
    px[:, 2:] = np.maximum(px[:, 2:], px[:, :2] + 1)
    px[:, [0, 2]] = np.clip(px[:, [0, 2]], 0, shape[1])
    px[:, [1, 3]] = np.clip(px[:, [1, 3]], 0, shape[0])
    return px


def attention_overlay(thumbnail: np.ndarray, tissue: np.ndarray, report: MagnificationReport, scale: float,
                      alpha: float = 0.5) -> np.ndarray:
    """Blend one magnification's rank-normalised attention over the thumbnail, inside tissue only.

    Parameters
    ----------
    thumbnail : ndarray
        (H, W, 3) uint8 RGB.
    tissue : ndarray
        (H, W) bool tissue mask at the thumbnail's resolution.
    report : MagnificationReport
    scale : float
        Level-0 pixels per thumbnail pixel.
    alpha : float
        Opacity of the colours.
    """
    height, width = thumbnail.shape[:2]
    value = np.zeros((height, width), np.float32)
    covered = np.zeros((height, width), bool)
    for (x0, y0, x1, y1), v in zip(_pixel_boxes(report.boxes, scale, (height, width)),
                                   rank_normalise(report.attention)):
        # Boxes of one magnification do not overlap; keep the higher value where rounding touches.
        np.maximum(value[y0:y1, x0:x1], v, out=value[y0:y1, x0:x1])
        covered[y0:y1, x0:x1] = True
    colours = cv2.applyColorMap((value * 255).astype(np.uint8), _COLORMAP)[..., ::-1]
    paint = covered & tissue
    out = thumbnail.copy()
    out[paint] = (thumbnail[paint] * (1 - alpha) + colours[paint] * alpha).round().astype(np.uint8)
    return out


def zoom_composite(thumbnail: np.ndarray, prediction: Prediction, scale: float) -> np.ndarray:
    """Outline the patches zoomed into at each magnification, one colour per magnification."""
    out = thumbnail.copy()
    thickness = max(1, round(max(out.shape[:2]) / 700))
    for index, report in enumerate(prediction.magnifications):
        chosen = report.selected if len(report.selected) else np.zeros(0, np.int64)
        colour = GRID_RGB[index % len(GRID_RGB)]
        for x0, y0, x1, y1 in _pixel_boxes(report.boxes[chosen], scale, out.shape[:2]):
            cv2.rectangle(out, (int(x0), int(y0)), (int(x1) - 1, int(y1) - 1), colour, thickness)
    return out


def colour_bar(height: int, width: int = 60) -> np.ndarray:
    """A vertical colour bar, high attention on top, labelled."""
    ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None].repeat(20, axis=1)
    bar = np.full((height, width, 3), 255, np.uint8)
    bar[:, 4:24] = cv2.applyColorMap(ramp, _COLORMAP)[..., ::-1]
    for text, y in (("high", 14), ("low", height - 6)):
        cv2.putText(bar, text, (26, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def _titled(image: np.ndarray, title: str) -> np.ndarray:
    band = np.full((28, image.shape[1], 3), 255, np.uint8)
    cv2.putText(band, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image])


def render_heatmaps(prediction: Prediction, slide: Slide, mask: TissueMask,
                    max_side: int = MAX_SIDE) -> dict[str, np.ndarray]:
    """All heatmap images of a prediction.

    ``mask`` is the slide's tissue as the prediction saw it (:func:`zoompipe.tiling.tile_slide`);
    colours are drawn inside it only.

    Returns
    -------
    dict
        ``"thumbnail"``; ``"attention_<m>x"`` per magnification and ``"zoom"`` (all the
        thumbnail's size); ``"panel"`` (them side by side, titled, with a colour bar).
    """
    mpp = overview_mpp(slide.mpp, slide.dimensions, max_side)
    thumbnail = slide.thumbnail(mpp)
    scale = mpp / slide.mpp
    tissue = cv2.resize(mask.mask.astype(np.uint8), thumbnail.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    images = {"thumbnail": thumbnail}
    for report in prediction.magnifications:
        images[f"attention_{report.magnification:g}x"] = attention_overlay(thumbnail, tissue, report, scale)
    images["zoom"] = zoom_composite(thumbnail, prediction, scale)

    probability = float(np.max(prediction.probabilities))
    tiles = [_titled(images["zoom"], f"{prediction.slide_id}: {prediction.predicted} ({probability:.2f})")]
    tiles += [_titled(images[f"attention_{r.magnification:g}x"], f"attention {r.magnification:g}x "
                      f"({r.patches_embedded} patches)") for r in prediction.magnifications]
    # Two columns, so the panel stays about max_side wide and each image stays readable.
    columns = min(2, len(tiles))
    shrink = min(1.0, max_side / (thumbnail.shape[1] * columns))
    if shrink < 1:
        tiles = [cv2.resize(t, (max(1, math.floor(t.shape[1] * shrink)), max(1, math.floor(t.shape[0] * shrink))),
                            interpolation=cv2.INTER_AREA) for t in tiles]
    height, width = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0] + 4), (0, width - t.shape[1] + 4), (0, 0)), constant_values=255)
             for t in tiles]
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % columns)
    grid = np.concatenate([np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)])
    images["panel"] = np.concatenate([grid, colour_bar(grid.shape[0])], axis=1)
    return images


def write_heatmaps(prediction: Prediction, slide: Slide, mask: TissueMask, out_dir: str | Path,
                   max_side: int = MAX_SIDE) -> list[Path]:
    """Write ``<slide_id>_<name>.png`` for every image of :func:`render_heatmaps` but the thumbnail."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in render_heatmaps(prediction, slide, mask, max_side).items():
        if name == "thumbnail":
            continue
        path = out_dir / f"{prediction.slide_id}_{name}.png"
        write_png(path, image)
        written.append(path)
    return written
