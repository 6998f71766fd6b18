"""Patches to features: the patch reader feeding a frozen encoder."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .encoders import Encoder
from .patches import iter_patch_batches
from .slide import Slide


def embed_patches(
    slide: Slide,
    coords: np.ndarray,
    mpp: float,
    patch_size: int,
    encoder: Encoder,
    batch_size: int = 32,
    workers: int = 2,
    desc: str | None = None,
) -> np.ndarray:
    """Read patches at ``mpp`` and embed them, reads overlapping the encoder.

    Parameters
    ----------
    slide : Slide
    coords : ndarray
        (N, 2) level-0 top-left (x, y) of every patch.
    mpp : float
        Resolution of the patches.
    patch_size : int
        Patch side in pixels at ``mpp``.
    encoder : Encoder
    batch_size, workers
        See :func:`zoompipe.patches.iter_patch_batches`.
    desc : str, optional
        Label of a progress bar; no bar when None.

    Returns
    -------
    ndarray
        (N, encoder.feature_dim) float32, row i for ``coords[i]``.
    """
    features = np.empty((len(coords), encoder.feature_dim), np.float32)
    batches = iter_patch_batches(slide, coords, mpp, patch_size, batch_size=batch_size, workers=workers)
    with tqdm(total=len(coords), desc=desc, unit="patch", disable=desc is None, leave=False) as bar:
        done = 0
        for batch in batches:
            features[done:done + len(batch)] = encoder.embed(batch)
            done += len(batch)
            bar.update(len(batch))
    return features
