"""Embedding ahead in sparse training: the next slides' children, embedded while the model trains.

A sparse training step stops to embed the children its soft selections reach before its forward
pass can go on, so encoder and model take turns. :class:`Prefetcher` runs, before each step, the
soft selections of the next ``lookahead`` slides of the epoch on a copy of the model
(:meth:`~zoompipe.model.zoommil.ZoomMIL.explore`, with its own noise), in a background thread,
and embeds the children they reach (:meth:`~zoompipe.sparse.LazyRows.ahead`). When a slide's step
comes, most of what it asks is there; the rest (the rows that only its own noise reaches, or that
the weights learnt in between moved to) is embedded in the step as before.

What the model trains on does not change: rows embedded ahead are known to the slide only once a
step asks for them, a slide is never explored while it is being trained on, and the background
thread draws no number from torch's global random stream. The cost is the rows embedded ahead
that no step asks for (``train_summary.json``, ``sparse.ahead``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .model.zoommil import ZoomMIL
from .sparse import LazyRows, SparseDataset


class Prefetcher:
    """Explores the next slides of an epoch in background threads, one job per slide.

    Parameters
    ----------
    model : ZoomMIL
        The model being trained; each job explores a copy taken before the current step.
    slides : SparseDataset
        The training slides.
    device : str or torch.device
        Where the copies run.
    lookahead : int
        Slides explored ahead of the current step, at most (one thread each).
    seed : int
        Seeds the noise of the explorations (it does not touch the training's).
    """

    def __init__(self, model: ZoomMIL, slides: SparseDataset, device: str | torch.device, lookahead: int,
                 seed: int) -> None:
        self.model, self.slides, self.device, self.lookahead = model, slides, device, lookahead
        self.seeds = np.random.default_rng(seed)
        self.pool = ThreadPoolExecutor(max_workers=lookahead, thread_name_prefix="zoompipe-ahead")
        self.pending: dict[int, Future[None]] = {}

    def __call__(self, order: Sequence[int], position: int) -> None:
        """Before the step on ``order[position]``: wait for its exploration, start the next ones.

        Raises what the slide's exploration raised (the step would meet it too).
        """
        current = order[position]
        job = self.pending.pop(current, None)
        if job is not None:
            job.result()
        for index in order[position + 1:position + 1 + self.lookahead]:
            if index != current and index not in self.pending:
                seed = int(self.seeds.integers(2 ** 63))
                self.pending[index] = self.pool.submit(self._explore, copy.deepcopy(self.model), index, seed)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the threads after the explorations under way, and forget what no step used."""
        self.pool.shutdown(wait=True)
        for slide in self.slides.slides:
            slide.keep_reached()  # nothing was reached since the last exploration: all go

    def _explore(self, model: ZoomMIL, index: int, seed: int) -> None:
        slide, children, _ = self.slides[index]
        slide.to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        model.explore(_Ahead(slide), [c.to(self.device) for c in children], generator)
        slide.keep_reached()


class _Ahead:
    """The rows of a slide as :meth:`~zoompipe.sparse.LazyRows.ahead` gives them."""

    def __init__(self, slide: LazyRows) -> None:
        self.slide = slide

    def base(self) -> torch.Tensor:
        return self.slide.base()

    def rows(self, level: int, rows: torch.Tensor) -> torch.Tensor:
        return self.slide.ahead(level, rows)

    def selectable(self, k: int) -> torch.Tensor | None:
        return self.slide.selectable(k)
