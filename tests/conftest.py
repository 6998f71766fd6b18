"""Shared fixtures: slides the tests write themselves, and the real CMU slide when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from zoompipe.environment import apply_speed_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
apply_speed_settings()  # before any test module imports torch

@pytest.fixture(scope="session", autouse=True)
def encoder_cache(tmp_path_factory) -> Path:
    """Exported encoder graphs go to this session's folder, never to the user's cache."""
    path = tmp_path_factory.mktemp("zoompipe-cache")
    os.environ["ZOOMPIPE_CACHE_DIR"] = str(path)
    return path


CMU_SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The community's standard small Aperio slide (2220 x 2967 px, 0.499 mpp, 20x)."""
    if not CMU_SLIDE.exists():
        pytest.skip("CMU-1-Small-Region.svs is not beside the repository (../shared/data)")
    return CMU_SLIDE


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random colours: lossless codecs keep them exactly, area averages stay non-trivial."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
