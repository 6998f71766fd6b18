"""What a predictor is built from, importable without torch (a cluster task or a background thread builds it)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import ZoomPredictor


@dataclass(frozen=True)
class PredictorSettings:
    """What a :class:`ZoomPredictor` is built from: a worker of a cluster builds its own from it."""

    run_dir: Path
    device: str = "cpu"
    precision: str = "auto"
    runtime: str = "auto"
    encoder_weights: str | None = None
    batch_size: int = 32
    workers: int = 2
    mask_dir: str | Path | None = None

    def build(self) -> ZoomPredictor:
        from .engine import ZoomPredictor  # torch: only where a predictor is built

        return ZoomPredictor(**{f.name: getattr(self, f.name) for f in fields(self)})
