"""Read patches ahead of the encoder: a pool of reader threads, each with its own slide handle.

Slide libraries decode in C and release the GIL, so threads overlap decoding with the encoder's
forward pass. Batches come back in the order of the coordinates, whatever order the threads
finish in.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from .slide import Slide


def read_patches(slide: Slide, coords: np.ndarray, mpp: float, patch_size: int) -> np.ndarray:
    """Read square patches at a resolution.

    Parameters
    ----------
    slide : Slide
    coords : ndarray
        (N, 2) level-0 top-left (x, y) of every patch.
    mpp : float
        Resolution of the patches in microns per pixel.
    patch_size : int
        Side in pixels at ``mpp``.

    Returns
    -------
    ndarray
        (N, patch_size, patch_size, 3) uint8 RGB; parts outside the slide are white.
    """
    out = np.empty((len(coords), patch_size, patch_size, 3), np.uint8)
    slide.prefetch(coords, patch_size, patch_size, mpp)  # a remote slide fetches the whole batch at once
    for i, (x, y) in enumerate(coords):
        out[i] = slide.read_region(int(x), int(y), patch_size, patch_size, mpp)
    return out


def iter_patch_batches(
    slide: Slide,
    coords: np.ndarray,
    mpp: float,
    patch_size: int,
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 4,
) -> Iterator[np.ndarray]:
    """Yield batches of patches, read by ``workers`` threads up to ``prefetch`` batches ahead.

    Parameters
    ----------
    slide : Slide
        Its path, backend and mpp are reused; each thread opens its own handle (of a remote
        slide, a view that shares its header and range cache).
    coords, mpp, patch_size
        As in :func:`read_patches`.
    batch_size : int
        Patches per batch (the last one may be smaller).
    workers : int
        Reader threads; 0 reads in the calling thread with ``slide`` itself.
    prefetch : int
        Batches in flight at most, which bounds memory.

    Yields
    ------
    ndarray
        (B, patch_size, patch_size, 3) uint8, in the order of ``coords``.
    """
    starts = range(0, len(coords), batch_size)
    if workers <= 0:
        for start in starts:
            yield read_patches(slide, coords[start:start + batch_size], mpp, patch_size)
        return

    local = threading.local()
    handles: list[Slide] = []
    lock = threading.Lock()

    def read_batch(start: int) -> np.ndarray:
        if not hasattr(local, "slide"):
            local.slide = slide.reopen()
            with lock:
                handles.append(local.slide)
        return read_patches(local.slide, coords[start:start + batch_size], mpp, patch_size)

    pending: deque = deque()
    todo = iter(starts)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zoompipe-reader")
    try:
        for start in todo:
            pending.append(pool.submit(read_batch, start))
            if len(pending) >= max(prefetch, 1):
                break
        while pending:
            batch = pending.popleft().result()
            for start in todo:  # refill: one batch out, one batch in
                pending.append(pool.submit(read_batch, start))
                break
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for handle in handles:
            handle.close()
