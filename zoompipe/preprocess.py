"""``zoompipe preprocess``: slides -> tissue -> patch grids -> features, one file set per slide.

For every slide it writes, each file under a temporary name renamed when complete:

- ``features/<slide_id>.h5``: the cascade of grids and their features (:mod:`zoompipe.features`);
- ``masks/<slide_id>.png``: thumbnail with tissue contours and the base patch grid, to check;
- ``geojson/<slide_id>.geojson``: tissue polygons in level-0 pixels (opens in QuPath);
- ``status.csv``: one row per slide ever processed into this folder.

A slide whose three files exist is skipped; a failing slide is recorded and the run goes on.
"""

from __future__ import annotations

import csv
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from .atomic import atomic_path
from .embed import embed_patches
from .encoders import DEFAULT_ENCODER, Encoder, create_encoder
from .errors import SlideError, ZoompipeError
from .features import group_name, write_feature_file
from .grid import build_cascade
from .qc import overview_mpp, qc_image, tissue_geojson, write_geojson, write_png
from .slide import Slide, load_mpp_overrides, open_slide
from .tissue import TissueMask, TissueParams, mask_from_geojson, mask_from_png, tissue_mask

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                    ".qptiff", ".dcm")
STATUS_FIELDS = ("slide_id", "path", "status", "patches", "seconds", "error")


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


@dataclass
class SlideStatus:
    """One row of ``status.csv``."""

    slide_id: str
    path: str
    status: str  # ok | failed | skipped
    patches: str = ""
    seconds: float = 0.0
    error: str = ""


def find_slides(inputs: Iterable[str | Path]) -> list[Path]:
    """Slides named by files, folders (searched recursively by extension) or CSVs with ``slide_path``.

    Raises
    ------
    ZoompipeError
        An input that does not exist, or a CSV without a ``slide_path`` column.
    """
    slides: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            slides += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
        elif item.suffix.lower() == ".csv":
            with item.open(newline="") as handle:
                reader = csv.DictReader(handle)
                if "slide_path" not in (reader.fieldnames or []):
                    raise ZoompipeError(f"{item}: a slide list needs a slide_path column")
                slides += [Path(row["slide_path"]) for row in reader]
        elif item.exists():
            slides.append(item)
        else:
            raise ZoompipeError(f"{item}: no such file or folder")
    return slides


def output_paths(out_dir: Path, slide_id: str) -> dict[str, Path]:
    """Where the files of one slide go."""
    return {
        "features": out_dir / "features" / f"{slide_id}.h5",
        "mask": out_dir / "masks" / f"{slide_id}.png",
        "geojson": out_dir / "geojson" / f"{slide_id}.geojson",
    }


def preprocess_slide(path: Path, out_dir: Path, config: PreprocessConfig, encoder: Encoder,
                     mpp: float | None = None, progress: bool = False) -> str:
    """Segment, tile and embed one slide; write its three files. Returns the patch counts."""
    with open_slide(path, backend=config.backend, mpp=mpp) as slide:
        thumbnail = slide.thumbnail(config.tissue.mask_mpp)
        drawn = _user_mask(Path(config.mask_dir), slide, config.tissue.mask_mpp) if config.mask_dir else None
        mask = drawn if drawn is not None else tissue_mask(slide, config.tissue, thumbnail=thumbnail)
        grids = build_cascade(mask, slide.mpp, config.magnifications, patch_size=config.patch_size,
                              min_tissue=config.min_tissue)
        features = [
            embed_patches(slide, g.coords, g.mpp, g.patch_size, encoder, batch_size=config.batch_size,
                          workers=config.workers, desc=f"{slide.slide_id} {group_name(g.magnification)}"
                          if progress else None)
            for g in grids
        ]
        qc_mpp = min(overview_mpp(slide.mpp, slide.dimensions), config.tissue.mask_mpp)
        if qc_mpp != config.tissue.mask_mpp:
            thumbnail = slide.thumbnail(qc_mpp)
        attrs = {
            "slide_id": slide.slide_id, "slide_path": str(path), "slide_mpp": slide.mpp,
            "slide_mpp_source": slide.mpp_source, "slide_width": slide.dimensions[0],
            "slide_height": slide.dimensions[1], "encoder": encoder.name, "feature_dim": encoder.feature_dim,
            "encoder_precision": encoder.precision, "patch_size": config.patch_size,
            "min_tissue": config.min_tissue, "tissue": asdict(config.tissue),
        }
    paths = output_paths(out_dir, slide.slide_id)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_png(paths["mask"], qc_image(thumbnail, mask, grids[:1], thumbnail_mpp=qc_mpp))
    write_geojson(paths["geojson"], tissue_geojson(mask))
    # The feature file goes last: its presence marks the slide as done.
    write_feature_file(paths["features"], attrs, grids, features)
    return ";".join(f"{group_name(g.magnification)}:{len(g)}" for g in grids)


