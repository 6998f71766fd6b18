"""``zoompipe evaluate``: metrics of a trained run on labelled feature files."""
from __future__ import annotations

import json

import click


@click.command("evaluate")
@click.option("--model", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder written by 'zoompipe train'.")
@click.option("--features", "features_dir", required=True,
              type=click.Path(exists=True, file_okay=False), help="Folder of <slide_id>.h5 feature files.")
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV slide_id,label.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Only the slides of this split of the run's splits.csv.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
def evaluate_command(run_dir, features_dir, labels_csv, out_dir, split, device) -> None:
    """Accuracy, weighted F1, macro one-vs-rest AUC and confusion matrix of a run.

    Writes OUT/predictions.csv (slide_id,label,pred,p_<class>...) and OUT/metrics.json.
    """
    from zoompipe.evaluate import evaluate_run

    metrics = evaluate_run(run_dir, features_dir, labels_csv, out_dir, split=split, device=device)
    click.echo(json.dumps(metrics, indent=2))
