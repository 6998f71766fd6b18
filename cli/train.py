"""``zoompipe train``: fit a MIL model (ZoomMIL by default) on feature files."""
from __future__ import annotations

import json
from pathlib import Path

import click

from zoompipe.encoders.config import PRECISIONS
from zoompipe.train_defaults import (
    DEFAULT_CHILDREN_PER_PARENT,
    DEFAULT_EMA_EPOCHS,
    DEFAULT_K,
    DEFAULT_LEVEL_DROPOUT,
    DEFAULT_LR_PATIENCE,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_SELECTION,
    DEFAULT_SIGMA,
    DEFAULT_SIGMA_END,
    DEFAULT_TAUGHT_ATTENTION_TARGET_WEIGHT,
    DEFAULT_TEACHER_INSTANCE_WEIGHT,
    DEFAULT_TEACHER_TARGET,
    DEFAULT_WARMUP,
    DEFAULT_ZOOM_TARGET_SUM,
    DEFAULT_ZOOM_TARGET_WEIGHT,
    SELECTIONS,
    TEACHER_TARGETS,
)

from .options import mask_dir_option, parse_magnifications


def _check_k(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value >= 1 and not value.is_integer():
        raise click.BadParameter(f"{value:g} is neither a whole count nor a fraction in (0, 1)")
    return value


@click.command("train")
@click.option("--features", "features_dir", required=True,
              type=click.Path(exists=True, file_okay=False), help="Folder of <slide_id>.h5 feature files.")
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV slide_id,label.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--splits", "splits_csv", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV slide_id,split (train/val/test) [default: a 5-fold split, stratified by class, "
                   "grouped by the labels' optional patient_id column].")
@click.option("--fold", type=int, default=None, help="Test fold of the generated split [default: 0].")
@click.option("--architecture", default="zoommil",
              help="Model: zoommil, or a baseline on one magnification: abmil, clam_sb, clam_mb, transmil.")
@click.option("--magnifications", callback=parse_magnifications, default=None,
              help="Cascade to train on, e.g. 1.25,2.5,10 [default: the files' cascade for zoommil, "
                   "their highest magnification for the baselines].")
@click.option("--k", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_K, callback=_check_k,
              help="Patches to zoom into per step: a count >= 1, or a fraction in (0, 1) of each "
                   "slide's base bag (0.125 = N/8; capped at the bag, at least 1).")
@click.option("--hidden", type=int, default=512, help="Width of the projected patch features.")
@click.option("--attn-hidden", type=int, default=256, help="Hidden width of the gated-attention heads.")
@click.option("--sigma", type=float, default=DEFAULT_SIGMA,
              help="Perturbed top-K noise on [0, 1]-scaled scores at the first epoch: how far training tries "
                   "patches beyond the current top K. 0.5 found a few signal patches among thousands that 0.05 "
                   "missed, but lost lesions on the zoom benchmark (README); validate before raising it.")
@click.option("--sigma-end", type=float, default=DEFAULT_SIGMA_END, help="The noise at the last epoch (linear decay).")
@click.option("--zoom-target-weight", type=click.FloatRange(min=0), default=DEFAULT_ZOOM_TARGET_WEIGHT,
              help="Weight of the zoom heads' target from the dense last magnification; 0 trains "
                   "them through the perturbed top-K alone.")
@click.option("--level-dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=DEFAULT_LEVEL_DROPOUT,
              help="ZoomMIL: chance of dropping each lower magnification's pooled vector from the classifier's sum "
                   "in a training step, so that the low magnifications cannot memorise the slides; 0: the paper's.")
@click.option("--zoom-target-sum/--zoom-target-alone", default=DEFAULT_ZOOM_TARGET_SUM,
              help="ZoomMIL: the zoom target's teacher classifies the dense last-magnification vector added to the "
                   "lower magnifications' (as at prediction), or alone (as ABMIL at that magnification).")
@click.option("--selection", type=click.Choice(SELECTIONS), default=DEFAULT_SELECTION, show_default=True,
              help="ZoomMIL: how training builds the bag above a zoom head. soft: the paper's rows that mix the "
                   "children of several parents; straight_through: the real children of the K likeliest patches, "
                   "as at prediction, with the gradient of the soft selection.")
