"""How many children sparse training would embed: the union of rows the soft top-K asks for, per epoch.

Trains ZoomMIL on dense feature files exactly as ``zoompipe train`` does, and records every row
above the base that a training step asks of a slide's bags (``DenseRows.rows``, the
:class:`~zoompipe.model.RowSource` that ``train --sparse`` replaces with slide reads). The
accumulated union, per magnification and epoch, is what sparse training on the same slides and
seed embeds for its training slides (validation's hard top-K adds K parents' children per
slide); the dense count is every row of the training bags. No slide is read, so a 60-epoch
count on a real-size cohort takes minutes, not hours.

``--min-share S`` simulates pruning, in training, the parents that fewer than a share S of the
noise samples select (their weight is set to zero and each slot renormalised): how much of the
union is the noise of one step rather than the selection moving between epochs.

``--samples S``, ``--sigma A`` and ``--sigma-end B`` set the perturbed top-K's noise samples and its
noise schedule (from A at the first epoch to B at the last), to measure how they shape the union.

``--explore M`` simulates limiting the base step's exploration to the base patches explored
before (all their children embedded) and the ``ceil(M * K)`` best by the zoom head's current
score: new patches enter the union only by ranking near the top. ``--budget F`` caps the base
patches a slide may explore at a fraction F of its base bag.

Usage::

    python benchmarks/sparse_union.py --features bench/pre/features --labels bench/cohort/labels.csv \\
        --splits bench/splits/fold0.csv --magnifications 1.25,2.5,10 --k 0.125 --lr 2e-4 --epochs 60
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

import zoompipe.model.topk as topk
import zoompipe.model.zoommil as zoommil
import zoompipe.train as train
from zoompipe.dataset import read_bags, read_splits
from zoompipe.train_defaults import DEFAULT_CHILDREN_PER_PARENT


def record_rows(seen: dict[tuple[int, int], set[int]]) -> None:
    """Make every training-time row request of a dense bag add to ``seen[(bag id, level)]``."""
    rows = zoommil.DenseRows.rows

    def recording(self: zoommil.DenseRows, level: int, wanted: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training steps; validation runs under inference mode
            seen.setdefault((id(self.bags[0]), level), set()).update(wanted.tolist())
        return rows(self, level, wanted)

    zoommil.DenseRows.rows = recording


def prune_rare_parents(min_share: float) -> None:
    """In training, zero the parents that fewer than ``min_share`` of the samples select."""
    forward = topk.PerturbedTopK.forward

    def pruned(self: topk.PerturbedTopK, scores: torch.Tensor, k: int, mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, *limit):  # limit: groups, per_group
        out = forward(self, scores, k, mask, generator, *limit)
        if not self.training:
            return out
        share = out.sum(dim=1, keepdim=True)  # probability that a parent is among the K
        out = torch.where(share >= min_share, out, torch.zeros_like(out))
        return out / out.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    topk.PerturbedTopK.forward = pruned


def use_noise_samples(n: int) -> None:
    """Make every perturbed top-K draw ``n`` noise samples (``ZoomMILConfig.n_samples``)."""
    init = topk.PerturbedTopK.__init__

    def with_samples(self: topk.PerturbedTopK, num_samples: int, *args, **kwargs) -> None:
        init(self, n, *args, **kwargs)

    topk.PerturbedTopK.__init__ = with_samples


def explore_known_only(seen: dict[tuple[int, int], set[int]], multiple: float, budget: float) -> None:
    """In training, the base step's noise reaches only explored base patches and the current best.

    Explored: every child at the next magnification was asked for before (their features are
    in the cache). The best: the ``ceil(multiple * K)`` top-scored by the zoom head now, so a patch
    enters the union only by ranking near the top K, not by one noise sample. With a ``budget``
    (a fraction of the base bag, at least K), once that many base patches of a slide are
    explored, no new one is.
    """
    soft = zoommil.ZoomMIL._forward_soft
    select = topk.PerturbedTopK.forward
    pending: dict[str, torch.Tensor] = {}

    def forward_soft(self: zoommil.ZoomMIL, h0: torch.Tensor, children: list[torch.Tensor], fetch_rows,
                     generator: torch.Generator | None = None, selectable=None):
        source = fetch_rows.__self__  # the slide's DenseRows
        asked = torch.tensor(sorted(seen.get((id(source.bags[0]), 1), set())), dtype=torch.long)
        index = children[0]
        pending["explored"] = (torch.isin(index, asked) | (index < 0)).all(dim=1) & (index >= 0).any(dim=1)
        try:
            return soft(self, h0, children, fetch_rows, generator, selectable)
        finally:
            pending.clear()

    def restricted(self: topk.PerturbedTopK, scores: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, *limit):  # limit: groups, per_group
        explored = pending.pop("explored", None)  # the base step's call comes first, without a mask
        if self.training and explored is not None and mask is None:
            n = scores.shape[-1]
            best = topk.topk_indices(scores[0].detach(), min(math.ceil(multiple * k), n))
            if budget > 0:
                room = max(math.ceil(budget * n), k) - int(explored.sum())
                fresh = best[~explored[best]]
                best = fresh[scores[0].detach()[fresh].argsort(descending=True)][:max(room, 0)]
            mask = explored.clone()
            mask[best] = True
            mask = mask[None]
        return select(self, scores, k, mask, generator, *limit)

    zoommil.ZoomMIL._forward_soft = forward_soft
    topk.PerturbedTopK.forward = restricted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True, help="slide_id,split CSV")
    parser.add_argument("--magnifications", type=lambda t: [float(v) for v in t.split(",")], default=[1.25, 2.5, 10])
    parser.add_argument("--k", type=float, default=0.125)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--attn-hidden", type=int, default=64)
    parser.add_argument("--level-dropout", type=float, default=None, help="[default: the training default]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--children-per-parent", type=int, default=DEFAULT_CHILDREN_PER_PARENT,
                        help="children a zoom step may take from one parent (0: no limit) [default: the training default]")
    parser.add_argument("--min-share", type=float, default=0.0, help="simulated pruning of rare parents (0: none)")
    parser.add_argument("--explore", type=float, default=0.0,
                        help="simulated exploration limit: the base step's noise reaches explored patches and the "
                             "EXPLORE x K best only (0: no limit)")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="with --explore: base patches a slide may explore, a fraction of its base bag (0: no cap)")
    parser.add_argument("--samples", type=int, default=0, help="noise samples of the perturbed top-K (0: the model's)")
    parser.add_argument("--sigma", type=float, default=None, help="noise at the first epoch [default: training's]")
    parser.add_argument("--sigma-end", type=float, default=None, help="noise at the last epoch [default: training's]")
    args = parser.parse_args()

    seen: dict[tuple[int, int], set[int]] = {}
    record_rows(seen)
    if args.min_share > 0:
        prune_rare_parents(args.min_share)
    if args.explore > 0:
        explore_known_only(seen, args.explore, args.budget)
    if args.samples > 0:
        use_noise_samples(args.samples)
    levels = range(1, len(args.magnifications))
    history: list[dict[int, int]] = []
    one_epoch = train.train_one_epoch

    def counting_epoch(*a, **kw) -> float:
        loss = one_epoch(*a, **kw)
        history.append({level: sum(len(v) for (_, lv), v in seen.items() if lv == level) for level in levels})
        return loss

    train.train_one_epoch = counting_epoch
    ids = [s for s, split in read_splits(args.splits).items() if split == "train"]
    dense = [0] * len(args.magnifications)
    for slide_id in ids:
        bags, _, _ = read_bags(args.features / f"{slide_id}.h5", args.magnifications)
        dense = [n + len(b) for n, b in zip(dense, bags)]
    given = {"level_dropout": args.level_dropout, "sigma": args.sigma, "sigma_end": args.sigma_end}
    extra = {name: value for name, value in given.items() if value is not None}
    with tempfile.TemporaryDirectory() as run:
        summary = train.train_model(args.features, args.labels, run, architecture="zoommil", splits_csv=args.splits,
                                    magnifications=args.magnifications, k=args.k, lr=args.lr, epochs=args.epochs,
                                    hidden=args.hidden, attn_hidden=args.attn_hidden, seed=args.seed,
                                    children_per_parent=args.children_per_parent, progress=False, **extra)
    names = [f"{m:g}x" for m in args.magnifications]
    print(f"{len(ids)} training slides; dense rows {dict(zip(names, dense))} = {sum(dense)}; "
          f"best validation weighted F1 {summary['best_val_f1']:.3f} (epoch {summary['best_epoch']}); "
          f"children per parent {args.children_per_parent}; min share {args.min_share:g}; explore {args.explore:g}; budget {args.budget:g}; "
          f"K {args.k:g}; samples {args.samples or 'default'}; sigma {args.sigma}, end {args.sigma_end} (None: default)")
    print(f"{'epoch':>5s} " + " ".join(f"{n:>9s}" for n in names[1:]) + f" {'base+union':>11s} {'dense/that':>10s}")
    for epoch, counts in enumerate(history, 1):
        total = dense[0] + sum(counts.values())
        print(f"{epoch:5d} " + " ".join(f"{counts[level]:9d}" for level in levels)
              + f" {total:11d} {sum(dense) / total:9.2f}x")


if __name__ == "__main__":
    main()
