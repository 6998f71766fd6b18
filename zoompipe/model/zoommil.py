"""ZoomMIL: attention MIL that looks at low magnification and zooms where it matters.

Thandiackal et al., "Differentiable Zooming for Multiple Instance Learning on Whole-Slide Images",
ECCV 2022. At each magnification but the last, an auxiliary gated-attention head picks the K
patches to zoom into; their children at the next magnification form the next bag. The pooled
vectors of all magnifications are summed and classified.

Patches are identified by *global rows*: row indices into the full grid of patches of a
magnification (all tissue patches at the base, all children of those at the next
magnification, and so on), as stored in the feature files. ``children[i]`` of shape (N_i, C)
maps each row of magnification i to the rows of its C children at magnification i + 1, with -1
for children that do not exist (padding).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoompipe.model.attention import GatedAttention, masked_softmax
from zoompipe.model.evidence import class_evidence
from zoompipe.model.instance import instance_classifiers, instance_loss
from zoompipe.model.output import ModelOutput as ZoomOutput
from zoompipe.model.registry import register_model
from zoompipe.train_defaults import (
    DEFAULT_LEVEL_DROPOUT,
    DEFAULT_SELECTION,
    DEFAULT_SIGMA,
    DEFAULT_ZOOM_TARGET_SUM,
    DEFAULT_ZOOM_TARGET_WEIGHT,
    SELECTIONS,
)
from zoompipe.model.topk import PerturbedTopK, selectable_count, topk_indices

#: ``fetch_children(step, parents) -> (features, rows, parent)``. ``parents`` holds the global
#: rows, ascending, of the patches selected at magnification index ``step``; the function returns
#: the features (M, D) of the children of those patches at magnification ``step + 1``, their
#: global rows (M,) there, and for each the position in ``parents`` of its parent (M,). Children
#: that do not exist are simply left out, so the features are the rows of
#: ``children[step][parents].flatten()`` that are not -1, in that order.
FetchChildren = Callable[[int, Tensor], tuple[Tensor, Tensor, Tensor]]
#: ``zoomable(step, rows) -> BoolTensor``: which ``rows`` of magnification ``step`` have at least
#: one child at the next; under the ``tissue`` children policy a patch may have none.
Zoomable = Callable[[int, Tensor], Tensor]


def patches_to_zoom(k: float, n_base: int) -> int:
    """K for a slide with ``n_base`` base patches: ``k`` itself when >= 1, else that fraction of
    the bag, rounded up; capped at the bag, at least 1."""
    count = k if k >= 1 else math.ceil(k * n_base)
    return max(1, min(int(count), n_base))


class RowSource(Protocol):
    """A slide's features by global row, for training that does not hold every bag in memory.

    Dense feature files give every row (:class:`DenseRows`); sparse training
    (:mod:`zoompipe.sparse`) embeds the rows it is asked for from the raw slide.
    """

    def to(self, device: str | torch.device) -> RowSource:
        """The source, giving its features on ``device``."""

    def base(self) -> Tensor:
        """Features (N_0, D) of every base patch."""

    def rows(self, level: int, rows: Tensor) -> Tensor:
        """Features (len(rows), D) of the global ``rows`` (unique) of magnification ``level``."""

    def selectable(self, k: int) -> Tensor | None:
        """Which base patches a training step's top-K (of K = ``k``) may choose among; None: every
        one. Sparse training limits its exploration here."""

    def known(self) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """What the zoom target may read: every row known so far.

        Returns ``(bags, children, complete)``: per magnification the known rows' features;
        ``children`` indexing into those bags (-1 for a child that does not exist or is not
        known); per magnification but the last, bool for each known row: all its
        last-magnification descendants are known (None: every row, as in dense files).
        """


class DenseRows:
    """:class:`RowSource` over bags held in full (dense feature files)."""

    def __init__(self, bags: list[Tensor], children: list[Tensor]) -> None:
        self.bags, self.children = bags, children

    def to(self, device: str | torch.device) -> DenseRows:
        return DenseRows([b.to(device) for b in self.bags], [c.to(device) for c in self.children])

    def base(self) -> Tensor:
        return self.bags[0]

    def rows(self, level: int, rows: Tensor) -> Tensor:
        return self.bags[level][rows.to(self.bags[level].device)]

    def selectable(self, k: int) -> Tensor | None:
        return None

    def known(self) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        return self.bags, self.children, None


@dataclass
class ZoomMILConfig:
    """Hyper-parameters of :class:`ZoomMIL`, stored in a run's ``config.json``.

    Parameters
    ----------
    in_dim : int
        Feature dimension D of the patch embeddings.
    n_classes : int
        Number of slide classes.
    magnifications : list of float
        Cascade of magnifications, ascending. A single magnification gives plain gated-attention
        MIL (ABMIL) at that magnification.
    k : float
        Patches selected for zooming at each step. A whole number >= 1 is a count; a value in
        (0, 1) is a fraction of the base bag, ``ceil(k * N_0)`` (the authors advise N/16 to
        N/2). Either way capped at the bag size of each step, and at least one.
    hidden : int
        Dimension of the projected patch embeddings.
    attn_hidden : int
        Hidden dimension of the gated-attention heads.
    dropout : float
        Dropout after the projection.
    n_samples : int
        Noise samples of the perturbed top-K during training.
    sigma : float
        Noise scale of the perturbed top-K, relative to the [0, 1] range of the scores; the
        starting value when training decays it.
    zoom_target_weight : float
        Weight of the zoom target (training only, see :meth:`ZoomMIL.zoom_target_loss`): the
        last magnification's head pooled over the whole dense bag is classified too, and each
        zoom head is pulled towards the share of that head's attention under each of its
        patches. 0 trains the zoom heads through the perturbed top-K alone, as in the paper.
    level_dropout : float
        Probability that training drops the pooled vector of each magnification below the last
        from the classifier's sum, for one step (nothing is dropped at inference). Without it
        the low magnifications, which hold no class evidence when the class shows only at
        high magnification, let the classifier memorise the training slides: on a 40-slide
        cohort (fold 0) training accuracy reached 0.83 from the summed vectors while the 10x
        vector alone classified at chance, and validation loss rose from the first epochs.
        With 0.5 validation loss fell steadily instead (README, the zoom benchmark). 0 is the
        paper's training.
    zoom_target_sum : bool
        Whether the zoom target's teacher classifies the dense last-magnification vector added
        to the lower levels' pooled vectors, as the classifier's input is at inference (True),
        or alone, as ABMIL at that magnification does (False, the default: it learns the class
        sooner, and the zoom heads follow its attention; ``train_defaults``).
    selection : str
        How training builds the bag above a zoom head. ``"soft"`` (the paper): row k is the
        expected k-th selected patch over the noise samples, so rows mix the children of
        several parents. ``"straight_through"``: the rows are the real children of the K
        patches the noise samples select most often, as at inference, while the gradient
        still flows through the perturbed top-K's estimate (straight-through estimator).
    teacher_instance_weight : float
        Weight of CLAM's instance loss (:mod:`zoompipe.model.instance`) on the zoom target's
        teacher: the ``k_sample`` most and least attended patches of the dense last-magnification
        bag are pseudo-labelled, so its attention, which the zoom heads learn to follow and the
        last head keeps at inference, becomes patch-level class evidence. Training only; 0, the
        default here so that a run recorded before this field loads as it was trained, adds no
        classifiers (``train_model`` passes ``train_defaults.DEFAULT_TEACHER_INSTANCE_WEIGHT``).
    k_sample : int
        Patches pseudo-labelled at each end of the teacher's attention ranking (CLAM's 8).
    attention_target_weight : float
        Weight of a KL term that pulls the last magnification's attention over the dense bag
        towards a trained teacher's target (:attr:`ZoomMIL.teacher`), so that the attention that
        pools the zoomed bag, and that heatmaps show, sits where the zoom heads were sent.
        Training only; 0, the default and that of runs recorded before this field, leaves it to
        the slide label.
    children_per_parent : int
        At each zoom step above the base, at most this many of the K patches chosen among the
        children of one parent, in training's noise samples and at inference alike. A zoom head
        left free fills its K with the children of the parents over the largest lesions (on the
        zoom benchmark's cohort it lost 11 lesions, 6 of them with all K on other lesions); 1
        spreads the K over as many parents. 0, the default here so that a run recorded before
        this field loads as it was trained, is the paper's top-K over the whole zoomed bag
        (``train_model`` passes ``train_defaults.DEFAULT_CHILDREN_PER_PARENT``).
    """

    in_dim: int
    n_classes: int
    magnifications: list[float] = field(default_factory=lambda: [1.25, 2.5, 10.0])
    k: float = 12
    hidden: int = 512
    attn_hidden: int = 256
    dropout: float = 0.25
    n_samples: int = 500
    sigma: float = DEFAULT_SIGMA
    zoom_target_weight: float = DEFAULT_ZOOM_TARGET_WEIGHT
    level_dropout: float = DEFAULT_LEVEL_DROPOUT
    zoom_target_sum: bool = DEFAULT_ZOOM_TARGET_SUM
    selection: str = DEFAULT_SELECTION
    teacher_instance_weight: float = 0.0
    k_sample: int = 8
    attention_target_weight: float = 0.0
    children_per_parent: int = 0

    def __post_init__(self) -> None:
        self.magnifications = [float(m) for m in self.magnifications]
        mags = self.magnifications
        if not mags or any(m <= 0 for m in mags) or any(b <= a for a, b in zip(mags, mags[1:])):
            raise ValueError(f"magnifications must be positive and ascending, got {mags}")
        if self.in_dim < 1 or self.n_classes < 2:
            raise ValueError(
                f"need in_dim >= 1 and n_classes >= 2, got {self.in_dim} and {self.n_classes}"
            )
        if not (0 < self.k < 1 or (self.k >= 1 and float(self.k).is_integer())):
            raise ValueError(f"k must be a count >= 1 or a fraction in (0, 1), got {self.k}")
        self.k = int(self.k) if self.k >= 1 else float(self.k)
        if self.zoom_target_weight < 0:
            raise ValueError(f"zoom_target_weight must be >= 0, got {self.zoom_target_weight}")
        if not 0 <= self.level_dropout < 1:
            raise ValueError(f"level_dropout must lie in [0, 1), got {self.level_dropout}")
        if self.teacher_instance_weight < 0 or self.k_sample < 1:
            raise ValueError(f"need teacher_instance_weight >= 0 and k_sample >= 1, got "
                             f"{self.teacher_instance_weight} and {self.k_sample}")
        if self.attention_target_weight < 0:
            raise ValueError(f"attention_target_weight must be >= 0, got {self.attention_target_weight}")
        if self.children_per_parent < 0:
            raise ValueError(f"children_per_parent must be >= 0, got {self.children_per_parent}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")

    def resolve_k(self, n_base: int) -> int:
        """Patches to select at each step for a slide with ``n_base`` base patches."""
        return patches_to_zoom(self.k, n_base)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the configuration."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZoomMILConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``TypeError``."""
        return cls(**data)


class Magnification(nn.Module):
    """Projection, pooling attention and, except at the last magnification, a zoom head."""

    def __init__(self, config: ZoomMILConfig, zoom: bool) -> None:
        super().__init__()
        self.project = nn.Sequential(
            nn.Linear(config.in_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout)
        )
        self.attention = GatedAttention(config.hidden, config.attn_hidden)
        self.zoom = GatedAttention(config.hidden, config.attn_hidden) if zoom else None


@register_model("zoommil")
class ZoomMIL(nn.Module):
    """ZoomMIL classifier over a cascade of magnifications (one slide at a time).

    Parameters
    ----------
    config : ZoomMILConfig
        Hyper-parameters.
    """

    config_class = ZoomMILConfig
    #: Above the base, only the children of the patches it selects (:meth:`infer`).
    needs = "zoom"

    def __init__(self, config: ZoomMILConfig) -> None:
        super().__init__()
        self.config = config
        n_mags = len(config.magnifications)
        self.levels = nn.ModuleList(
            Magnification(config, zoom=i < n_mags - 1) for i in range(n_mags)
        )
        self.classifier = nn.Linear(config.hidden, config.n_classes)
        self.select = PerturbedTopK(config.n_samples, config.sigma)
        if config.teacher_instance_weight > 0:
            self.instance_classifiers = instance_classifiers(config.hidden, config.n_classes)
        #: Training only, never saved: the attention over the dense last-magnification bag that
        #: the zoom heads follow, from a trained single-magnification run
        #: (:mod:`zoompipe.model.teacher`); None: the model's own last head's.
        self.teacher: Callable[[Tensor], Tensor] | None = None
        #: Training only: the zoom heads follow the class evidence of this model's own last level
        #: over the dense bag (:func:`~zoompipe.model.evidence.class_evidence`) rather than the
        #: teacher's mass, which then only pulls the last attention.
        self.follows_own_evidence = False

    @property
    def trains_zoom_target(self) -> bool:
        """Whether training adds the zoom target (:meth:`zoom_target_loss`) as ``aux_loss``."""
        return self.config.zoom_target_weight > 0 and len(self.levels) > 1

    def forward(
        self, bags: list[Tensor] | RowSource, children: list[Tensor], label: int | None = None
    ) -> ZoomOutput:
        """Classify a slide.

        Parameters
        ----------
        bags : list of Tensor, or RowSource
            Per magnification, features (N_i, D) of the full grid; or a :class:`RowSource`
            that gives rows on demand, of which only the rows the selections need are asked.
        children : list of Tensor
            Per magnification but the last, LongTensor (N_i, C_i) of the children's rows in
            ``bags[i + 1]``, -1 for padding.
        label : int, optional
            The slide's class, for the zoom target.

        Returns
        -------
        ZoomOutput
            In training mode the selection is soft (perturbed top-K, differentiable) and only
            the logits and ``aux_loss`` (the weighted :meth:`zoom_target_loss`, None when its
            weight is 0 or there is one magnification) are returned; in eval mode this is
            :meth:`infer` reading from ``bags``.
        """
        n_mags = len(self.levels)
        source = DenseRows(bags, children) if isinstance(bags, list) else bags
        if isinstance(bags, list) and len(bags) != n_mags or len(children) != n_mags - 1:
            raise ValueError(
                f"model has {n_mags} magnifications; got {len(bags)} bags and "
                f"{len(children)} children indices"
            )
        if self.training:
            logits, below_last = self._forward_soft(source.base(), children, source.rows,
                                                    selectable=source.selectable)
            out = ZoomOutput(logits=logits)
            if self.trains_zoom_target:
                known, known_children, complete = source.known()
                below = below_last if self.config.zoom_target_sum else None
                loss = self.zoom_target_loss(known, known_children, label, below, complete)
                out.aux_loss = self.config.zoom_target_weight * loss
            return out

        def fetch(step: int, parents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            index = children[step][parents.to(children[step].device)]
            valid = (index >= 0).flatten()
            rows = index.flatten()[valid]
            parent = torch.arange(len(parents), device=index.device).repeat_interleave(index.shape[1])[valid]
            return source.rows(step + 1, rows), rows, parent

        def zoomable(step: int, rows: Tensor) -> Tensor:
            index = children[step]
            return (index[rows.to(index.device)] >= 0).any(dim=1).cpu()

        return self.infer(source.base(), fetch, zoomable)

    def infer(self, h0: Tensor, fetch_children: FetchChildren, zoomable: Zoomable | None = None) -> ZoomOutput:
        """Classify a slide, computing features above the base only where the model zooms.

        Parameters
        ----------
        h0 : Tensor
            Features (N_0, D) of every patch at the base magnification.
        fetch_children : callable
            ``fetch_children(step, parents) -> (features, rows, parent)``, see :data:`FetchChildren`.
            ``parents`` is a CPU LongTensor; the features are moved to the device of ``h0``.
        zoomable : callable, optional
            See :data:`Zoomable`. The top-K chooses among the patches that have children, so
            that none of the K is spent on a patch with nothing under it; by default every
            patch has children.

        Returns
        -------
        ZoomOutput
            Logits and, per magnification, attended rows, attention and selection.
        """
        if self.training:
            raise RuntimeError("ZoomMIL.infer makes hard selections; call model.eval() first")
        out = ZoomOutput(logits=h0.new_zeros(0))  # logits are filled in last
        k = self.config.resolve_k(len(h0))
        pooled = h0.new_zeros(self.config.hidden)
        features, rows, groups = h0, torch.arange(len(h0)), None
        for step, level in enumerate(self.levels):
            z = level.project(features)
            attention = masked_softmax(level.attention(z))
            pooled = pooled + attention @ z
            out.rows.append(rows)
            out.attention.append(attention)
            if level.zoom is None:
                break
            scores = level.zoom(z)
            allowed = torch.ones(len(rows), dtype=torch.bool) if zoomable is None else zoomable(step, rows)
            if not bool(allowed.any()):
                break  # nothing above any of these patches: nothing to zoom into
            ranked = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
            per_group = self.config.children_per_parent
            capacity = selectable_count(allowed[None], groups, per_group)
            local = topk_indices(ranked, min(k, capacity), groups, per_group).cpu()
            selected = rows[local].sort().values
            out.selected.append(selected)
            out.selection_scores.append(scores)
            features, rows, groups = fetch_children(step, selected)
            features, rows, groups = features.to(h0.device), rows.cpu(), groups.to(h0.device)
        out.logits = self.classifier(pooled)
        return out

    def explore(self, source: RowSource, children: list[Tensor], generator: torch.Generator) -> None:
        """Ask ``source`` for the rows that a training step on this slide would ask, and train nothing.

        The step's soft selections are made with noise from ``generator`` and without dropout,
        so torch's global random stream is not touched: sparse training calls this on a copy of
        the model, in a background thread, to embed the next slides' children ahead
        (:mod:`zoompipe.prefetch`) while the training thread draws its own noise. The rows a step
        asks are those its noise reaches, so the next step asks mostly, not exactly, these.
        """
        modes = [module.training for module in self.modules()]
        self.eval()
        self.select.train()
        try:
            with torch.no_grad():
                self._forward_soft(source.base(), children, source.rows, generator, source.selectable)
        finally:
            for module, mode in zip(self.modules(), modes):
                module.training = mode

    def _forward_soft(
        self, h0: Tensor, children: list[Tensor], fetch_rows: Callable[[int, Tensor], Tensor],
        generator: torch.Generator | None = None,
        selectable: Callable[[int], Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Logits with soft selections, and the pooled vectors of all but the last level.

        Above the base, only the rows under parents that carry weight are asked of
        ``fetch_rows(level, rows)`` (:meth:`RowSource.rows`). The top-K's noise is drawn from
        ``generator`` (None: torch's global generator); the base step chooses among the patches
        that ``selectable`` allows (:meth:`RowSource.selectable`; None: all).
        """
        # A soft bag above the base has rows (j, c): child c of the mixture of parents
        # sum_a mix[j, a] * parents[a], where `parents` are global rows of the previous
        # magnification. A hard selection makes `mix` a 0/1 matrix and this is a plain gather.
        features, weights, groups = h0, None, None
        k = self.config.resolve_k(len(h0))
        mix = parents = reach = None
        pooled = h0.new_zeros(self.config.hidden)
        for step, level in enumerate(self.levels):
            z = level.project(features)
            below_last = pooled
            vector = masked_softmax(level.attention(z), weights) @ z
            # Drawn on the CPU generator whatever the device, so runs agree across devices; not
            # drawn at all by explore (eval mode), which must leave the global stream alone.
            if level.zoom is not None and self.training and float(torch.rand(())) < self.config.level_dropout:
                vector = torch.zeros_like(vector)
            pooled = pooled + vector
            if level.zoom is None:
                break
            scores = level.zoom(z)
            if weights is not None:
                mask = (weights > 0)[None]
            else:
                allowed = None if selectable is None else selectable(k)
                mask = None if allowed is None else allowed.to(scores.device)[None]
            soft = self.select(scores[None], k, mask, generator, groups, self.config.children_per_parent)[0]
            selector = (_straight_through(soft, groups, self.config.children_per_parent)
                        if self.config.selection == "straight_through" else soft)
            if mix is None:
                mix, parents = selector, torch.arange(len(features), device=features.device)
                reach = soft.detach()
            else:
                # Selecting soft rows (j, c) of this bag mixes the c-th children of the
                # previous parents: the new parents are those children, in (a, c) order.
                n_prev = mix.shape[0]
                mix = torch.einsum(
                    "kjc,ja->kac", selector.view(len(selector), n_prev, -1), mix
                ).flatten(1)
                # A soft mix is its own reach; only a straight-through one needs it apart.
                reach = mix.detach() if selector is soft else torch.einsum(
                    "kjc,ja->kac", soft.detach().view(len(soft), n_prev, -1), reach
                ).flatten(1)
                parents = children[step - 1][parents].flatten()
            # Drop parents that are padding or that no noise sample reaches: they contribute
            # nothing, not even gradient (a straight-through mix is 0 on parents that the soft
            # selection reaches, and their children carry its gradient).
            keep = (parents >= 0) & (reach != 0).any(dim=0)
            mix, parents, reach = mix[:, keep], parents[keep], reach[:, keep]
            child_rows = children[step][parents]
            needed, local = torch.unique(child_rows[child_rows >= 0], return_inverse=True)
            if len(needed):
                child_rows = child_rows.clone()
                child_rows[child_rows >= 0] = local
                features, weights = _mix_children(mix, child_rows, fetch_rows(step + 1, needed))
                # Row (j, c) of the soft bag descends from the j-th (soft) parent.
                groups = torch.arange(len(mix), device=features.device).repeat_interleave(child_rows.shape[1])
            if not len(needed) or not bool((weights > 0).any()):
                below_last = pooled
                break  # the selected patches have no children: nothing to look at above
        return self.classifier(pooled), below_last

    def zoom_target_loss(
        self,
        bags: list[Tensor],
        children: list[Tensor],
        label: int | None = None,
        below_last: Tensor | None = None,
        complete: list[Tensor] | None = None,
    ) -> Tensor:
        """A direct training signal for the zoom heads, from the dense last magnification.

        The last magnification's projection and attention pool its *whole* bag (every
        descendant of every base patch, which dense training features provide), and that vector
        takes the place of the last level's in the classifier's sum: cross-entropy against
        ``label`` trains the last head to find the evidence, as single-magnification ABMIL does,
        while the classifier sees the same kind of sum as in :meth:`infer`. Its attention, summed
        over each patch's descendants, is a distribution over the patches of every lower
        magnification; each zoom head's softmax over its dense bag is pulled towards it (KL
        divergence, the target detached). The zoom heads so learn to rank first the patches
        under which the evidence lies, which the perturbed top-K's Monte-Carlo gradient alone
        finds only by chance when the evidence occupies a few patches. With :attr:`teacher`
        set, the target is that trained model's mass (its attention or its evidence) instead of
        the last head's; the cross-entropy still trains the last head on the dense bag, and with
        ``attention_target_weight`` > 0 its attention is pulled towards that mass too. With
        :attr:`follows_own_evidence` the zoom heads follow the class evidence of the last level
        itself, which starts as the teacher's and goes on learning on the dense bag.

        Parameters
        ----------
        bags, children : list of Tensor
            As in :meth:`forward`.
        label : int, optional
            The slide's class; without it only the KL terms are returned.
        below_last : Tensor, optional
            Sum of the pooled vectors of the lower levels, shape (hidden,), from the same
            forward pass; zero by default.
        complete : list of Tensor, optional
            Per magnification but the last, bool (N_i,): the rows all of whose
            last-magnification descendants ``bags[-1]`` holds. Sparse training knows the bags
            only in part (the rows embedded so far); each zoom head is then compared with the
            target only on complete rows, and learns nothing from it about the rest. A row
            known in part is left out because its mass would rank it by how deeply it was
            explored, not by its evidence: with it, or with that mass scaled up by the share
            known, sparse training on the planted cohort reached 3-6% of the regions, against
            98% with complete rows only (``tests/test_sparse.py``). None: every
            row (dense files).

        Returns
        -------
        Tensor
            Scalar: teacher cross-entropy (with its instance loss when
            ``teacher_instance_weight`` > 0) plus the KL divergence of every zoom head.
        """
        last = self.levels[-1]
        z = last.project(bags[-1])
        teacher_scores = last.attention(z)
        attention = masked_softmax(teacher_scores)
        loss = z.new_zeros(())
        if label is not None:
            target = torch.tensor([label], device=z.device)
            pooled = attention @ z if below_last is None else below_last + attention @ z
            loss = loss + F.cross_entropy(self.classifier(pooled)[None], target)
            if self.config.teacher_instance_weight > 0:
                loss = loss + self.config.teacher_instance_weight * instance_loss(
                    self.instance_classifiers, z, teacher_scores, int(label), self.config.k_sample)
        pull = self.teacher is not None and self.config.attention_target_weight > 0
        # The teacher reads the whole dense bag: only when the pull or the zoom heads use its mass.
        needed = pull or (self.teacher is not None and not self.follows_own_evidence)
        taught = self.teacher(bags[-1]).detach() if needed else None
        if pull:
            loss = loss + self.config.attention_target_weight * F.kl_div(
                torch.log_softmax(teacher_scores, dim=0), taught, reduction="sum")
        if self.follows_own_evidence:
            mass = class_evidence(z, self.classifier)
        else:
            mass = attention.detach() if taught is None else taught
        for step in reversed(range(len(self.levels) - 1)):
            index = children[step]
            valid = index >= 0
            mass = (mass[index.clamp_min(0)] * valid).sum(dim=1)  # (N_step,)
            level = self.levels[step]
            scores, target = level.zoom(level.project(bags[step])), mass
            if complete is not None:
                if not bool(complete[step].any()):
                    continue
                scores, target = scores[complete[step]], mass[complete[step]]
            loss = loss + F.kl_div(
                torch.log_softmax(scores, dim=0), target / target.sum().clamp_min(1e-12),
                reduction="sum",
            )
        return loss


def _straight_through(soft: Tensor, groups: Tensor | None = None, per_group: int = 0) -> Tensor:
    """The hard selector of the K entries most often selected, with the gradient of ``soft``.

    ``soft`` (K, N) is a perturbed top-K selector; its column sums are each entry's chance of
    being selected. The value returned is exactly the one-hot selector of the K likeliest
    entries (at most ``per_group`` of a group, as ``soft`` was drawn), ordered by position as
    :func:`topk_indices` orders them.
    """
    chance = soft.detach().sum(dim=0)
    hard = F.one_hot(topk_indices(chance, len(soft), groups, per_group), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


def _mix_children(mix: Tensor, child_rows: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Soft bag of the children of mixed parents.

    Parameters
    ----------
    mix : Tensor
        Mixing weights (K, A) over A parents.
    child_rows : Tensor
        LongTensor (A, C), the parents' children rows in ``features``, -1 for padding.
    features : Tensor
        Features (N, D) of the children's magnification.

    Returns
    -------
    features : Tensor
        Soft bag (K * C, D); row (k, c) mixes the c-th children of the parents.
    weights : Tensor
        (K * C,), the share of each row that is a real patch rather than padding.
    """
    valid = child_rows >= 0
    gathered = features[child_rows.clamp_min(0)] * valid.unsqueeze(-1).to(features.dtype)
    mixed = torch.einsum("ka,acd->kcd", mix, gathered).flatten(0, 1)
    weights = (mix @ valid.to(mix.dtype)).flatten()
    return mixed, weights
