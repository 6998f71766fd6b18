"""``zoompipe preprocess``: slides -> tissue -> patch grids -> features, one file set per slide.

For every slide it writes, each file under a temporary name renamed when complete:

- ``features/<slide_id>.h5``: the cascade of grids, their features and the slide's pipeline
  contract (:mod:`zoompipe.features`, :mod:`zoompipe.contract`);
- ``masks/<slide_id>.png``: thumbnail with tissue contours and the base patch grid, to check;
- ``geojson/<slide_id>.geojson``: tissue polygons in level-0 pixels (opens in QuPath);
- ``status/<slide_id>.json``: the slide's outcome, gathered into ``status.csv``
  (:mod:`zoompipe.run_status`).

A slide whose three files exist is skipped; a failing slide is recorded and the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, get_args

from tqdm import tqdm

from .atomic import remove_leftovers
from .contract import ChildrenPolicy, EncoderSettings, GridSettings, PipelineContract, SlideSettings, TissueSettings, UserMasks, file_sha256
from .embed import embed_patches
from .encoders import DEFAULT_ENCODER, Encoder, create_encoder, lookup
from .errors import UsageError, ZoompipeError, describe_failure
from .features import group_name, write_feature_file
from .qc import overview_mpp, qc_image, tissue_geojson, write_geojson, write_png
from .locks import slide_lock
from .run_status import SlideStatus, check_unique_ids, read_records, write_record, write_table
from .slide import SlideSource, is_url, load_mpp_overrides, open_slide, slide_source
from .tables import read_table
from .tiling import cascade_tiles, tile_slide
from .tissue import TissueParams

if TYPE_CHECKING:
    from distributed import Client

    from .cluster import ClusterSpec

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                    ".qptiff", ".dcm")


@dataclass
class PreprocessConfig:
    """Everything that decides what a feature file holds.

    Attributes
    ----------
    magnifications : list of float
        The cascade, base first (1.25, 2.5, 10 by default; ``[1.25]`` for a single scale).
    patch_size : int
        Patch side in pixels at every magnification.
    min_tissue : float
        Tissue fraction a base patch needs to be kept.
    children : str
        ``"tissue"``: at the last magnification only children with ``min_tissue`` are kept and
        embedded; ``"all"``: every descendant of a base tissue patch (see
        :func:`zoompipe.tiling.child_tiles`).
    tissue : TissueParams
    encoder, weights, device, precision, runtime
        See :func:`zoompipe.encoders.create_encoder`.
    batch_size, workers
        Encoder batch and reader threads.
    backend : str
        Slide library (``auto``, ``openslide``, ``tiffslide``).
    mpp : float, optional
        Level-0 mpp for every slide, overriding metadata.
    mpp_csv : str, optional
        ``slide_id,mpp`` per-slide overrides.
    mask_dir : str, optional
        Folder of tissue masks drawn by people, ``<slide_id>.geojson`` (QuPath) or
        ``<slide_id>.png``; slides without one are segmented.
    """

    magnifications: list[float] = field(default_factory=lambda: [1.25, 2.5, 10.0])
    patch_size: int = 256
    min_tissue: float = 0.1
    children: str = "tissue"
    tissue: TissueParams = field(default_factory=TissueParams)
    encoder: str = DEFAULT_ENCODER
    weights: str | None = None
    device: str = "cpu"
    precision: str = "auto"
    runtime: str = "auto"
    batch_size: int = 32
    workers: int = 2
    backend: str = "auto"
    mpp: float | None = None
    mpp_csv: str | None = None
    mask_dir: str | None = None


def find_slides(inputs: Iterable[str | Path]) -> list[SlideSource]:
    """Slides named by files, URLs, folders (searched recursively by extension) or CSVs with ``slide_path``.

    A URL (and a ``slide_path`` that is one) is taken as it is: whether it exists is learnt when
    the slide is read.

    Raises
    ------
    UsageError
        An input that does not exist, a CSV without a ``slide_path`` column, or two slides with
        the same id (file stem).
    """
    slides: list[SlideSource] = []
    for given in inputs:
        if is_url(given):
            slides.append(slide_source(given))
            continue
        item = Path(given)
        if item.is_dir():
            slides += [slide_source(p) for p in sorted(item.rglob("*"))
                       if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS]
        elif item.suffix.lower() == ".csv":
            slides += [slide_source(row["slide_path"]) for row in read_table(item, ("slide_path",))]
        elif item.exists():
            slides.append(slide_source(item))
        else:
            raise UsageError(f"{item}: no such file or folder")
    check_unique_ids(slides)
    return slides


def output_paths(out_dir: Path, slide_id: str) -> dict[str, Path]:
    """Where the files of one slide go."""
    return {
        "features": out_dir / "features" / f"{slide_id}.h5",
        "mask": out_dir / "masks" / f"{slide_id}.png",
        "geojson": out_dir / "geojson" / f"{slide_id}.geojson",
    }


def run_contract(config: PreprocessConfig, encoder: Encoder) -> PipelineContract:
    """The contract every slide of a preprocessing run shares (the per-slide fields empty)."""
    # The encoder knows its weights' identity: the digest of a file given or fetched from a hub.
    weights = encoder.config.weights
    return PipelineContract(
        grid=GridSettings(magnifications=config.magnifications, patch_size=config.patch_size,
                          min_tissue=config.min_tissue, children=config.children),
        tissue=TissueSettings(segmentation=config.tissue,
                              user_masks=UserMasks(dir=str(config.mask_dir)) if config.mask_dir else None),
        encoder=EncoderSettings(name=encoder.name, feature_dim=encoder.feature_dim, weights=weights,
                                precision=encoder.precision))


def preprocess_slide(path: str | Path | SlideSource, out_dir: Path, config: PreprocessConfig, encoder: Encoder,
                     contract: PipelineContract, mpp: float | None = None, progress: bool = False) -> str:
    """Segment, tile and embed one slide; write its three files. Returns the patch counts.

    ``contract`` is :func:`run_contract` of ``config`` and ``encoder``; the slide's own fields
    are filled in here.
    """
    with open_slide(path, backend=config.backend, mpp=mpp) as slide:
        thumbnail = slide.thumbnail(config.tissue.mask_mpp)
        tiles = tile_slide(slide, contract, config.mask_dir, thumbnail=thumbnail)
        grids = cascade_tiles(tiles, contract.grid)
        features = [
            embed_patches(slide, g.coords, g.mpp, g.patch_size, encoder, batch_size=config.batch_size,
                          workers=config.workers, desc=f"{slide.slide_id} {group_name(g.magnification)}"
                          if progress else None)
            for g in grids
        ]
        qc_mpp = min(overview_mpp(slide.mpp, slide.dimensions), config.tissue.mask_mpp)
        if qc_mpp != config.tissue.mask_mpp:
            thumbnail = slide.thumbnail(qc_mpp)
        masks = contract.tissue.user_masks
        if masks is not None and tiles.mask_file is not None:
            masks = masks.model_copy(update={"file": tiles.mask_file.name, "sha256": file_sha256(tiles.mask_file)})
        contract = contract.model_copy(update={
            "slide": SlideSettings(mpp=slide.mpp, mpp_source=slide.mpp_source),
            "tissue": contract.tissue.model_copy(update={"user_masks": masks})})
        attrs = {"slide_id": slide.slide_id, "slide_path": slide.name, "slide_width": slide.dimensions[0],
                 "slide_height": slide.dimensions[1]}
    paths = output_paths(out_dir, slide.slide_id)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_png(paths["mask"], qc_image(thumbnail, tiles.mask, grids[:1], thumbnail_mpp=qc_mpp))
    write_geojson(paths["geojson"], tissue_geojson(tiles.mask))
    # The feature file goes last: its presence marks the slide as done.
    write_feature_file(paths["features"], contract, attrs, grids, features)
    return ";".join(f"{group_name(g.magnification)}:{len(g)}" for g in grids)


def check_config(config: PreprocessConfig) -> None:
    """Refuse settings no slide could be preprocessed with, before any work.

    Raises
    ------
    UsageError
    """
    try:
        lookup(config.encoder)
    except ZoompipeError as err:
        raise UsageError(str(err)) from None
    if config.weights is not None and not Path(config.weights).exists():
        raise UsageError(f"weights file or folder not found: {config.weights}")
    if config.children not in get_args(ChildrenPolicy):
        raise UsageError(f"children must be one of {', '.join(get_args(ChildrenPolicy))}, got {config.children!r}")
    if config.mask_dir is not None and not Path(config.mask_dir).is_dir():
        raise UsageError(f"mask folder not found: {config.mask_dir}")


EncoderSource = Callable[[], "tuple[Encoder, PipelineContract]"]


def preprocess_one(source: SlideSource, out_dir: Path, config: PreprocessConfig, encoder_source: EncoderSource,
                   mpp: float | None = None, overwrite: bool = False, wait: bool = True,
                   progress: bool = False) -> SlideStatus | None:
    """One slide of a batch, under its lock: skip it, preprocess it, or record why it failed.

    The status record is written before the lock is let go, so a run waiting for the slide finds
    it complete. Leftovers of a writer that died on this slide are removed first.

    Parameters
    ----------
    encoder_source : callable
        Returns the encoder and the run's contract (:func:`run_contract`); called only when the
        slide needs embedding, so a batch of finished slides never builds an encoder.
    wait : bool
        Wait for another process that holds the slide; otherwise return None at once.

    Returns
    -------
    SlideStatus or None
        None when another process holds the slide and ``wait`` is False.

    Raises
    ------
    ZoompipeError
        The encoder cannot be built: every slide would fail the same way.
    """
    slide_id = source.slide_id
    with slide_lock(out_dir, slide_id, wait) as held:
        if not held:
            return None
        paths = output_paths(out_dir, slide_id)
        if not overwrite and all(p.exists() for p in paths.values()):
            done = read_records(out_dir, [slide_id]).get(slide_id)
            row = SlideStatus(slide_id, source.name, "skipped", detail=done.detail if done else "")
        else:
            for p in paths.values():
                remove_leftovers(p)
            start = time.perf_counter()
            encoder, contract = encoder_source()
            try:
                patches = preprocess_slide(source, out_dir, config, encoder, contract, mpp=mpp, progress=progress)
                row = SlideStatus(slide_id, source.name, "ok", patches, time.perf_counter() - start)
            except Exception as err:  # one bad slide must not stop a batch
                row = SlideStatus(slide_id, source.name, "failed", seconds=time.perf_counter() - start,
                                  error=source.scrub(describe_failure(err, source)))
        write_record(out_dir, row)
    return row


def preprocess_slides(inputs: Sequence[str | Path], out_dir: str | Path, config: PreprocessConfig,
                      overwrite: bool = False, progress: bool = True,
                      cluster: str | ClusterSpec | Client | None = None) -> list[SlideStatus]:
    """Preprocess many slides, skipping finished ones and going on past failures.

    Slides that another run sharing ``out_dir`` is working on (see :mod:`zoompipe.locks`) are
    left for the end, then waited for: each slide is processed once, by one of the runs.

    Parameters
    ----------
    cluster : str, ClusterSpec or dask.distributed.Client, optional
        Run one task per slide on a Dask cluster (:func:`zoompipe.cluster.parse_cluster`); the
        workers write the outputs to ``out_dir``, which they must see at the same path.

    Returns
    -------
    list of SlideStatus
        One per input slide, in input order; ``status.csv`` holds these and earlier runs' records.

    Raises
    ------
    UsageError
        Bad settings or inputs (nothing is written then).
    """
    check_config(config)
    slides = find_slides(inputs)
    overrides = load_mpp_overrides(config.mpp_csv) if config.mpp_csv else {}
    out_dir = Path(out_dir)
    if cluster is not None:
        from .cluster import parse_cluster, preprocess_on_cluster

        cluster = parse_cluster(cluster) if isinstance(cluster, str) else cluster

        return preprocess_on_cluster(slides, out_dir, config, overrides, cluster, overwrite=overwrite,
                                     progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    built: list[tuple[Encoder, PipelineContract]] = []

    def encoder_source() -> tuple[Encoder, PipelineContract]:
        if not built:
            encoder = create_encoder(config.encoder, config.weights, config.device, config.precision,
                                     config.runtime)
            built.append((encoder, run_contract(config, encoder)))
        return built[0]

    results: dict[SlideSource, SlideStatus] = {}
    try:
        bar = tqdm(total=len(slides), desc="slides", unit="slide", disable=not progress)
        # First pass: every slide no one else holds; second pass: wait for the others.
        for wait in (False, True):
            for source in [s for s in slides if s not in results]:
                row = preprocess_one(source, out_dir, config, encoder_source,
                                     overrides.get(source.slide_id, config.mpp), overwrite=overwrite, wait=wait,
                                     progress=progress)
                if row is not None:
                    results[source] = row
                    bar.update()
        bar.close()
    finally:
        write_table(out_dir)
    return [results[p] for p in slides]
