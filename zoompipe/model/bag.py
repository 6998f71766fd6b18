"""What the single-magnification models share: their base settings and the dense-bag interface."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from zoompipe.model.output import ModelOutput


@dataclass
class BagConfig:
    """Settings every single-magnification model takes.

    Parameters
    ----------
    in_dim : int
        Feature dimension of the patch embeddings.
    n_classes : int
        Number of slide classes.
    magnifications : list of float
        The one magnification whose patches form the bag (10x for the paper's baselines).
    hidden : int
        Width of the projected patch features.
    dropout : float
        Dropout after the projection.
    """

    in_dim: int
    n_classes: int
    magnifications: list[float] = field(default_factory=lambda: [10.0])
    hidden: int = 512
    dropout: float = 0.25

    def __post_init__(self) -> None:
        self.magnifications = [float(m) for m in self.magnifications]
        if len(self.magnifications) != 1 or self.magnifications[0] <= 0:
            raise ValueError(f"a bag model reads one positive magnification, got {self.magnifications}")
        if self.in_dim < 1 or self.n_classes < 2 or self.hidden < 1:
            raise ValueError(f"need in_dim >= 1, n_classes >= 2 and hidden >= 1, got "
                             f"{self.in_dim}, {self.n_classes} and {self.hidden}")


class BagModel(nn.Module):
    """A classifier of the whole bag of patches at one magnification.

    Subclasses implement :meth:`classify`; :meth:`forward` checks the inputs and fills in the
    rows, so that the engine and the heatmaps treat every such model alike.
    """

    needs = "dense"

    def __init__(self, config: BagConfig) -> None:
        super().__init__()
        self.config = config
        self.project = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout))

    def forward(self, bags: list[Tensor], children: list[Tensor], label: int | None = None) -> ModelOutput:
        """Classify one slide from the features (N, D) of every patch of its magnification.

        Parameters
        ----------
        bags : list of Tensor
            One bag of features.
        children : list of Tensor
            Empty: there is no next magnification.
        label : int, optional
            The slide's class, for a training loss that needs it (an ``aux_loss``).
        """
        if len(bags) != 1 or children:
            raise ValueError(f"{type(self).__name__} reads one magnification; got {len(bags)} bags")
        logits, attention, aux_loss = self.classify(self.project(bags[0]), label)
        return ModelOutput(logits=logits, rows=[torch.arange(len(bags[0]))], attention=[attention],
                           aux_loss=aux_loss)

    def classify(self, h: Tensor, label: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Logits (n_classes,), attention over the patches (N,) summing to one, training loss term or None."""
        raise NotImplementedError
