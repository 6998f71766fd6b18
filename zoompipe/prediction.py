"""What a prediction holds: the diagnosis of a slide and where the model looked, as saved to JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .contract import PipelineContract
from .slide.remote import TransferStats


@dataclass
class MagnificationReport:
    """What the model saw at one magnification.

    Attributes
    ----------
    magnification, mpp : float
    boxes : ndarray
        (N, 4) int64 level-0 ``x0, y0, x1, y1`` of every patch attended at this magnification.
    rows : ndarray
        (N,) global rows of those patches in the full grid of this magnification (the row they
        have in a feature file written by ``preprocess``).
    attention : ndarray
        (N,) pooling attention, summing to one.
    selected : ndarray
        Indices into ``boxes`` of the patches zoomed into (empty at the last magnification).
    selection_scores : ndarray
        (N,) raw scores of the zoom head (empty at the last magnification).
    patches_embedded : int
        Patches read from the slide and embedded for this magnification.
    seconds : float
        Wall time of reading and embedding them.
    """

    magnification: float
    mpp: float
    boxes: np.ndarray
    rows: np.ndarray
    attention: np.ndarray
    selected: np.ndarray
    selection_scores: np.ndarray
    patches_embedded: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "magnification": self.magnification, "mpp": self.mpp,
            "patches_embedded": self.patches_embedded, "seconds": round(self.seconds, 4),
            "boxes": self.boxes.tolist(), "rows": self.rows.tolist(),
            "attention": [float(a) for a in self.attention],
            "selected": self.selected.tolist(),
            "selection_scores": [float(s) for s in self.selection_scores],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MagnificationReport":
        return cls(
            magnification=float(data["magnification"]), mpp=float(data["mpp"]),
            boxes=np.asarray(data["boxes"], np.int64).reshape(-1, 4), rows=np.asarray(data["rows"], np.int64),
            attention=np.asarray(data["attention"], np.float64), selected=np.asarray(data["selected"], np.int64),
            selection_scores=np.asarray(data["selection_scores"], np.float64),
            patches_embedded=int(data["patches_embedded"]), seconds=float(data["seconds"]))


@dataclass
class Prediction:
    """A slide's diagnosis and where the model looked to make it."""

    slide_id: str
    slide_path: str
    slide_mpp: float
    slide_dimensions: tuple[int, int]
    class_names: list[str]
    probabilities: np.ndarray
    magnifications: list[MagnificationReport]
    pipeline: PipelineContract
    timings: dict[str, float] = field(default_factory=dict)
    full_read_patches: int = 0
    #: What embedded the patches on this machine: name, precision, runtime, and the precision
    #: of the training features (recorded in ``pipeline``, not imposed).
    encoder: dict[str, Any] = field(default_factory=dict)
    #: For a remote slide, the bytes and requests that tissue detection and zooming cost.
    transfer: TransferStats | None = None

    @property
    def predicted(self) -> str:
        return self.class_names[int(np.argmax(self.probabilities))]

    @property
    def patches_embedded(self) -> int:
        return sum(m.patches_embedded for m in self.magnifications)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id, "slide_path": self.slide_path, "slide_mpp": self.slide_mpp,
            "slide_dimensions": list(self.slide_dimensions), "predicted": self.predicted,
            "probabilities": dict(zip(self.class_names, (float(p) for p in self.probabilities))),
            "patches_embedded": self.patches_embedded, "full_read_patches": self.full_read_patches,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "pipeline": self.pipeline.model_dump(mode="json"), "encoder": self.encoder,
            "transfer": self.transfer.to_dict() if self.transfer is not None else None,
            "magnifications": [m.to_dict() for m in self.magnifications], "zoompipe_version": __version__,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "prediction") -> "Prediction":
        names = list(data["probabilities"])
        return cls(
            slide_id=data["slide_id"], slide_path=data["slide_path"], slide_mpp=float(data["slide_mpp"]),
            slide_dimensions=tuple(data["slide_dimensions"]), class_names=names,
            probabilities=np.array([data["probabilities"][n] for n in names]),
            magnifications=[MagnificationReport.from_dict(m) for m in data["magnifications"]],
            pipeline=PipelineContract.from_data(data["pipeline"], source), timings=data.get("timings", {}),
            full_read_patches=int(data.get("full_read_patches", 0)), encoder=data.get("encoder", {}),
            transfer=TransferStats.from_dict(data["transfer"]) if data.get("transfer") else None)
