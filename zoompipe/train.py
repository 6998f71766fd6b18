"""Train a registered MIL model (ZoomMIL by default) on precomputed feature files."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import WeightedRandomSampler
from tqdm import tqdm

from zoompipe.atomic import write_text
from zoompipe.contract import PipelineContract, file_sha256
from zoompipe.dataset import (
    SlideDataset,
    agreed_contract,
    feature_path,
    file_magnifications,
    make_splits,
    read_labels,
    read_patients,
    read_splits,
    write_splits,
)
from zoompipe.errors import UsageError, ZoompipeError
from zoompipe.evaluate import Slide, on_device, predict_logits
from zoompipe.metrics import classification_metrics
from zoompipe.model import config_fields, create_model, model_class, save_run
from zoompipe.resume import Best, TrainingState, clear_state, fingerprint, load_state, save_state
from zoompipe.run_config import WEIGHTS_NAME
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
)

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

    from zoompipe.sparse import SparseDataset, SparseSettings

LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "val_f1", "lr", "sigma")


def sigma_schedule(epoch: int, epochs: int, start: float, end: float) -> float:
    """Perturbed top-K noise for ``epoch`` (1-based): linear from ``start`` to ``end``.

    Cordonnier et al. decay the noise so that training, soft and exploring at first, ends
    close to the hard top-K that prediction uses.
    """
    if epochs <= 1:
        return end
    return start + (end - start) * (epoch - 1) / (epochs - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def balanced_sampler(labels: Sequence[int], seed: int) -> WeightedRandomSampler:
    """Sampler that draws every class equally often, with replacement, one epoch's worth."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[np.asarray(labels)]
    return WeightedRandomSampler(
        weights.tolist(),
        num_samples=len(labels),
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )


def train_one_epoch(
    model: torch.nn.Module,
    slides: Sequence[Slide],
    order: Iterable[int],
    optimizer: torch.optim.Optimizer,
    device: str | torch.device,
    progress: tqdm | None = None,
    max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM,
    teacher_only: bool = False,
    prefetch: Callable[[Sequence[int], int], None] | None = None,
    average: ModelEmaV3 | None = None,
) -> float:
    """One pass over ``slides`` in ``order``, one slide per optimiser step.

    Parameters
    ----------
    max_grad_norm : float, optional
        Clip the global gradient norm of each step to this value (None: no clipping). The
        Monte-Carlo gradient of the perturbed top-K has heavy tails; one rare large step
        would otherwise undo what the zoom heads learnt.
    teacher_only : bool
        Train on the model's auxiliary loss alone (ZoomMIL's zoom target: its dense teacher and
        the zoom heads following it), not on the classification of the zoomed bags (see
        ``warmup`` of :func:`train_model`). The forward pass is the same, so sparse
        training still embeds what the soft selection reaches.
    prefetch : callable, optional
        Called as ``prefetch(order, i)`` before the step on ``order[i]``
        (:class:`~zoompipe.prefetch.Prefetcher`: sparse training embeds the next slides'
        children then).
    average : timm.utils.ModelEmaV3, optional
        Moving average of the weights, updated after every step.

    Returns
    -------
    float
        Mean training cross-entropy.
    """
    model.train()
    total, count = 0.0, 0
    order = list(order)
    for position, index in enumerate(order):
        if prefetch is not None:
            prefetch(order, position)
        bags, children, label = slides[index]
        out = model(*on_device(bags, children, device), label)
        if teacher_only:
            loss = out.aux_loss
        else:
            loss = F.cross_entropy(out.logits[None], torch.tensor([label], device=device))
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if average is not None:
            average.update(model)
        total, count = total + loss.item(), count + 1
        if progress is not None:
            progress.update()
            progress.set_postfix(loss=f"{total / count:.3f}", refresh=False)
    return total / max(count, 1)


