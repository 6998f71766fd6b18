"""What every MIL model returns for a slide."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ModelOutput:
    """A MIL model's prediction for one slide, with what each magnification looked at.

    Attributes
    ----------
    logits : Tensor
        Class logits, shape (n_classes,).
    rows : list of Tensor
        Per magnification, the global rows (CPU LongTensor) of the bag that was attended: every
        row at the base, the children of the selected patches above it.
    attention : list of Tensor
        Per magnification, the pooling attention over ``rows`` (sums to one).
    selected : list of Tensor
        Per magnification but the last, the global rows (CPU LongTensor, ascending) chosen for
        zooming.
    selection_scores : list of Tensor
        Per magnification but the last, the auxiliary head's raw scores over ``rows``; the
        ``selected`` rows are the top-K of these.
    aux_loss : Tensor, optional
        A training-only loss term, already weighted, that the training loop adds to the
        cross-entropy (None when the model has none).

    Notes
    -----
    A model on one magnification attends its whole bag: ``rows`` holds every row, and
    ``selected`` and ``selection_scores`` are empty. In ZoomMIL's training mode the bags above the base are soft mixtures of patches, which have no global
    rows, so only ``logits`` is filled and the lists are empty.
    """

    logits: Tensor
    rows: list[Tensor] = field(default_factory=list)
    attention: list[Tensor] = field(default_factory=list)
    selected: list[Tensor] = field(default_factory=list)
    selection_scores: list[Tensor] = field(default_factory=list)
    aux_loss: Tensor | None = None

    @property
    def probabilities(self) -> Tensor:
        """Class probabilities, shape (n_classes,)."""
        return torch.softmax(self.logits, dim=-1)