@click.option("--teacher-instance-weight", type=click.FloatRange(min=0), default=DEFAULT_TEACHER_INSTANCE_WEIGHT,
              show_default=True,
              help="ZoomMIL: weight of CLAM's instance loss on the zoom target's teacher (its most and least "
                   "attended 10x patches pseudo-labelled); 0 turns it off.")
@click.option("--teacher", "teacher", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="ZoomMIL: a trained ABMIL run on the last magnification (zoompipe train --architecture abmil "
                   "--magnifications 10, same --hidden, --attn-hidden, classes and features): the zoom heads follow "
                   "its target over each slide's dense last-magnification bag (--teacher-target), and its weights "
                   "start the last level and the classifier; no warm-up. Dense features only. [default: the model's "
                   "own last head teaches]")
@click.option("--teacher-target", type=click.Choice(TEACHER_TARGETS), default=None,
              help="What the zoom heads follow. attention: the teacher's attention; evidence: each patch's class "
                   "evidence against the bag's mean patch, which marks the evidence of every class even where the "
                   "teacher's attention decides a class by what is missing; own-evidence: that evidence from the "
                   "model's own last level, which starts from the teacher's weights and goes on learning on the "
                   "dense bag (the attention pull follows the teacher's evidence). Without --teacher the zoom heads "
                   "follow the model's own last head: its attention, or with own-evidence its evidence. "
                   f"[default: {DEFAULT_TEACHER_TARGET} with --teacher, the attention without]")
@click.option("--attention-target-weight", type=click.FloatRange(min=0), default=None,
              help="With --teacher: weight of a pull of the last magnification's attention towards the teacher's "
                   "target, so that the attention heatmaps show sits on the evidence of every class; 0: the slide "
                   f"label alone trains it. [default: {DEFAULT_TAUGHT_ATTENTION_TARGET_WEIGHT:g} with --teacher, "
                   "0 without]")
@click.option("--children-per-parent", type=click.IntRange(min=0), default=DEFAULT_CHILDREN_PER_PARENT,
              show_default=True,
              help="ZoomMIL: at most this many of each zoom step's K patches among the children of one parent; "
                   "1 spreads the K over K parents; 0: no limit (the paper's top-K).")
@click.option("--max-grad-norm", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_GRAD_NORM,
              help="Clip each step's gradient norm to this value.")
@click.option("--warmup", type=click.FloatRange(min=0, max=1, max_open=True), default=DEFAULT_WARMUP,
              show_default=True,
              help="ZoomMIL: this fraction of --epochs trains the zoom target alone (the dense last-magnification "
                   "teacher and the zoom heads following its attention) before the zoomed bags' classification "
                   "joins; 0: both from the first epoch. None with --teacher, whose attention is learnt already.")
