"""ResNet-50 cut after layer3: the 1024-d encoder of the ZoomMIL paper and of CLAM."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._hub import create_pretrained
from ._registry import EncoderInfo, register_encoder
from ._weights import load_checked, read_state_dict
from .config import EncoderConfig

if TYPE_CHECKING:
    from torch import nn

NAME = "resnet50_trunc"
TIMM_ARCH = "resnet50.tv_in1k"


@register_encoder(NAME, info=EncoderInfo(
    feature_dim=1024, input_size=224, licence="BSD-3-Clause (torchvision)", source=f"hub timm/{TIMM_ARCH}",
    hub_page=f"https://huggingface.co/timm/{TIMM_ARCH}", params="8.5M"))
def resnet50_trunc(
    weights: Path | None, variant: str | None
) -> tuple[nn.Module, EncoderConfig]:
    """ImageNet ResNet-50 up to layer3, then global average pooling: 1024-d features.

    ``weights`` is a ResNet-50 state dict with torchvision's (= timm's) key names; its
    ``layer4`` and ``fc`` tensors, if present, are ignored. Without it the torchvision
    ImageNet weights are fetched from the Hugging Face hub.
    """
    import timm
    from torch import nn

    if weights is None:
        model = create_pretrained(TIMM_ARCH, NAME)
    else:
        model = timm.create_model(TIMM_ARCH, pretrained=False)
    # Identity in place of layer4 and fc keeps timm's forward (stem, layers, pooling) and
    # its parameter names, so full and trunk-only state dicts both load by name.
    model.layer4 = nn.Identity()
    model.reset_classifier(0)
    if weights is not None:
        load_checked(
            model, read_state_dict(weights), source=str(weights), encoder=NAME,
            ignore_prefixes=("layer4.", "fc."),
        )
    config = EncoderConfig(
        name=NAME,
        feature_dim=1024,
        weights=str(weights) if weights is not None else f"timm {TIMM_ARCH}",
        mean=tuple(model.pretrained_cfg["mean"]),
        std=tuple(model.pretrained_cfg["std"]),
    )
    return model, config
