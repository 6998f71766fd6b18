"""CTransPath: Swin-T with a convolutional stem, mean-pooled 768-d features.

No official hub repository exists; TRIDENT downloads CHIEF's retrained weights from the
``MahmoodLab/hest-bench`` dataset (gated). The checkpoint comes from TransPath's fork of timm
0.5.4, whose Swin places each patch-merging layer at the end of a stage and stores attention
masks; timm's own Swin loader maps that layout onto today's, and is used here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._foundation import FoundationModel, register_foundation
from ._hub import HubFile

if TYPE_CHECKING:
    import torch
    from torch import nn


def _swin() -> nn.Module:
    import timm

    from ._layers import ConvStem

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem)


def _old_swin_layout(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


CTRANSPATH = register_foundation(FoundationModel(
    name="ctranspath",
    hub=HubFile("MahmoodLab/hest-bench", ("CHIEF_CTransPath.pth",), subfolder="fm_v1/ctranspath",
                repo_type="dataset"),
    licence="GPL-3.0 (CHIEF weights: AGPL-3.0)", gated=True, params="28M",
    architecture=_swin, feature_dim=768, convert=_old_swin_layout, ignore_prefixes=("head.",),
))
