"""What an encoder is, apart from its weights: name, feature size, input and normalisation.

Kept free of torch so that the registry, and the CLI's help that lists it, load in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What ``--precision`` takes: ``auto`` resolves per machine (``encoder.resolve_precision``);
#: int8 is an opt-in for OpenVINO on CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class EncoderConfig:
    """What a feature file needs to know about the encoder that produced it.

    Attributes
    ----------
    name : str
        Stable identifier written into every feature file (``"efficientnet_lite0"``,
        ``"resnet50_trunc"``, ``"timm:<model>"``); features are only comparable between
        files with the same name and weights.
    feature_dim : int
        Length of one patch feature vector.
    weights : str
        Where the weights came from (a package, a hub tag or a file path).
    input_size : int
        Side in pixels the model sees. Patches of another size are resized, as CLAM and
        TRIDENT do when they feed 256 px patches to ImageNet models at 224 px.
    mean, std : tuple of float
        Per-channel RGB normalisation in [0, 1] units (timm's convention): the model sees
        ``(pixel / 255 - mean) / std``.
    interpolation : str
        ``torch.nn.functional.interpolate`` mode of that resize, always antialiased so that
        downscaling averages pixels like PIL does instead of skipping them.
    resize_to : int, optional
        Side patches are resized to before a centre crop of ``input_size`` (Prov-GigaPath:
        resize 256, crop 224); None resizes straight to ``input_size``.
    """

    name: str
    feature_dim: int
    weights: str
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    resize_to: int | None = None
