"""``zoompipe train``: fit ZoomMIL on feature files."""
from __future__ import annotations

import json

import click

from .options import parse_magnifications


@click.command("train")
@click.option("--features", "features_dir", required=True,
              type=click.Path(exists=True, file_okay=False), help="Folder of <slide_id>.h5 feature files.")
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV slide_id,label.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--splits", "splits_csv", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV slide_id,split (train/val/test) [default: seeded stratified 5-fold split].")
@click.option("--fold", type=int, default=None, help="Test fold of the generated split [default: 0].")
@click.option("--magnifications", callback=parse_magnifications, default=None,
              help="Cascade to train on, e.g. 1.25,2.5,10; one value trains ABMIL [default: the files'].")
@click.option("--k", type=int, default=12, help="Patches to zoom into per step (capped at the bag size).")
@click.option("--hidden", type=int, default=512, help="Width of the projected patch features.")
@click.option("--attn-hidden", type=int, default=256, help="Hidden width of the gated-attention heads.")
@click.option("--sigma", type=float, default=0.05, help="Perturbed top-K noise on [0, 1]-scaled scores.")
@click.option("--epochs", type=int, default=100, help="Maximum epochs.")
@click.option("--lr", type=float, default=1e-4, help="Adam learning rate.")
@click.option("--weight-decay", type=float, default=0.0, help="Adam weight decay.")
@click.option("--seed", type=int, default=0, help="Seed of the split, initialisation, sampling and noise.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
@click.option("--patience", type=int, default=None, help="Stop after this many epochs without a better val F1.")
@click.option("--cache/--no-cache", default=True, help="Keep feature bags in memory between epochs.")
def train_command(features_dir, labels_csv, out_dir, splits_csv, fold, magnifications, k, hidden, attn_hidden, sigma, epochs, lr,
                  weight_decay, seed, device, patience, cache) -> None:
    """Train ZoomMIL; keep the epoch with the best validation weighted F1.

    Writes OUT/model.safetensors and OUT/config.json (best epoch), OUT/splits.csv, OUT/log.csv and
    OUT/train_summary.json.
    """
    from zoompipe.train import train_model

    summary = train_model(features_dir, labels_csv, out_dir, splits_csv=splits_csv, fold=fold,
                          magnifications=magnifications, k=k, hidden=hidden,
                          attn_hidden=attn_hidden, sigma=sigma, epochs=epochs, lr=lr,
                          weight_decay=weight_decay, seed=seed, device=device, patience=patience,
                          cache=cache)
    click.echo(json.dumps(summary, indent=2))