def _user_mask(folder: Path, slide: Slide, mask_mpp: float) -> TissueMask | None:
    """``<slide_id>.geojson`` (QuPath export) or ``<slide_id>.png`` from ``folder``, if either exists."""
    for suffix, reader in ((".geojson", mask_from_geojson), (".png", mask_from_png)):
        path = folder / f"{slide.slide_id}{suffix}"
        if path.exists():
            return reader(path, slide, mask_mpp)
    return None


def read_status(out_dir: Path) -> dict[str, SlideStatus]:
    path = out_dir / "status.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        return {row["slide_id"]: SlideStatus(**{**row, "seconds": float(row["seconds"] or 0)})
                for row in csv.DictReader(handle)}


def write_status(out_dir: Path, rows: dict[str, SlideStatus]) -> None:
    with atomic_path(out_dir / "status.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=STATUS_FIELDS)
        writer.writeheader()
        for row in rows.values():
            writer.writerow({**asdict(row), "seconds": f"{row.seconds:.2f}"})


def preprocess_slides(inputs: Sequence[str | Path], out_dir: str | Path, config: PreprocessConfig,
                      overwrite: bool = False, progress: bool = True) -> list[SlideStatus]:
    """Preprocess many slides, skipping finished ones and going on past failures.

    Returns
    -------
    list of SlideStatus
        One per input slide, in input order; ``status.csv`` holds these and earlier runs' rows.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = find_slides(inputs)
    overrides = load_mpp_overrides(config.mpp_csv) if config.mpp_csv else {}
    table = read_status(out_dir)
    encoder: Encoder | None = None
    results: list[SlideStatus] = []
    seen: set[str] = set()
    for path in tqdm(slides, desc="slides", unit="slide", disable=not progress):
        slide_id = path.stem
        if slide_id in seen:
            row = SlideStatus(slide_id, str(path), "failed", error=f"{path}: another slide in this run has the id {slide_id}")
            results.append(row)
            continue
        seen.add(slide_id)
        paths = output_paths(out_dir, slide_id)
        if not overwrite and all(p.exists() for p in paths.values()):
            row = SlideStatus(slide_id, str(path), "skipped", patches=table.get(slide_id, SlideStatus("", "", "")).patches)
        else:
            start = time.perf_counter()
            try:
                encoder = encoder or create_encoder(config.encoder, config.weights, config.device, config.precision,
                                                   config.runtime)
                patches = preprocess_slide(path, out_dir, config, encoder,
                                           mpp=overrides.get(slide_id, config.mpp), progress=progress)
                row = SlideStatus(slide_id, str(path), "ok", patches, time.perf_counter() - start)
            except ZoompipeError as err:
                if not isinstance(err, SlideError) and encoder is None:
                    raise  # a bad encoder setting fails every slide: stop at once
                row = SlideStatus(slide_id, str(path), "failed", seconds=time.perf_counter() - start, error=str(err))
            except Exception as err:  # one bad slide must not stop a batch
                row = SlideStatus(slide_id, str(path), "failed", seconds=time.perf_counter() - start,
                                  error=f"internal error: {type(err).__name__}: {' '.join(str(err).split())} "
                                        f"at {traceback.extract_tb(err.__traceback__)[-1].name}")
        table[slide_id] = row
        write_status(out_dir, table)
        results.append(row)
    return results
