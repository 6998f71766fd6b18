"""CLAM's instance-level clustering loss (Lu et al., 2021), shared by CLAM-SB and ZoomMIL's teacher.

Each class has an instance classifier. The K most attended patches of a slide are
pseudo-labelled positive for its class and the K least attended negative; for the other
classes (more than two classes), the K most attended are negative. Its cross-entropy shapes
the attention into class evidence patch by patch, which the slide label alone does only
through the pooled vector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def instance_classifiers(hidden: int, n_classes: int) -> nn.ModuleList:
    """One two-way (in class or not) linear classifier of projected patches per class."""
    return nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))


def instance_loss(heads: nn.ModuleList, h: Tensor, scores: Tensor, label: int, k_sample: int) -> Tensor:
    """Mean cross-entropy of the pseudo-labelled patches over the classes that get some.

    Parameters
    ----------
    heads : nn.ModuleList
        :func:`instance_classifiers`, one per class.
    h : Tensor
        Projected patches (N, hidden).
    scores : Tensor
        Attention scores before the softmax: (N,) from one branch, ranking the patches for
        every class, or (N, n_classes) from one branch per class (CLAM-MB), each ranking them
        for its class. Only the ranking is used (no gradient flows to the attention through this
        loss, as in CLAM).
    label : int
        The slide's class.
    k_sample : int
        Patches pseudo-labelled at each end of the ranking, capped at half the bag.

    Returns
    -------
    Tensor
        Scalar; zero for a bag of fewer than two patches.
    """
    k = min(k_sample, len(h) // 2)
    if k == 0:
        return h.new_zeros(())
    losses = []
    for cls, head in enumerate(heads):
        ranking = scores if scores.dim() == 1 else scores[:, cls]
        top, bottom = ranking.topk(k).indices, (-ranking).topk(k).indices
        if cls == label:
            rows = torch.cat([top, bottom])
            targets = torch.cat([torch.ones(k), torch.zeros(k)]).long()
        elif len(heads) > 2:
            rows, targets = top, torch.zeros(k, dtype=torch.long)
        else:
            continue
        losses.append(F.cross_entropy(head(h[rows]), targets.to(h.device)))
    return torch.stack(losses).mean()
