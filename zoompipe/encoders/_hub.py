"""Creating timm models with hub weights, failing with the offline fix spelled out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ZoompipeError

if TYPE_CHECKING:
    from torch import nn


def create_pretrained(arch: str, encoder: str, **kwargs: object) -> nn.Module:
    """``timm.create_model(arch, pretrained=True)``, or a one-line error naming ``--weights``.

    timm falls back to random weights with only a log warning when a model has none
    published, so that case is refused before creating anything.
    """
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ZoompipeError(
            f"timm publishes no weights for {arch}; pass --weights FILE for encoder {encoder}"
        )
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as err:
        # huggingface_hub and requests errors are OSErrors; the cause is kept chained.
        raise ZoompipeError(
            f"cannot download weights {arch} for encoder {encoder} (offline?); "
            "pass --weights FILE with a state dict (.safetensors or torch file)"
        ) from err