def train_model(
    features_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    architecture: str = "zoommil",
    splits_csv: str | os.PathLike | None = None,
    fold: int | None = None,
    n_folds: int = 5,
    magnifications: Sequence[float] | None = None,
    k: float = DEFAULT_K,
    hidden: int = 512,
    attn_hidden: int = 256,
    sigma: float = DEFAULT_SIGMA,
    sigma_end: float = DEFAULT_SIGMA_END,
    zoom_target_weight: float = DEFAULT_ZOOM_TARGET_WEIGHT,
    level_dropout: float = DEFAULT_LEVEL_DROPOUT,
    zoom_target_sum: bool = DEFAULT_ZOOM_TARGET_SUM,
    selection: str = DEFAULT_SELECTION,
    teacher_instance_weight: float = DEFAULT_TEACHER_INSTANCE_WEIGHT,
    max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM,
    warmup: float = DEFAULT_WARMUP,
    ema_epochs: float = DEFAULT_EMA_EPOCHS,
    epochs: int = 100,
    lr: float = 1e-4,
    lr_patience: int = DEFAULT_LR_PATIENCE,
    weight_decay: float = 0.0,
    seed: int = 0,
    split_seed: int = 0,
    device: str = "cpu",
    patience: int | None = None,
    cache: bool = True,
    progress: bool = True,
    sparse: SparseSettings | None = None,
    teacher: str | os.PathLike | None = None,
    teacher_target: str | None = None,
    attention_target_weight: float | None = None,
    children_per_parent: int = DEFAULT_CHILDREN_PER_PARENT,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a model and keep the checkpoint with the best validation weighted F1.

    Parameters
    ----------
    features_dir : path
        Folder of ``<slide_id>.h5`` feature files.
    labels_csv : path
        CSV ``slide_id,label``; class indices follow the sorted class names.
    out_dir : path
        Run folder: ``model.safetensors`` and ``config.json`` (best epoch), ``splits.csv``,
        ``log.csv`` (one row per epoch) and ``train_summary.json``.
    architecture : str
        A registered model (:func:`~zoompipe.model.list_models`): ``zoommil``, ``abmil``,
        ``clam_sb``, ``clam_mb``, ``transmil``.
    splits_csv : path, optional
        CSV ``slide_id,split`` (train, val, test) naming the slides to use. Without it, a seeded
        ``n_folds``-fold split with test fold ``fold``, stratified by class and grouped by the
        labels CSV's optional ``patient_id`` column (see :func:`~zoompipe.dataset.make_splits`).
    fold : int, optional
        Test fold of the generated split, 0 by default; not allowed with ``splits_csv``.
    n_folds : int
        Folds of the generated split.
    magnifications : sequence of float, optional
        Cascade to train on; by default every magnification of the feature files for a zooming
        model, the highest one for a model that reads one magnification.
    k : float
        Patches to zoom into per step: a count >= 1, or a fraction in (0, 1) of each slide's
        base bag (capped at the bag size, at least 1).
    hidden, attn_hidden : int
        Widths of the projected features and of the attention heads (512 and 256 in the paper).
        These, ``k``, ``sigma``, ``zoom_target_weight`` and ``level_dropout`` go to the
        architecture's config where it has such a field.
    sigma, sigma_end : float
        Noise of the perturbed top-K on [0, 1]-scaled scores (how far training explores beyond
        the current top K) at the first and the last epoch, linear in between.
    zoom_target_weight : float
        Weight of ZoomMIL's zoom target (:meth:`~zoompipe.model.ZoomMIL.zoom_target_loss`);
        0 trains the zoom heads through the perturbed top-K alone.
    level_dropout : float
        ZoomMIL: probability of dropping each lower magnification's pooled vector from the
        classifier's sum in a training step (``ZoomMILConfig.level_dropout``); 0: the paper's.
    zoom_target_sum : bool
        ZoomMIL: the zoom target's teacher classifies the dense vector with the lower levels'
        (True) or alone (``ZoomMILConfig.zoom_target_sum``).
    selection : str
        ZoomMIL: ``"soft"`` (the paper's mixed bags) or ``"straight_through"`` (real children of
        the likeliest K, gradient of the soft selection; ``ZoomMILConfig.selection``).
    teacher_instance_weight : float
        ZoomMIL: weight of CLAM's instance loss on the zoom target's teacher
        (``ZoomMILConfig.teacher_instance_weight``); 0 turns it off.
    max_grad_norm : float, optional
        Gradient norm clipping per step; None turns it off.
    warmup : float
        ZoomMIL with a zoom target: this fraction of ``epochs`` (rounded down) trains the zoom
        target alone, that is the dense teacher (ABMIL at the last magnification, sharing its head
        and classifier) and the zoom heads that follow its attention; the classification of the
        zoomed bags joins after it. Other models, ZoomMIL without a zoom target (weight 0, or
        a single magnification) and ZoomMIL with a trained ``teacher`` have no warm-up;
        ``train_summary.json`` records the epochs applied (``warmup_epochs``).
    ema_epochs : float
        Validate, and keep as the checkpoint, an exponential moving average of the weights over
        about this many epochs (timm's ``ModelEmaV3``, decay ``1 - 1 / (ema_epochs x training
        slides)`` per step) rather than the weights of the epoch's last step; 0: no average.
    epochs : int
        Maximum number of epochs.
    lr, weight_decay : float
        Adam settings.
    lr_patience : int
        Epochs without a lower validation loss before the learning rate is multiplied by 0.8;
        0 keeps it constant.
    seed : int
        Seed of the initialisation, the sampling and the selection noise.
    split_seed : int
        Seed of the generated split.
    device : str
        ``cpu`` or ``cuda``.
    patience : int, optional
        Stop after this many epochs without a better validation score.
    cache : bool
        Keep feature bags in memory between epochs.
    progress : bool
        Show a progress bar.
    sparse : SparseSettings, optional
        Train ZoomMIL sparsely (:mod:`zoompipe.sparse`): ``features_dir`` then needs only the
        base magnification, ``magnifications`` (or the files' contract) names the cascade, and
        the children that the steps and validation need are embedded from the raw slides into a
        per-slide cache. The patches embedded per magnification and epoch, and the dense count,
        go to ``log.csv`` (column ``embedded``) and ``train_summary.json`` (``sparse``).
    teacher : path, optional
        ZoomMIL: a run of ABMIL trained on the cascade's last magnification, with the same
        widths, classes and features (:mod:`zoompipe.model.teacher`). Its mass over each slide's
        dense last-magnification bag (``teacher_target``) is the zoom heads' target, in place of
        the model's own last head's, and its weights start the last level and the classifier;
        there is no warm-up. Needs dense features.
    teacher_target : str, optional
        What of ``teacher`` the zoom heads follow: ``"attention"``, or ``"evidence"``, each
        patch's class evidence against the bag's mean patch, which marks the evidence of every
        class also where the teacher's attention decides a class by what is missing
        (:func:`zoompipe.model.teacher.teacher_evidence`), or ``"own-evidence"``, that evidence
        computed by the model's own last level, which starts from the teacher's weights and goes
        on learning on the dense bag (the attention pull then follows the teacher's evidence).
        ``"own-evidence"`` also applies without a teacher, in place of the own last head's
        attention (``ZoomMIL.follows_own_evidence``); the other two need one. Default:
        ``DEFAULT_TEACHER_TARGET`` with a teacher; without one, the own last head's attention.
    attention_target_weight : float, optional
        ZoomMIL with ``teacher``: weight of the pull of the last magnification's attention
        towards the teacher's target (``ZoomMILConfig.attention_target_weight``), so that the
        attention heatmaps show sits on the evidence of every class; 0 leaves it to the label.
        Default: ``DEFAULT_TAUGHT_ATTENTION_TARGET_WEIGHT`` with a teacher, 0 without one.
    children_per_parent : int
        ZoomMIL: at most this many of each zoom step's K patches among the children of one
        parent (``ZoomMILConfig.children_per_parent``); 0: no limit.
    resume : bool
        Go on from the last finished epoch of a stopped run in ``out_dir`` (its state is kept
        after every epoch, :mod:`zoompipe.resume`), to the model an unstopped run would give;
        the settings and split must be the same. Without a state, the run starts afresh.

    Returns
    -------
    dict
        Best epoch and its validation metrics, epochs run, split sizes, class names and
        magnifications (also written to ``train_summary.json``).

    Notes
    -----
    "Best" compares validation weighted F1, then validation loss on ties (small validation
    sets make F1 ties common). The learning rate is multiplied by 0.8 when the validation loss
    has not improved for 5 epochs.
    """
    if epochs < 1:
        raise UsageError(f"need at least one epoch, got {epochs}")
    if ema_epochs < 0:
        raise UsageError(f"the weight average spans a number of epochs >= 0, got {ema_epochs}")
    if not 0 <= warmup < 1:
        raise UsageError(f"the warm-up is a fraction of the epochs in [0, 1), got {warmup}")
    if teacher_target is None:
        teacher_target = DEFAULT_TEACHER_TARGET if teacher is not None else None
    elif teacher is None and teacher_target != "own-evidence":
        raise UsageError(f"--teacher-target {teacher_target} is the teacher's; give --teacher (without one the zoom "
                         "heads follow the model's own last head: its attention, or own-evidence)")
    if attention_target_weight is None:
        attention_target_weight = 0.0 if teacher is None else DEFAULT_TAUGHT_ATTENTION_TARGET_WEIGHT
    if attention_target_weight > 0 and teacher is None:
        raise UsageError("--attention-target-weight pulls the last magnification's attention towards a trained "
                         "teacher's target; give --teacher")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("CUDA is not available here; use --device cpu")
    try:
        cls = model_class(architecture)
    except ZoompipeError as err:
        raise UsageError(str(err)) from None
    labels = read_labels(labels_csv)
    seed_everything(seed)
    out_dir = Path(out_dir)
    class_names = sorted(set(labels.values()))
    if len(class_names) < 2:
        raise UsageError(f"{labels_csv} has a single class ({class_names[0]}); need two or more")
    splits = _splits(labels, labels_csv, splits_csv, fold, n_folds, split_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_splits(out_dir / "splits.csv", splits)
    ids = {name: [s for s in labels if splits.get(s) == name] for name in ("train", "val", "test")}
    if not ids["train"] or not ids["val"]:
        raise ZoompipeError(
            f"need training and validation slides, got {len(ids['train'])} and {len(ids['val'])}"
        )

    used = [feature_path(features_dir, s) for s in ids["train"] + ids["val"]]
    pipeline = agreed_contract(used)
    if sparse is not None:
        if cls.needs != "zoom":
            raise UsageError(f"--sparse trains zooming models; {architecture} reads one magnification in full")
        if pipeline is None:
            raise UsageError("--sparse needs base features from zoompipe preprocess (CLAM/TRIDENT files record "
                             "no pipeline contract to rebuild the children from)")
        from zoompipe.sparse import ChildEmbedder, SparseDataset, cascade_contract

        if sparse.explore_budget is not None and not 0 < sparse.explore_budget <= 1:
            raise UsageError(f"the exploration budget is a fraction of the base patches in (0, 1], "
                             f"got {sparse.explore_budget:g}")
        if sparse.cluster is not None:
            from zoompipe.cluster import parse_cluster

            parse_cluster(sparse.cluster)  # a bad spec fails now, not after the slides are tiled

        pipeline = cascade_contract(pipeline, magnifications or pipeline.grid.magnifications)
        mags = list(pipeline.grid.magnifications)
        embedder = ChildEmbedder(pipeline, sparse, device)
        cache_dir = Path(sparse.cache_dir) if sparse.cache_dir is not None else out_dir / "feature_cache"
    elif magnifications:
        mags = list(magnifications)
    else:
        mags = file_magnifications(used[0])
        mags = mags if cls.needs == "zoom" else mags[-1:]

    def subset(name: str, feature_dim: int | None) -> SlideDataset | SparseDataset:
        targets = [class_names.index(labels[s]) for s in ids[name]]
        if sparse is not None:
            return SparseDataset(features_dir, ids[name], targets, mags, sparse, embedder, cache_dir, name,
                                 progress)
        return SlideDataset(features_dir, ids[name], targets, mags, feature_dim, cache)

    train_set = subset("train", None)
    train_set[0]  # every other slide must match the first one's feature dimension
    in_dim = train_set.feature_dim
    val_set = subset("val", in_dim)
    if sparse is not None:
        reused = {name: data.cached_counts() for name, data in (("train", train_set), ("val", val_set))}

    hyper = {"k": k, "hidden": hidden, "attn_hidden": attn_hidden, "sigma": sigma,
             "zoom_target_weight": zoom_target_weight, "level_dropout": level_dropout,
             "zoom_target_sum": zoom_target_sum, "selection": selection,
             "teacher_instance_weight": teacher_instance_weight, "attention_target_weight": attention_target_weight,
             "children_per_parent": children_per_parent}
    fields = config_fields(architecture)
    model = create_model(architecture, in_dim=in_dim, n_classes=len(class_names), magnifications=mags,
                         **{name: value for name, value in hyper.items() if name in fields}).to(device)
    own_evidence = teacher_target == "own-evidence"
    if own_evidence:
        if not getattr(model, "trains_zoom_target", False):
            raise UsageError("--teacher-target own-evidence sends ZoomMIL's zoom heads where its own last level's "
                             "evidence is; this model has no zoom target (a baseline, one magnification, or "
                             "--zoom-target-weight 0)")
        model.follows_own_evidence = True
    teacher_digest = None
    if teacher is not None:
        teacher_digest = _follow_teacher(model, teacher, teacher_target, class_names, pipeline, sparse is not None,
                                         device)
    # The warm-up waits for the model's own teacher to find the evidence; a trained one has.
    warmup_epochs = int(warmup * epochs) if getattr(model, "trains_zoom_target", False) and teacher is None else 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    average = None
    if ema_epochs > 0:
        from timm.utils import ModelEmaV3  # timm takes seconds to import; only this option needs it

        average = ModelEmaV3(model, decay=max(0.0, 1 - 1 / (ema_epochs * len(ids["train"]))))
    validated = model if average is None else average.module
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.8, patience=lr_patience)
                 if lr_patience else None)
    sampler = balanced_sampler(train_set.labels, seed)
    val_targets = torch.tensor(val_set.labels)

    # What the steps depend on; the device is left out, so a run stopped on one may go on on another.
    steps = fingerprint({"architecture": architecture, "magnifications": mags, "in_dim": in_dim,
                         "classes": class_names, "splits": splits, **hyper, "sigma_end": sigma_end,
                         "max_grad_norm": max_grad_norm, "warmup_epochs": warmup_epochs, "ema_epochs": ema_epochs,
                         "epochs": epochs, "lr": lr, "lr_patience": lr_patience,
                         "weight_decay": weight_decay, "seed": seed, "own_evidence": own_evidence,
                         "teacher": None if teacher is None else {"weights": teacher_digest, "target": teacher_target},
                         "sparse": None if sparse is None else {
                             name: value for name, value in dataclasses.asdict(sparse).items()
                             if name not in ("runtime", "batch_size", "workers", "lookahead", "cluster", "backend")}})
    state = load_state(out_dir, steps, model, optimizer, sampler.generator, average) if resume else None
    best: Best | None = None if state is None else state.best
    per_epoch: list[dict[str, Any]] = [] if state is None else state.per_epoch
    done = 0 if state is None else state.epoch
    if state is not None and scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    log_rows = _log_rows(out_dir / "log.csv", done)
    val_status = ""
    bar = tqdm(total=epochs * len(ids["train"]), initial=done * len(ids["train"]), unit="slide",
               disable=not progress)
    on_cluster = embedder.on_cluster() if sparse is not None else nullcontext()
    ahead = nullcontext()
    if sparse is not None and sparse.lookahead > 0:
        from zoompipe.prefetch import Prefetcher

        if sparse.cluster is None:
            embedder.build()  # here, not in the background thread: building forks the global random state
        ahead = Prefetcher(model, train_set, device, sparse.lookahead, seed)
    with bar, open(out_dir / "log.csv", "w", newline="", encoding="utf-8") as log_file, on_cluster, \
            ahead as prefetch:
        log = csv.writer(log_file)
        log.writerow(LOG_COLUMNS + (("embedded",) if sparse is not None else ()))
        log.writerows(log_rows)
        select = getattr(model, "select", None)  # a zooming model's perturbed top-K
        epoch = done
        for epoch in range(done + 1, epochs + 1):
            bar.set_description(f"epoch {epoch}/{epochs}{val_status}")
            if select is not None:
                select.sigma = sigma_schedule(epoch, epochs, sigma, sigma_end)
            train_loss = train_one_epoch(model, train_set, list(sampler), optimizer, device, bar,
                                         max_grad_norm, teacher_only=epoch <= warmup_epochs, prefetch=prefetch,
                                         average=average)
            logits = predict_logits(validated, val_set, device)
            val_loss = float(F.cross_entropy(logits, val_targets))
            metrics = classification_metrics(val_targets.numpy(), logits.softmax(dim=1).numpy())
            lr_now = optimizer.param_groups[0]["lr"]
            row = [epoch, f"{train_loss:.6f}", f"{val_loss:.6f}", f"{metrics['accuracy']:.6f}",
                   f"{metrics['weighted_f1']:.6f}", lr_now, "" if select is None else f"{select.sigma:.6f}"]
            if sparse is not None:
                per_epoch.append({"epoch": epoch, **embedder.take_counts()})
                row.append(" ".join(f"{phase}:{group}={n}" for phase in ("train", "val", "ahead")
                                    for group, n in per_epoch[-1].get(phase, {}).items()))
            log.writerow(row)
            log_file.flush()
            val_status = f" val_loss {val_loss:.3f} val_f1 {metrics['weighted_f1']:.3f}"
            if scheduler is not None:
                scheduler.step(val_loss)
            stop = False
            if best is None or best.beaten_by(metrics["weighted_f1"], val_loss):
                best = Best(epoch, metrics["weighted_f1"], val_loss, metrics["accuracy"])
                save_run(out_dir, validated, architecture, class_names, pipeline)
            else:
                stop = patience is not None and epoch - best.epoch >= patience
            schedule = {} if scheduler is None else scheduler.state_dict()
            save_state(out_dir, TrainingState(epoch, steps, best, schedule, optimizer.state_dict()["param_groups"],
                                              per_epoch),
                       model, optimizer, sampler.generator, average)
            if stop:
                break

    summary = {
        "run_dir": str(out_dir),
        "best_epoch": best.epoch,
        "best_val_f1": best.f1,
        "best_val_loss": best.loss,
        "best_val_accuracy": best.accuracy,
        "epochs_run": epoch,
        "n_train": len(ids["train"]),
        "n_val": len(ids["val"]),
        "n_test": len(ids["test"]),
        "class_names": class_names,
        "architecture": architecture,
        "magnifications": mags,
        "model": dataclasses.asdict(model.config),
        "training": {"sigma_end": sigma_end, "max_grad_norm": max_grad_norm, "warmup": warmup,
                     "warmup_epochs": warmup_epochs, "ema_epochs": ema_epochs, "lr": lr, "lr_patience": lr_patience,
                     "weight_decay": weight_decay, "epochs": epochs, "seed": seed,
                     "split_seed": split_seed, "own_evidence": own_evidence},
    }
    if teacher is not None:
        summary["teacher"] = {"run": str(teacher), "weights_sha256": teacher_digest, "target": teacher_target}
    if sparse is not None:
        summary["sparse"] = sparse_report(train_set, val_set, reused, per_epoch, cache_dir, sparse)
    write_text(out_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    clear_state(out_dir)
    return summary


def _follow_teacher(model: torch.nn.Module, teacher: str | os.PathLike, target: str, class_names: list[str],
                    pipeline: PipelineContract | None, sparse: bool, device: str) -> str:
    """Set ``model`` to learn where to zoom from a trained ABMIL run; the digest of its weights."""
    from zoompipe.model.teacher import load_teacher, start_from_teacher, teacher_target

    if not getattr(model, "trains_zoom_target", False):
        raise UsageError("--teacher gives ZoomMIL's zoom heads their target; this model has no zoom target "
                         "(a baseline, one magnification, or --zoom-target-weight 0)")
    if sparse:
        raise UsageError("--teacher reads every slide's dense last-magnification bag; --sparse embeds only part of it")
    trained = load_teacher(teacher, model, class_names, pipeline, device)
    start_from_teacher(model, trained)
    model.teacher = teacher_target(trained, target)
    return file_sha256(Path(teacher) / WEIGHTS_NAME)


def _log_rows(path: Path, epochs: int) -> list[list[str]]:
    """The rows of a stopped run's ``log.csv`` up to ``epochs`` (later ones were not kept in its state)."""
    if epochs == 0 or not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    return [row for row in rows if row and int(row[0]) <= epochs]


def sparse_report(train_set: SparseDataset, val_set: SparseDataset, reused: dict[str, dict[str, int]],
                  per_epoch: list[dict[str, Any]], cache_dir: Path, settings: SparseSettings) -> dict[str, Any]:
    """What sparse training embedded, against what dense preprocessing of the same slides embeds.

    ``embedded`` counts the base patches (embedded by ``preprocess``) and every patch this run
    embedded above them, ahead of its step (``ahead``, of which ``used`` were asked for by a step,
    the rest wasted) or in it; patches found in the cache when the run started are ``reused``.
    """
    dense = {group: train_set.dense_counts()[group] + val_set.dense_counts()[group]
             for group in train_set.dense_counts()}
    base = next(iter(dense))
    embedded = {group: dense[base] if group == base else 0 for group in dense}
    ahead = {group: 0 for group in dense if group != base}
    for epoch in per_epoch:
        for phase in ("train", "val", "ahead"):
            for group, n in epoch.get(phase, {}).items():
                embedded[group] += n
                if phase == "ahead":
                    ahead[group] += n
    start = {group: reused["train"][group] + reused["val"][group] for group in dense}
    total, total_dense = sum(embedded.values()), sum(dense.values())
    return {
        "cache_dir": str(cache_dir),
        "dense_patches": dense,
        "embedded_patches": embedded,
        "reused_from_cache": {group: n for group, n in start.items() if group != base},
        "explore_budget": settings.explore_budget,
        "ahead": {"lookahead": settings.lookahead, "embedded": ahead, "used": train_set.used_ahead_counts()},
        "per_epoch": per_epoch,
        "total_embedded": total,
        "total_dense": total_dense,
        "avoided": total_dense - total,
        "fewer_by": round(total_dense / max(total, 1), 2),
    }


def _splits(
    labels: dict[str, str],
    labels_csv: str | os.PathLike,
    splits_csv: str | os.PathLike | None,
    fold: int | None,
    n_folds: int,
    seed: int,
) -> dict[str, str]:
    if splits_csv is None:
        return make_splits(labels, n_folds=n_folds, fold=fold or 0, seed=seed,
                           patients=read_patients(labels_csv))
    if fold is not None:
        raise UsageError("a fold picks a generated split; it cannot be combined with a splits CSV")
    splits = read_splits(splits_csv)
    unlabelled = [s for s in splits if s not in labels]
    if unlabelled:
        raise UsageError(
            f"{len(unlabelled)} slides of {splits_csv} have no label in {labels_csv} "
            f"(first: {unlabelled[0]})"
        )
    return splits
