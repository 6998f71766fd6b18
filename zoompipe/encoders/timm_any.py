"""Any timm model as an encoder: ``timm:<model_name>``, pooled pre-logit features."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ZoompipeError
from ._hub import create_pretrained
from ._registry import register_encoder
from ._weights import load_checked, read_state_dict
from .config import EncoderConfig

if TYPE_CHECKING:
    from torch import nn

PREFIX = "timm:"


@register_encoder(PREFIX)
def timm_model(
    weights: Path | None, variant: str | None
) -> tuple[nn.Module, EncoderConfig]:
    """A timm model without its classifier, normalised as its pretrained config says.

    ``variant`` is a timm model name, optionally with a pretrained tag
    (``"resnet50.a1_in1k"``). ``weights`` is a state dict for that model; classifier
    tensors in it are ignored. Without it the model's default weights come from the hub.
    """
    import timm

    name = PREFIX + variant
    if not timm.is_model(variant):
        raise ZoompipeError(f"unknown encoder {name!r}: timm has no model {variant!r}")
    try:
        if weights is None:
            model = create_pretrained(variant, name, num_classes=0)
        else:
            model = timm.create_model(variant, pretrained=False, num_classes=0)
    except RuntimeError as err:
        # timm raises RuntimeError for an unknown pretrained tag ("resnet50.nope").
        raise ZoompipeError(f"unknown encoder {name!r}: {err}") from None
    cfg = model.pretrained_cfg
    if weights is not None:
        heads = cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        load_checked(
            model, read_state_dict(weights), source=str(weights), encoder=name,
            ignore_prefixes=tuple(head + "." for head in heads),
        )
    config = EncoderConfig(
        name=name,
        # head_hidden_size differs from num_features where a pre-logits layer follows pooling.
        feature_dim=getattr(model, "head_hidden_size", None) or model.num_features,
        weights=str(weights) if weights is not None else f"timm {variant}",
        input_size=cfg["input_size"][-1],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    return model, config
