"""``zoompipe predict``: many slides through the zooming engine, with their outputs.

Per slide: ``<slide_id>.json`` (the :class:`~zoompipe.engine.Prediction`), optionally heatmap
PNGs and a GeoJSON of the attended regions, and a status record (:mod:`zoompipe.run_status`);
for the batch, ``predictions.csv``, rewritten after every slide so that a crash keeps what was
done, and ``status.csv``. A failing slide, whatever the error, is reported in one line and the
others go on.
"""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .atomic import atomic_path, write_text
from .errors import CheckpointError, UsageError, ZoompipeError, describe_failure, one_line
from .heatmap import MAX_SIDE, write_heatmaps
from .prediction import Prediction
from .predictor_settings import PredictorSettings
from .qc import write_geojson
from .run_config import predict_contract, read_run_config
from .run_status import SlideStatus, check_unique_ids, write_record, write_table
from .slide import Slide, SlideSource, load_mpp_overrides, open_slide, slide_source
from .tiling import SlideTiles, check_mask_dir, tile_slide

if TYPE_CHECKING:  # the engine loads torch; saved predictions and heatmaps do without it
    from distributed import Client

    from .cluster import ClusterSpec
    from .engine import ZoomPredictor
    from .tissue import TissueMask

DEMO_MODEL = "demo_model"


def demo_run_dir() -> Path:
    """The small demo run that ships inside the package (trained on synthetic slides)."""
    path = Path(str(resources.files("zoompipe") / DEMO_MODEL))
    if not (path / "config.json").exists():
        raise CheckpointError("no --model given and the demo model is not installed with this zoompipe")
    return path


def regions_geojson(prediction: Prediction) -> dict:
    """Every attended patch as a QuPath annotation, with its magnification, attention and selection."""
    features = []
    for report in prediction.magnifications:
        chosen = set(report.selected.tolist())
        for index, ((x0, y0, x1, y1), attention) in enumerate(zip(report.boxes.tolist(), report.attention)):
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": f"{report.magnification:g}x"},
                    "magnification": report.magnification,
                    "attention": float(attention),
                    "zoomed": index in chosen,
                },
            })
    return {"type": "FeatureCollection", "features": features}


def read_prediction(path: str | Path) -> Prediction:
    """Load a prediction JSON written by ``zoompipe predict``."""
    try:
        return Prediction.from_dict(json.loads(Path(path).read_text()), path)
    except ZoompipeError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ZoompipeError(f"{path}: not a zoompipe prediction ({one_line(err)})") from None


def redraw_heatmaps(prediction_path: str | Path, slide_path: str | Path | SlideSource, out_dir: str | Path,
                    mask_dir: str | Path | None = None, max_side: int = MAX_SIDE) -> list[Path]:
    """Heatmaps of a saved prediction, on the tissue of the slide as the prediction's contract makes it."""
    prediction = read_prediction(prediction_path)
    with open_slide(slide_path, mpp=prediction.slide_mpp) as slide:
        mask = tile_slide(slide, prediction.pipeline, mask_dir).mask
        return write_heatmaps(prediction, slide, mask, out_dir, max_side=max_side)


