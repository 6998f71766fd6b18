"""Where a trained attention-MIL head's class evidence lies in a bag, whatever the slide's class."""
from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def class_evidence(z: Tensor, classifier: nn.Module) -> Tensor:
    """Each patch's class evidence against the bag's mean patch, as a mass over the bag.

    Attention MIL trained on slide labels may decide a class by what is missing, so its attention
    marks the evidence of some classes only. Each patch's mass here is the KL divergence of the
    classifier's posterior for that patch alone from its posterior for the bag's mean patch:
    large where a patch speaks for a class differently from the slide's typical patch.

    Parameters
    ----------
    z : Tensor
        Projected patch features (N, hidden), as the classifier reads a pooled vector.
    classifier : nn.Module
        The bag classifier, (hidden,) -> (n_classes,) logits.

    Returns
    -------
    Tensor
        Mass (N,), summing to one (all zero when no patch differs from the mean), no gradient.
    """
    log_patch = torch.log_softmax(classifier(z), dim=1)
    log_bag = torch.log_softmax(classifier(z.mean(dim=0)), dim=0)
    # A KL divergence is >= 0, but a patch whose posterior is the bag's can come out a rounding
    # error below it (it did with torch 2.11 on a GPU machine's CPU), and a negative mass makes
    # every KL term against it NaN.
    divergence = (log_patch.exp() * (log_patch - log_bag)).sum(dim=1).clamp_min(0)
    return divergence / divergence.sum().clamp_min(1e-12)
