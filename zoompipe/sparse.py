"""Sparse zoom training: ZoomMIL trained from base features and the raw slides.

Dense training needs the features of every child of every base patch at every magnification,
so preprocessing a training cohort costs a full high-magnification pipeline. Yet the soft
top-K only reads the children of the parents that carry weight (the model prunes the rest
exactly), and the hard selection of validation only those of K parents. Sparse training reads
base features from feature files (``preprocess --magnifications 1.25``) and, at each step,
embeds from the raw slide the children the step needs that no earlier step embedded.

- **Which patches exist** comes from the same slide path as prediction:
  :func:`~zoompipe.tiling.tile_slide` and :func:`~zoompipe.tiling.cascade_tiles` of the base
  files' pipeline contract extended to the cascade (:func:`cascade_contract`), so a row means
  the same patch as in a dense feature file; the rebuilt base grid must equal the file's.
- **Embedding** is :func:`~zoompipe.embed.embed_patches` with the contract's encoder, as in
  preprocessing.
- **The cache** (:class:`FeatureCache`): one feature file per slide, zoompipe's layout, with
  the base group in full and, above it, only the rows embedded so far (``parent`` is the row in
  the cached group below). It is rewritten atomically whenever rows are added, read back by
  :func:`~zoompipe.features.read_feature_file`, and matched to the layout by cell, so a rerun
  (or another run on the same slides and contract) embeds nothing twice.
- **A budget** (``SparseSettings.explore_budget``): the soft top-K's noise, and the heads moving
  while they learn, would have the union visit most of the tissue in a few epochs;
  :meth:`LazyRows.selectable` lets the base step choose only among a share of each slide's base
  patches, the greedy cover of its feature space (:func:`coverage_order`), fixed before training.
- **Embedding ahead** (:mod:`zoompipe.prefetch`): while the model trains on one slide, a
  background thread embeds the children that the next slides' steps will probably ask for
  (:meth:`LazyRows.ahead`). They wait in memory until a step asks for them, so what the model
  sees, the zoom target's known rows included, is what it sees without embedding ahead.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from .contract import GridSettings, PipelineContract, first_disagreement
from .dataset import check_feature_files
from .embed import embed_patches
from .encoders import Encoder
from .engine import contract_encoder
from .errors import ContractError, FeatureFileError, GridError, UsageError
from .features import group_name, read_feature_file, write_feature_file
from .grid import PatchGrid, children_index
from .preprocess import find_slides
from .slide import SlideSource, open_slide, slide_source
from .tiling import cascade_tiles, tile_slide


@dataclass
class SparseSettings:
    """Where sparse training finds the slides and how it embeds their children.

    Attributes
    ----------
    slides : sequence of str, optional
        Slide files, folders or CSVs with ``slide_path`` (as ``preprocess`` takes them);
        by default the ``slide_path`` each feature file records.
    cache_dir : path, optional
        Folder of the per-slide feature caches [default: ``<run>/feature_cache``]. Runs on the
        same slides and contract may share it.
    weights : str, optional
        Encoder weights, for encoders whose weights do not ship with zoompipe.
    precision, runtime : str
        Encoder precision and runtime (:func:`~zoompipe.encoders.create_encoder`). Precision
        ``"auto"`` is the precision the base features were made with, so that a bag holds
        features of one kind.
    batch_size, workers : int
        Encoder batch and patch reader threads.
    lookahead : int
        Training slides whose children are embedded ahead, in background threads, while the
        model trains on the current one (:mod:`zoompipe.prefetch`); 0 embeds only what each
        step asks, when it asks. It changes when patches are embedded, not the model trained.
        On a 2-core CPU, where the encoder and the model share the cores, 1 trained 0.81x as
        fast and embedded 21% more (``benchmarks/sparse_lookahead.py``), on an H200 0.60x; it
        is meant for remote cluster workers running a slow encoder.
    explore_budget : float, optional
        Limit what training explores: at most this fraction of each training slide's base
        patches (and at least K) ever has its children embedded: the first of the slide's
        tissue-weighted greedy feature-space cover (:func:`coverage_order`), chosen before
        training, among which the base step's top-K chooses (:meth:`LazyRows.selectable`).
        None: no limit, the soft top-K as dense training runs it.
    cluster : str, optional
        Embed on the workers of a Dask cluster (:func:`~zoompipe.cluster.parse_cluster`:
        ``local:N``, ``tcp://HOST:8786``, a scheduler file) instead of in this process; with
        a lookahead of L, up to L + 1 slides embed at once. The workers must see the slides.
    backend : str
        Slide library.
    mask_dir : str, optional
        The user-drawn tissue masks the base features were made with.
    """

    slides: Sequence[str] | None = None
    cache_dir: str | os.PathLike | None = None
    weights: str | None = None
    precision: str = "auto"
    runtime: str = "auto"
    batch_size: int = 32
    workers: int = 2
    lookahead: int = 0
    explore_budget: float | None = None
    cluster: str | None = None
    backend: str = "auto"
    mask_dir: str | None = None


def cascade_contract(base: PipelineContract, magnifications: Sequence[float]) -> PipelineContract:
    """The base files' contract with the grid cascade that training zooms through.

    The base grid depends only on the base magnification, patch size, minimum tissue and
    tissue settings, so a file preprocessed at the base alone holds the base grid of any cascade
    that starts there; the children policy is the file's.

    Raises
    ------
    UsageError
        A cascade that does not start at the files' base magnification, or is not nested.
    """
    mags = tuple(float(m) for m in magnifications)
    if len(mags) < 2:
        raise UsageError("sparse training zooms: give the cascade, e.g. --magnifications 1.25,2.5,10")
    if mags[0] != base.grid.magnifications[0]:
        raise UsageError(f"the cascade must start at the features' base magnification "
                         f"{base.grid.magnifications[0]:g}x, got {mags[0]:g}x")
    try:
        grid = GridSettings(**{**base.grid.model_dump(), "magnifications": mags})
    except (ValidationError, GridError) as err:
        raise UsageError(f"cascade {', '.join(f'{m:g}x' for m in mags)}: {err}") from None
    return base.model_copy(update={"grid": grid})


def override_mpp(contract: PipelineContract) -> float | None:
    """The mpp a slide was preprocessed with when it was given (``--mpp``, ``--mpp-csv``), else None."""
    slide = contract.slide
    return slide.mpp if slide is not None and slide.mpp_source == "override" else None


def _every_child(index: np.ndarray, flag: np.ndarray) -> np.ndarray:
    """For each row of ``index`` (rows of children, -1 for none): whether ``flag`` holds for all its children."""
    return ((index < 0) | flag[index.clip(min=0)]).all(axis=1)


def coverage_order(features: np.ndarray, weights: np.ndarray | None = None, n: int | None = None) -> np.ndarray:
    """Rows of ``features`` in the order a greedy k-centre cover of their feature space takes them.

    The first row is the one farthest (times its weight) from the median of the standardised
    features; each next one the farthest (times its weight) from every row taken so far. The
    patches that look least like the rest of a slide so come first, each kind of tissue once:
    on the zoom benchmark's cohort, where the lesions stand out at 1.25x, the first 15% of a
    slide's base patches (tissue fractions as weights) covered 72 of the 74 lesions of fold 0's
    training slides, random choices 21.

    Parameters
    ----------
    features : numpy.ndarray
        (N, D) features of one slide's patches.
    weights : numpy.ndarray, optional
        (N,) non-negative weights, such as tissue fractions (NaN counts as 1); 1 by default.
    n : int, optional
        How many rows to return [default: all].

    Returns
    -------
    numpy.ndarray
        (min(n, N),) int64 row indices, distinct, deterministic.
    """
    x = features.astype(np.float64)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    w = np.ones(len(x)) if weights is None else np.nan_to_num(np.asarray(weights, np.float64), nan=1.0)
    n = len(x) if n is None else min(n, len(x))
    order = np.empty(n, np.int64)
    distance = np.linalg.norm(x - np.median(x, axis=0), axis=1)
    taken = np.zeros(len(x), bool)
    for i in range(n):
        order[i] = np.argmax(np.where(taken, -np.inf, distance * w))
        taken[order[i]] = True
        distance = np.minimum(distance, np.linalg.norm(x - x[order[i]], axis=1))
    return order


def explore_cover(base_features: np.ndarray, children: np.ndarray, budget: float, k: int,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """The base patches that an exploration budget lets training zoom into.

    The first ``max(ceil(budget * N), k)`` base patches that have children, in the order of
    their cover (:func:`coverage_order`): fixed from the base features alone, before any step.

    Parameters
    ----------
    base_features : numpy.ndarray
        (N, D) features of one slide's base patches.
    children : numpy.ndarray
        (N, C) rows of each base patch's children, -1 for none (:func:`~zoompipe.grid.children_index`).
    budget : float
        Share of the base patches, in (0, 1] (``SparseSettings.explore_budget``).
    k : int
        Patches each step selects; never fewer are allowed.
    weights : numpy.ndarray, optional
        (N,) weights of the cover (tissue fractions).

    Returns
    -------
    numpy.ndarray
        (N,) bool, True for the patches allowed.
    """
    candidates = np.flatnonzero((children >= 0).any(axis=1))
    n = max(math.ceil(budget * len(children)), k)
    allowed = np.zeros(len(children), bool)
    allowed[candidates[coverage_order(base_features[candidates],
                                      None if weights is None else weights[candidates], n)]] = True
    return allowed


def _cell_keys(cells: np.ndarray) -> np.ndarray:
    return (cells[:, 0].astype(np.int64) << 32) | cells[:, 1].astype(np.int64)


class RowStore:
    """One slide's features known so far, by row of each magnification's full grid (in memory).

    Parameters
    ----------
    sizes : list of int
        Rows of each magnification's full grid, base first.
    base_features : ndarray
        (N_0, D) features of every base patch.
    """

    def __init__(self, sizes: list[int], base_features: np.ndarray) -> None:
        self.position = [np.arange(sizes[0])] + [np.full(n, -1, np.int64) for n in sizes[1:]]
        empty = np.zeros((0, base_features.shape[1]), np.float32)
        self.features = [np.asarray(base_features, np.float32)] + [empty] * (len(sizes) - 1)

    def count(self, level: int) -> int:
        """Rows known at ``level``."""
        return len(self.features[level])

    def missing(self, level: int, rows: np.ndarray) -> np.ndarray:
        """Those of ``rows`` not known yet, ascending."""
        return np.unique(rows[self.position[level][rows] < 0])

    def add(self, level: int, rows: np.ndarray, features: np.ndarray) -> None:
        """Remember the features of new ``rows`` at ``level``."""
        self.position[level][rows] = np.arange(len(rows)) + len(self.features[level])
        self.features[level] = np.concatenate([self.features[level], np.asarray(features, np.float32)])

    def get(self, level: int, rows: np.ndarray) -> np.ndarray:
        """Features of known ``rows`` at ``level``."""
        return self.features[level][self.position[level][rows]]

    def known_rows(self, level: int) -> np.ndarray:
        """Ascending rows known at ``level``."""
        return np.flatnonzero(self.position[level] >= 0)

    def save(self) -> None:
        """Nothing to do: a memory store is not kept."""


class FeatureCache(RowStore):
    """A :class:`RowStore` of one slide's cascade layout, mirrored in a feature file.

    Parameters
    ----------
    path : Path
        The cache file; read when it exists (rows matched to ``layout`` by cell).
    layout : list of PatchGrid
        The slide's cascade (:func:`~zoompipe.tiling.cascade_tiles`).
    contract : PipelineContract
        The slide's cascade contract; a cache made under another one is refused.
    attrs : dict
        Root attributes of the base feature file (slide id, path, size).
    base_features : ndarray
        (N_0, D) features of every base patch.

    Raises
    ------
    FeatureFileError, ContractError
        A cache file that cannot be read, that was made under another contract, or whose
        cells are not patches of the layout.
    """

    def __init__(self, path: Path, layout: list[PatchGrid], contract: PipelineContract, attrs: dict,
                 base_features: np.ndarray) -> None:
        super().__init__([len(g) for g in layout], base_features)
        self.path, self.layout, self.contract, self.attrs = path, layout, contract, attrs
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = read_feature_file(self.path)
        difference = data.contract is not None and first_disagreement(self.contract, data.contract)
        if data.contract is None or difference or data.magnifications != [g.magnification for g in self.layout]:
            raise ContractError(f"{self.path}: feature cache made under other settings "
                                f"({difference or 'another cascade'}); delete it or use another cache folder")
        for level in range(1, len(self.layout)):
            rows = self._rows_of_cells(level, data.grids[level].cells)
            self.add(level, rows, data.features[level])

    def _rows_of_cells(self, level: int, cells: np.ndarray) -> np.ndarray:
        keys = _cell_keys(self.layout[level].cells)
        order = np.argsort(keys)
        wanted = _cell_keys(cells)
        at = np.searchsorted(keys, wanted, sorter=order).clip(max=len(keys) - 1)
        found = keys[order[at]] == wanted if len(keys) else np.zeros(len(wanted), bool)
        if not found.all():
            raise FeatureFileError(f"{self.path}: {int((~found).sum())} cached patches at "
                                   f"{group_name(self.layout[level].magnification)} are not in the slide's "
                                   "grid; delete the cache")
        return order[at]

    def save(self) -> None:
        """Write every known row under a temporary name, then rename it over the cache file."""
        grids, features, rank = [], [], None
        for level, grid in enumerate(self.layout):
            rows = self.known_rows(level)
            taken = grid.take(rows)
            if rank is not None:  # parents as rows of the cached group below
                taken = replace(taken, parent=np.where(taken.parent >= 0, rank[taken.parent.clip(min=0)], -1))
            rank = np.full(len(grid), -1, np.int64)
            rank[rows] = np.arange(len(rows))
            grids.append(taken)
            features.append(self.get(level, rows))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_feature_file(self.path, self.contract, {**self.attrs, "sparse_cache": True}, grids, features)


def embed_grid(source: SlideSource, contract: PipelineContract, grid: PatchGrid, encoder: Encoder,
               settings: SparseSettings) -> np.ndarray:
    """Features (len(grid), D) of the patches of ``grid``, read from the slide of ``source``."""
    with open_slide(source, backend=settings.backend, mpp=override_mpp(contract)) as slide:
        return embed_patches(slide, grid.coords, grid.mpp, grid.patch_size, encoder,
                             batch_size=settings.batch_size, workers=settings.workers)


class ChildEmbedder:
    """Embeds patches of the layout from the raw slides, with the contract's encoder, and counts them.

    The encoder is built on first use, or by :meth:`build`. Building it never draws from torch's
    global random stream (running it draws nothing), so a seeded run trains the same whether its
    features were cached or not. Calls from several threads take turns on the local encoder; on
    a cluster (:meth:`on_cluster`) each call is a task, and calls run at once.
    """

    def __init__(self, contract: PipelineContract, settings: SparseSettings, device: str) -> None:
        self.contract, self.settings, self.device = contract, settings, device
        # Children join the base features in one bag: by default they are embedded in the
        # precision the base features were, not in what this machine would pick.
        self.precision = contract.encoder.precision if settings.precision == "auto" else settings.precision
        self._encoder: Encoder | None = None
        self._lock = threading.Lock()
        self._cluster: Callable[[SlideSource, PipelineContract, PatchGrid], np.ndarray] | None = None
        #: (phase, magnification) -> patches embedded since the last :meth:`take_counts`.
        self.counts: Counter[tuple[str, float]] = Counter()

    def build(self) -> None:
        """Build the local encoder now. Call it from the training thread before embedding in another
        one: the global random state that building forks and restores is shared by every thread."""
        if self._encoder is None:
            with torch.random.fork_rng(devices=[]):
                self._encoder = contract_encoder(self.contract, self.settings.weights, self.device, self.precision,
                                                 self.settings.runtime)

    @contextmanager
    def on_cluster(self) -> Iterator[None]:
        """While the block runs, embed on the workers of ``settings.cluster`` (without one, locally)."""
        if self.settings.cluster is None:
            yield
            return
        from .cluster import connect, embed_on_cluster, local_threads

        with connect(self.settings.cluster, gpu=str(self.device).startswith("cuda")) as (client, spec):
            self._cluster = partial(embed_on_cluster, client, settings=self.settings, device=str(self.device),
                                    precision=self.precision, threads=local_threads(spec))
            try:
                yield
            finally:
                self._cluster = None

    def __call__(self, source: SlideSource, slide_contract: PipelineContract, grid: PatchGrid,
                 phase: str) -> np.ndarray:
        if self._cluster is not None:
            features = self._cluster(source, slide_contract, grid)
        else:
            with self._lock:
                self.build()
                features = embed_grid(source, slide_contract, grid, self._encoder, self.settings)
        with self._lock:
            self.counts[phase, grid.magnification] += len(grid)
        return features

    def take_counts(self) -> dict[str, dict[str, int]]:
        """Patches embedded since the last call, ``{phase: {"2.5x": n, ...}}``; resets the counts."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for (phase, magnification), n in sorted(self.counts.items()):
                out.setdefault(phase, {})[group_name(magnification)] = n
            self.counts.clear()
        return out


class LazyRows:
    """A :class:`~zoompipe.model.RowSource` that embeds the rows it is asked for and does not know yet.

    Parameters
    ----------
    store : RowStore
        What is known; rows embedded are added to it, and it is saved before they are returned.
    children : list of Tensor
        Per magnification but the last, (N_i, C) rows of each patch's children, -1 for none.
    embed : callable
        ``embed(level, rows) -> (len(rows), D) features`` of the ascending ``rows`` of ``level``.
    embed_ahead : callable, optional
        The same, for rows embedded ahead of the step that needs them (:meth:`ahead`), so
        that they can be counted apart; ``embed`` by default.
    budget : float, optional
        ``explore_budget`` of :class:`SparseSettings` (:meth:`selectable`).
    weights : numpy.ndarray, optional
        (N_0,) weights of the base patches in the budget's cover (tissue fractions).

    Rows embedded ahead wait in memory (``staged``, per level ``{row: features}``) until
    :meth:`rows` asks for them; only then are they known. One thread at a time may use a
    ``LazyRows`` (:mod:`zoompipe.prefetch` never embeds ahead for the slide being trained on).
    """

    def __init__(self, store: RowStore, children: list[Tensor],
                 embed: Callable[[int, np.ndarray], np.ndarray],
                 embed_ahead: Callable[[int, np.ndarray], np.ndarray] | None = None,
                 budget: float | None = None, weights: np.ndarray | None = None) -> None:
        self.store, self.children, self.embed, self.budget = store, children, embed, budget
        self.weights = weights
        self._cover: dict[int, Tensor] = {}
        self.embed_ahead = embed if embed_ahead is None else embed_ahead
        self.device: str | torch.device = "cpu"
        self.staged: list[dict[int, np.ndarray]] = [{} for _ in store.position]
        self._reached: list[set[int]] = [set() for _ in store.position]
        #: Per level, rows embedded ahead that a step then asked for.
        self.used_ahead: Counter[int] = Counter()

    def to(self, device: str | torch.device) -> LazyRows:
        """Give features on ``device`` from now on."""
        self.device = device
        return self

    def base(self) -> Tensor:
        return torch.from_numpy(self.store.features[0]).to(self.device)

    def rows(self, level: int, rows: Tensor) -> Tensor:
        wanted = rows.cpu().numpy()
        missing = self.store.missing(level, wanted)
        if len(missing):
            staged = self.staged[level]
            ready = np.array([row in staged for row in missing.tolist()], bool)
            features = np.empty((len(missing), self.store.features[0].shape[1]), np.float32)
            if ready.any():
                features[ready] = np.stack([staged.pop(row) for row in missing[ready].tolist()])
                self.used_ahead[level] += int(ready.sum())
            if not ready.all():
                features[~ready] = self.embed(level, missing[~ready])
            self.store.add(level, missing, features)
            self.store.save()
        return torch.from_numpy(self.store.get(level, wanted)).to(self.device)

    def ahead(self, level: int, rows: Tensor) -> Tensor:
        """As :meth:`rows`, but rows not known yet are embedded into ``staged``, not made known."""
        wanted = rows.cpu().numpy()
        staged = self.staged[level]
        self._reached[level].update(wanted.tolist())
        new = self.store.missing(level, wanted)
        new = new[[row not in staged for row in new.tolist()]]
        if len(new):
            staged.update(zip(new.tolist(), self.embed_ahead(level, new)))
        known = self.store.position[level][wanted] >= 0
        features = np.empty((len(wanted), self.store.features[0].shape[1]), np.float32)
        if known.any():
            features[known] = self.store.get(level, wanted[known])
        if not known.all():
            features[~known] = np.stack([staged[row] for row in wanted[~known].tolist()])
        return torch.from_numpy(features).to(self.device)

    def selectable(self, k: int) -> Tensor | None:
        """The base patches the budget allows (:func:`explore_cover` of the base features,
        ``weights`` weighing them); None without a budget.

        Fixed before any step, from the base features alone: neither the untrained heads nor
        what a cache shared with other runs holds decide what this run explores.
        """
        if self.budget is None:
            return None
        if k not in self._cover:
            self._cover[k] = torch.from_numpy(explore_cover(self.store.features[0], self.children[0].numpy(),
                                                            self.budget, k, self.weights))
        return self._cover[k]

    def keep_reached(self) -> None:
        """Forget the rows embedded ahead that no :meth:`ahead` call reached since the last call.

        Called after each exploration: the staged rows it reached again stay for the next step
        (they are not embedded twice), the others go, so memory stays bounded by one exploration.
        """
        self.staged = [{row: f for row, f in staged.items() if row in reached}
                       for staged, reached in zip(self.staged, self._reached)]
        self._reached = [set() for _ in self._reached]

    def known(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        store = self.store
        known = [store.known_rows(level) for level in range(len(store.features))]
        ranks = []
        for level, rows in enumerate(known):
            rank = np.full(len(store.position[level]), -1, np.int64)
            rank[rows] = np.arange(len(rows))
            ranks.append(rank)
        # Whether every last-magnification descendant of a row is known, from the last level down.
        complete = store.position[-1] >= 0
        done = []
        for level in reversed(range(len(known) - 1)):
            index = self.children[level].numpy()
            complete = _every_child(index, complete)
            done.insert(0, complete[known[level]])
        bags, children = [], []
        for level, rows in enumerate(known):
            bags.append(torch.from_numpy(store.get(level, rows)).to(self.device))
            if level + 1 < len(known):
                index = self.children[level].numpy()[rows]
                child = np.where(index >= 0, ranks[level + 1][index.clip(min=0)], -1)
                children.append(torch.from_numpy(child).to(self.device))
        return bags, children, [torch.from_numpy(d).to(self.device) for d in done]


class SparseSlide(LazyRows):
    """A slide's rows: the base from its file, the rest embedded from the raw slide into its cache."""

    def __init__(self, source: SlideSource, contract: PipelineContract, layout: list[PatchGrid],
                 cache: FeatureCache, embedder: ChildEmbedder, phase: str) -> None:
        children = [torch.from_numpy(children_index(a, b)) for a, b in zip(layout, layout[1:])]
        super().__init__(cache, children,
                         lambda level, rows: embedder(source, contract, layout[level].take(rows), phase),
                         lambda level, rows: embedder(source, contract, layout[level].take(rows), "ahead"),
                         embedder.settings.explore_budget, layout[0].tissue)
        self.cache, self.layout = cache, layout


class SparseDataset(Dataset):
    """Labelled slides for sparse training: item ``i`` is ``(SparseSlide, children, label)``.

    Every slide is tiled when the dataset is made (a thumbnail and the tissue mask each), so a
    missing slide fails at once and the dense patch count is known before training.

    Parameters
    ----------
    features_dir : path
        Folder of ``<slide_id>.h5`` base feature files.
    slide_ids, labels : sequence
        Slides and their class indices.
    magnifications : sequence of float
        The cascade, base first.
    settings : SparseSettings
    embedder : ChildEmbedder
    cache_dir : Path
        Folder of the per-slide caches.
    phase : str
        Name under which embedded patches are counted (``train``, ``val``).
    progress : bool
        Show a progress bar while tiling.

    Raises
    ------
    FeatureFileError, SlideError, ContractError
        A missing base file or slide, or a slide whose base grid differs from its file's.
    """

    def __init__(self, features_dir: str | os.PathLike, slide_ids: Sequence[str], labels: Sequence[int],
                 magnifications: Sequence[float], settings: SparseSettings, embedder: ChildEmbedder,
                 cache_dir: Path, phase: str, progress: bool = False) -> None:
        self.slide_ids = list(slide_ids)
        self.labels = [int(y) for y in labels]
        paths = check_feature_files(features_dir, self.slide_ids)
        given = {s.slide_id: s for s in find_slides(settings.slides)} if settings.slides else {}
        self.slides = []
        for slide_id, path in tqdm(list(zip(self.slide_ids, paths)), desc=f"tiling {phase} slides", unit="slide",
                                   disable=not progress, leave=False):
            self.slides.append(self._tile(path, slide_id, given, magnifications, settings, embedder,
                                          cache_dir, phase))
        self.feature_dim = self.slides[0].cache.features[0].shape[1] if self.slides else None

    @staticmethod
    def _tile(path: Path, slide_id: str, given: dict[str, SlideSource], magnifications: Sequence[float],
              settings: SparseSettings, embedder: ChildEmbedder, cache_dir: Path, phase: str) -> SparseSlide:
        data = read_feature_file(path, [float(magnifications[0])])
        if data.contract is None:
            raise FeatureFileError(f"{path}: a CLAM/TRIDENT file records no pipeline contract; sparse training "
                                   "needs base features from zoompipe preprocess")
        contract = cascade_contract(data.contract, magnifications)
        if slide_id in given:
            source = given[slide_id]
        elif data.attrs.get("slide_path"):
            source = slide_source(data.attrs["slide_path"])
        else:
            raise FeatureFileError(f"{path} does not record its slide; pass the slides (--slides)")
        with open_slide(source, backend=settings.backend, mpp=override_mpp(contract)) as slide:
            layout = cascade_tiles(tile_slide(slide, contract, settings.mask_dir), contract.grid)
        if not np.array_equal(layout[0].cells, data.grids[0].cells):
            raise ContractError(f"{source.name}: its base grid ({len(layout[0])} patches) is not the one of {path} "
                                f"({len(data.grids[0])}); is it the slide those features were made from?")
        cache = FeatureCache(Path(cache_dir) / f"{slide_id}.h5", layout, contract, data.attrs, data.features[0])
        return SparseSlide(source, contract, layout, cache, embedder, phase)

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int) -> tuple[SparseSlide, list[Tensor], int]:
        slide = self.slides[index]
        return slide, slide.children, self.labels[index]

    def _magnifications(self) -> list[float]:
        return [g.magnification for g in self.slides[0].layout] if self.slides else []

    def dense_counts(self) -> dict[str, int]:
        """Patches per magnification that dense preprocessing of these slides embeds."""
        mags = self._magnifications()
        return {group_name(m): sum(len(s.layout[i]) for s in self.slides) for i, m in enumerate(mags)}

    def used_ahead_counts(self) -> dict[str, int]:
        """Patches per magnification above the base that were embedded ahead and then used."""
        mags = self._magnifications()
        return {group_name(m): sum(s.used_ahead[i] for s in self.slides) for i, m in enumerate(mags) if i}

    def cached_counts(self) -> dict[str, int]:
        """Patches per magnification known in the caches now (the base included)."""
        mags = self._magnifications()
        return {group_name(m): sum(s.cache.count(i) for s in self.slides) for i, m in enumerate(mags)}