class BackgroundPredictor:
    """A :class:`~zoompipe.engine.ZoomPredictor` that loads in a background thread.

    Loading does not need the slide (importing torch, the model, the encoder's compiled graph:
    about 2 s of a cold ``zoompipe predict`` on a 2-core CPU), and a slide's tissue and base grid
    do not need the model, only the run's ``config.json``: the first slide's tissue
    segmentation runs while the predictor loads. It predicts as the predictor it wraps.

    Raises
    ------
    CheckpointError, UsageError
        At once, for what ``config.json`` says is wrong (a missing run, features made without
        zoompipe, mask folders that do not match); the rest of the run folder, at the first
        prediction.
    """

    def __init__(self, settings: PredictorSettings) -> None:
        self.settings = settings
        config = read_run_config(settings.run_dir)
        self.pipeline = predict_contract(config, settings.run_dir)
        check_mask_dir(self.pipeline, settings.mask_dir)
        self.class_names = list(config.class_names)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoompipe-load")
        self._loading = pool.submit(settings.build)
        pool.shutdown(wait=False)

    @property
    def predictor(self) -> ZoomPredictor:
        """The loaded predictor, once it is loaded."""
        return self._loading.result()

    def predict_slide(self, slide: Slide, progress: bool = False,
                      tiles: SlideTiles | None = None) -> tuple[Prediction, TissueMask]:
        """As :meth:`zoompipe.engine.ZoomPredictor.predict_slide`; the tissue is found while the predictor loads."""
        start = time.perf_counter()
        if tiles is None:
            tiles = tile_slide(slide, self.pipeline, self.settings.mask_dir)
        seconds = time.perf_counter() - start
        return self.predictor.predict_slide(slide, progress=progress, tiles=tiles, tissue_seconds=seconds)


@dataclass
class PredictOutcome:
    """One slide of a batch: its prediction, or the one-line reason it failed."""

    source: SlideSource
    prediction: Prediction | None = None
    error: str = ""


def predict_one(source: SlideSource, predictor: ZoomPredictor | BackgroundPredictor, out: Path | None,
                heatmap: bool = False, geojson: bool = False, mpp: float | None = None, backend: str = "auto",
                progress: bool = False) -> PredictOutcome:
    """One slide of a batch: its prediction and outputs, or the one-line reason it failed.

    With ``out``, the slide's files and its status record are written there.

    Raises
    ------
    CheckpointError, UsageError
        The run, not the slide, is wrong: every slide would fail the same way.
    """
    start = time.perf_counter()
    try:
        outcome = PredictOutcome(source, _predict_one(source, predictor, out, heatmap, geojson, mpp, backend,
                                                      progress))
    except (CheckpointError, UsageError):
        raise
    except Exception as err:  # one bad slide must not stop a batch
        outcome = PredictOutcome(source, error=source.scrub(describe_failure(err, source)))
    if out is not None:
        p = outcome.prediction
        write_record(out, SlideStatus(source.slide_id, source.name, "ok" if p else "failed",
                                      p.predicted if p else "", time.perf_counter() - start, outcome.error))
    return outcome


def predict_slides(paths: Sequence[str | Path | SlideSource],
                   predictor: ZoomPredictor | BackgroundPredictor | PredictorSettings,
                   out_dir: str | Path | None = None,
                   heatmap: bool = False, geojson: bool = False, mpp: float | None = None,
                   mpp_csv: str | None = None, backend: str = "auto", progress: bool = False,
                   cluster: str | ClusterSpec | Client | None = None) -> list[PredictOutcome]:
    """Predict every slide, writing its outputs to ``out_dir`` when given; go on past failures.

    ``paths`` are files or URLs (:func:`~zoompipe.slide.open_slide`).

    Parameters
    ----------
    predictor : ZoomPredictor, BackgroundPredictor or PredictorSettings
        Settings give a :class:`BackgroundPredictor`: the first slide's tissue is segmented
        while the model loads.
    cluster : str, ClusterSpec or dask.distributed.Client, optional
        Run one task per slide on a Dask cluster (:func:`zoompipe.cluster.parse_cluster`). Each
        worker process builds its own predictor from ``predictor.settings`` once and keeps it,
        and writes the slide's outputs to ``out_dir`` (required then), which it must see at the
        same path.

    Raises
    ------
    UsageError
        Two slides with the same id, an unreadable mpp table (before any slide is read), or a
        cluster run without ``out_dir``.
    CheckpointError
        A run folder that cannot predict: it concerns every slide, so the batch stops.
    """
    sources = [slide_source(p) for p in paths]
    check_unique_ids(sources)
    overrides = load_mpp_overrides(mpp_csv) if mpp_csv else {}
    out = Path(out_dir) if out_dir is not None else None
    if cluster is not None:
        if out is None:
            raise UsageError("a cluster run writes its outputs to a shared folder: give out_dir (--out)")
        from .cluster import parse_cluster, predict_on_cluster

        cluster = parse_cluster(cluster) if isinstance(cluster, str) else cluster
        settings = predictor if isinstance(predictor, PredictorSettings) else predictor.settings
        class_names = (read_run_config(settings.run_dir).class_names if isinstance(predictor, PredictorSettings)
                       else predictor.class_names)
        return predict_on_cluster(sources, settings, out, heatmap=heatmap, geojson=geojson, mpp=mpp,
                                  overrides=overrides, backend=backend, class_names=class_names,
                                  cluster=cluster, progress=progress)
    if isinstance(predictor, PredictorSettings):
        predictor = BackgroundPredictor(predictor)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    outcomes: list[PredictOutcome] = []
    try:
        for source in sources:
            outcomes.append(predict_one(source, predictor, out, heatmap, geojson,
                                        overrides.get(source.slide_id, mpp), backend, progress))
            if out is not None:
                write_predictions_csv(out / "predictions.csv", outcomes, predictor.class_names)
    finally:
        if out is not None:
            write_table(out)
    return outcomes