@click.option("--ema-epochs", type=click.FloatRange(min=0), default=DEFAULT_EMA_EPOCHS, show_default=True,
              help="Validate, and keep as the checkpoint, an exponential moving average of the weights over about "
                   "this many epochs; 0: the weights of each epoch's last step.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, help="Maximum epochs.")
@click.option("--lr", type=float, default=1e-4, help="Adam learning rate.")
@click.option("--lr-patience", type=click.IntRange(min=0), default=DEFAULT_LR_PATIENCE, show_default=True,
              help="Epochs without a lower validation loss before the learning rate is multiplied by 0.8; "
                   "0 keeps it constant.")
@click.option("--weight-decay", type=float, default=0.0, help="Adam weight decay.")
@click.option("--seed", type=int, default=0, help="Seed of the initialisation, sampling and noise.")
@click.option("--split-seed", type=int, default=0, help="Seed of the generated split.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
@click.option("--patience", type=int, default=None, help="Stop after this many epochs without a better val F1.")
@click.option("--cache/--no-cache", default=True, help="Keep feature bags in memory between epochs.")
@click.option("--sparse", is_flag=True,
              help="ZoomMIL from base features only (preprocess --magnifications 1.25): the children each step "
                   "and validation need are embedded from the raw slides and cached.")
@click.option("--slides", "slides", multiple=True, type=click.Path(),
              help="With --sparse: slide files, folders or CSVs with slide_path [default: the path each feature "
                   "file records]. Repeatable.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="With --sparse: folder of per-slide feature caches, shareable between runs [default: OUT/feature_cache].")
@click.option("--encoder-weights", type=click.Path(exists=True), default=None,
              help="With --sparse: the encoder weights the base features were made with, where they do not ship with zoompipe.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              help="With --sparse: precision of the children embedded; auto: that of the base features.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "openvino"]), default="auto",
              help="With --sparse: encoder runtime; auto: OpenVINO for fp32 on CPU, torch otherwise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="With --sparse: patches per encoder batch.")
@click.option("--workers", type=click.IntRange(min=1), default=2, help="With --sparse: patch reader threads.")
@click.option("--lookahead", type=click.IntRange(min=0), default=0,
              help="With --sparse: training slides whose children are embedded ahead, in the background, while the "
                   "model trains on the current one; 0: none. The model trained is the same. Worth it where the "
                   "embedding runs beside the training (--cluster, a GPU), not on a small CPU.")
@click.option("--explore-budget", type=float, default=None, metavar="F",
              help="With --sparse: at most this fraction of each training slide's base patches (and at least K) ever "
                   "has its children embedded: the first of a tissue-weighted greedy cover of the slide's base "
                   "features, chosen before training; the zoom chooses among those. [default: no limit]")
@click.option("--cluster", default=None, metavar="SPEC",
              help="With --sparse: embed the children on Dask workers: local:N (N worker processes; local:NxT for T "
                   "threads each), tcp://HOST:8786 or a scheduler file (workers that see the slides at the same path). "
                   "[default: this process]")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default="auto",
              help="With --sparse: slide library.")
@mask_dir_option
@click.option("--resume", is_flag=True,
              help="Go on from the last finished epoch of a stopped run in OUT (same settings and split), to the "
                   "model an unstopped run gives; its state is kept in OUT/resume/ after every epoch.")
def train_command(features_dir, labels_csv, out_dir, splits_csv, fold, architecture, magnifications, k, hidden,
                  attn_hidden, sigma, sigma_end, zoom_target_weight, level_dropout, zoom_target_sum, selection,
                  teacher_instance_weight, teacher, teacher_target, attention_target_weight, children_per_parent, max_grad_norm,
                  warmup, ema_epochs, epochs, lr, lr_patience, weight_decay, seed,
                  split_seed, device, patience, cache, sparse, slides, cache_dir, encoder_weights, precision, runtime,
                  batch_size, workers, lookahead, explore_budget, cluster, backend, mask_dir, resume) -> None:
    """Train a model; keep the epoch with the best validation weighted F1.

    Writes OUT/model.safetensors and OUT/config.json (best epoch; architecture, hyper-parameters,
    classes and the pipeline contract every training file agrees on), OUT/splits.csv, OUT/log.csv
    and OUT/train_summary.json; while it runs, OUT/resume/ (for --resume). With --sparse, also OUT/feature_cache/<slide_id>.h5 (the children
    embedded, readable as feature files) and the patches embedded per magnification and epoch
    against the dense count (log.csv column embedded, train_summary.json key sparse).
    """
    from zoompipe.sparse import SparseSettings
    from zoompipe.train import train_model

    settings = SparseSettings(slides=list(slides) or None, cache_dir=cache_dir, weights=encoder_weights,
                              precision=precision, runtime=runtime, batch_size=batch_size, workers=workers,
                              lookahead=lookahead, explore_budget=explore_budget, cluster=cluster, backend=backend, mask_dir=mask_dir) if sparse else None

    summary = train_model(features_dir, labels_csv, out_dir, architecture=architecture, splits_csv=splits_csv,
                          fold=fold,
                          magnifications=magnifications, k=k, hidden=hidden,
                          attn_hidden=attn_hidden, sigma=sigma, sigma_end=sigma_end,
                          zoom_target_weight=zoom_target_weight, level_dropout=level_dropout,
                          zoom_target_sum=zoom_target_sum, selection=selection,
                          teacher_instance_weight=teacher_instance_weight, teacher=teacher,
                          teacher_target=teacher_target, attention_target_weight=attention_target_weight,
                          children_per_parent=children_per_parent, max_grad_norm=max_grad_norm, warmup=warmup,
                          ema_epochs=ema_epochs, epochs=epochs, lr=lr, lr_patience=lr_patience, weight_decay=weight_decay, seed=seed,
                          split_seed=split_seed, device=device, patience=patience,
                          cache=cache, sparse=settings, resume=resume)
    click.echo(json.dumps(summary, indent=2))
