"""ABMIL: gated-attention pooling of the patches of one magnification (Ilse et al., ICML 2018)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from zoompipe.model.attention import GatedAttention, masked_softmax
from zoompipe.model.bag import BagConfig, BagModel
from zoompipe.model.registry import register_model


@dataclass
class ABMILConfig(BagConfig):
    """:class:`~zoompipe.model.bag.BagConfig` and the hidden width of the attention."""

    attn_hidden: int = 256


@register_model("abmil")
class ABMIL(BagModel):
    """Attention-weighted mean of the projected patches, then a linear classifier."""

    config_class = ABMILConfig

    def __init__(self, config: ABMILConfig) -> None:
        super().__init__(config)
        self.attention = GatedAttention(config.hidden, config.attn_hidden)
        self.classifier = nn.Linear(config.hidden, config.n_classes)

    def classify(self, h: Tensor, label: int | None) -> tuple[Tensor, Tensor, None]:
        attention = masked_softmax(self.attention(h))
        return self.classifier(attention @ h), attention, None