def _predict_one(source: SlideSource, predictor: ZoomPredictor | BackgroundPredictor, out: Path | None,
                 heatmap: bool, geojson: bool, mpp: float | None, backend: str, progress: bool) -> Prediction:
    with open_slide(source, backend=backend, mpp=mpp) as slide:
        prediction, mask = predictor.predict_slide(slide, progress=progress)
        if out is not None:
            write_text(out / f"{prediction.slide_id}.json", json.dumps(prediction.to_dict(), indent=1) + "\n")
            if geojson:
                write_geojson(out / f"{prediction.slide_id}_regions.geojson", regions_geojson(prediction))
            if heatmap:
                write_heatmaps(prediction, slide, mask, out)
    return prediction


def write_predictions_csv(path: Path, outcomes: Sequence[PredictOutcome], class_names: Sequence[str]) -> None:
    """One row per slide so far, ``ok`` with its probabilities or ``failed`` with the reason."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "path", "status", "predicted", *(f"p_{c}" for c in class_names),
                         "patches_embedded", "seconds", "error"])
        for o in outcomes:
            p = o.prediction
            if p is None:
                writer.writerow([o.source.slide_id, o.source.name, "failed", "", *([""] * len(class_names)), "", "",
                                 o.error])
            else:
                writer.writerow([p.slide_id, o.source.name, "ok", p.predicted, *(f"{v:.6f}" for v in p.probabilities),
                                 p.patches_embedded, f"{p.timings.get('total', 0):.3f}", ""])


def profile_table(prediction: Prediction) -> str:
    """Seconds per stage and patches per magnification, against a full read of the top magnification."""
    used = prediction.encoder
    lines = [f"encoder {used.get('name')}: {used.get('precision')} on {used.get('runtime')} "
             f"(training features: {used.get('training_precision') or 'not recorded'})",
             f"{'stage':<16}{'seconds':>10}{'patches':>10}"]
    lines.append(f"{'tissue + grid':<16}{prediction.timings.get('tissue', 0):>10.3f}{'':>10}")
    for report in prediction.magnifications:
        lines.append(f"{'embed ' + format(report.magnification, 'g') + 'x':<16}{report.seconds:>10.3f}"
                     f"{report.patches_embedded:>10}")
    lines.append(f"{'model':<16}{prediction.timings.get('model', 0):>10.3f}{'':>10}")
    lines.append(f"{'total':<16}{prediction.timings.get('total', 0):>10.3f}{prediction.patches_embedded:>10}")
    top = prediction.magnifications[-1].magnification
    ratio = prediction.full_read_patches / max(prediction.patches_embedded, 1)
    lines.append(f"a full read at {top:g}x would embed {prediction.full_read_patches} patches "
                 f"({ratio:.1f}x the patches embedded here)")
    if prediction.transfer is not None:
        lines.append(f"remote slide: {prediction.transfer.describe()}")
    return "\n".join(lines)
