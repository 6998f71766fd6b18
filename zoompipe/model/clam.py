"""CLAM-SB: single-branch attention MIL with an instance-level clustering loss (Lu et al., 2021).

Besides the gated-attention pooling of ABMIL, each class has an instance classifier. During
training, the K most attended patches of a slide are pseudo-labelled positive for its class
and the K least attended negative; for the other classes (more than two classes), the K most
attended are negative. The cross-entropy of those instance predictions, weighted, is the
model's ``aux_loss``: it shapes the attention into class evidence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoompipe.model.attention import GatedAttention, masked_softmax
from zoompipe.model.bag import BagConfig, BagModel
from zoompipe.model.registry import register_model


@dataclass
class CLAMConfig(BagConfig):
    """:class:`~zoompipe.model.bag.BagConfig` and the instance loss.

    Parameters
    ----------
    attn_hidden : int
        Hidden width of the gated attention.
    k_sample : int
        Patches pseudo-labelled at each end of the attention ranking (capped at half the bag).
    instance_weight : float
        Weight of the instance loss added to the slide cross-entropy (CLAM: 0.3 against 0.7).
    """

    attn_hidden: int = 256
    k_sample: int = 8
    instance_weight: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k_sample < 1 or self.instance_weight < 0:
            raise ValueError(f"need k_sample >= 1 and instance_weight >= 0, got {self.k_sample}, "
                             f"{self.instance_weight}")


@register_model("clam_sb")
class CLAMSB(BagModel):
    """CLAM, single attention branch."""

    config_class = CLAMConfig

    def __init__(self, config: CLAMConfig) -> None:
        super().__init__(config)
        self.attention = GatedAttention(config.hidden, config.attn_hidden)
        self.classifier = nn.Linear(config.hidden, config.n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(config.hidden, 2) for _ in range(config.n_classes))

    def classify(self, h: Tensor, label: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        scores = self.attention(h)
        attention = masked_softmax(scores)
        logits = self.classifier(attention @ h)
        aux = None
        if self.training and label is not None:
            aux = self.config.instance_weight * self.instance_loss(h, scores, int(label))
        return logits, attention, aux

    def instance_loss(self, h: Tensor, scores: Tensor, label: int) -> Tensor:
        """Mean cross-entropy of the pseudo-labelled patches over the classes that get some."""
        k = min(self.config.k_sample, len(h) // 2)
        if k == 0:
            return h.new_zeros(())
        top, bottom = scores.topk(k).indices, (-scores).topk(k).indices
        losses = []
        for cls, head in enumerate(self.instance_classifiers):
            if cls == label:
                rows = torch.cat([top, bottom])
                targets = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            elif self.config.n_classes > 2:
                rows, targets = top, torch.zeros(k, dtype=torch.long)
            else:
                continue
            losses.append(F.cross_entropy(head(h[rows]), targets.to(h.device)))
        return torch.stack(losses).mean()
