"""``zoompipe predict`` and ``zoompipe heatmap``: raw slides to diagnoses and attention maps."""

from __future__ import annotations

from pathlib import Path

import click

from zoompipe.encoders.config import PRECISIONS

from .options import cluster_option, compute_options, mask_dir_option, slide_options


@click.command("predict")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option("--model", "run_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder of `zoompipe train` [default: the demo model shipped with zoompipe].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="predictions",
              help="Folder for <slide_id>.json, heatmaps, GeoJSON, status records and predictions.csv.")
@click.option("--heatmap", is_flag=True, help="Write attention heatmap PNGs.")
@click.option("--geojson", is_flag=True, help="Write the attended regions as GeoJSON (QuPath).")
@click.option("--profile", is_flag=True, help="Print seconds per stage and patches per magnification.")
@mask_dir_option
@compute_options
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; int8 (opt-in, CPU, needs nncf): "
                   "OpenVINO int8, faster, features not equal to fp32. The training features' "
                   "precision is reported (--profile, JSON), not imposed.")
@click.option("--encoder-weights", type=click.Path(exists=True), default=None,
              help="Encoder weights file or folder, when not the encoder's own or not in the Hugging Face cache; "
                   "they must be the weights the training features were made with (checked by SHA-256).")
@slide_options
@cluster_option
def predict_command(slides, run_dir, out_dir, heatmap, geojson, profile, mask_dir, device, runtime, precision,
                    encoder_weights, batch_size, workers, backend, mpp, mpp_csv, cluster) -> None:
    """Classify raw SLIDES, reading high magnifications only where the model zooms.

    SLIDES are files or URLs (https://..., s3://bucket/key): a URL is read with range requests,
    only where the model looks, and its bytes fetched are reported (--profile, JSON).

    Prints the predicted class and probabilities of every slide and writes OUT/<slide_id>.json
    (probabilities; per magnification the patches embedded, their level-0 boxes, attention and
    the ones zoomed into; timings), OUT/status/<slide_id>.json and OUT/predictions.csv, which
    grows slide by slide. A failing slide gets a one-line error and the others go on; the exit
    status is 1 if any slide failed.
    """
    from zoompipe.predict import demo_run_dir, predict_slides, profile_table
    from zoompipe.predictor_settings import PredictorSettings

    if run_dir is None:
        run_dir = demo_run_dir()
        click.echo(f"using the demo model ({run_dir}); it was trained on synthetic slides", err=True)
    settings = PredictorSettings(Path(run_dir), device=device, precision=precision, runtime=runtime,
                                 encoder_weights=encoder_weights, batch_size=batch_size, workers=workers,
                                 mask_dir=mask_dir)
    outcomes = predict_slides(slides, settings, out_dir, heatmap=heatmap, geojson=geojson, mpp=mpp,
                              mpp_csv=mpp_csv, backend=backend, progress=profile, cluster=cluster)
    for outcome in outcomes:
        p = outcome.prediction
        if p is None:
            click.echo(f"error: {outcome.error}", err=True)
            continue
        probabilities = ", ".join(f"{c} {v:.3f}" for c, v in zip(p.class_names, p.probabilities))
        click.echo(f"{p.slide_id}: {p.predicted}  ({probabilities})")
        if profile:
            click.echo(profile_table(p))
    if any(o.prediction is None for o in outcomes):
        raise SystemExit(1)


@click.command("heatmap")
@click.argument("prediction", type=click.Path(exists=True, dir_okay=False))
@click.argument("slide", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: beside PREDICTION].")
@click.option("--max-side", type=click.IntRange(min=16), default=2048,
              help="Longest side of the heatmap thumbnail in pixels.")
@mask_dir_option
def heatmap_command(prediction, slide, out_dir, max_side, mask_dir) -> None:
    """Redraw the heatmaps of a saved PREDICTION (<slide_id>.json of `zoompipe predict`) on SLIDE (file or URL)."""
    from zoompipe.predict import redraw_heatmaps

    for path in redraw_heatmaps(prediction, slide, out_dir or Path(prediction).parent, mask_dir=mask_dir,
                                max_side=max_side):
        click.echo(str(path))
