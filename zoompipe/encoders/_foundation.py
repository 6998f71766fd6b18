"""Pathology foundation models: a model built from its published facts, weights from its hub.

Each family file (``uni.py``, ``virchow.py``...) declares its models as :class:`FoundationModel`
records and registers them with :func:`register_foundation`. Weights come from a file or folder
the user names (``--weights``), else from the Hugging Face cache, else from the hub
(:func:`~zoompipe.encoders._hub.locate_weights`). Their identity is the SHA-256 of the file
loaded, so features are tied to the exact weights that made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..contract import file_sha256
from ._hub import HubFile, locate_weights
from ._registry import EncoderInfo, register_encoder
from ._weights import load_checked, read_state_dict
from .config import EncoderConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: Bioptimus' normalisation (H-optimus-0, H-optimus-1, H0-mini).
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


@dataclass(frozen=True)
class FoundationModel:
    """A patch encoder published with its weights on a hub.

    Attributes
    ----------
    name : str
        Registry name.
    hub : HubFile
        Where the weights are published.
    licence, params : str
        As the model card gives them.
    gated : bool
        Whether the hub asks users to accept terms before downloading.
    architecture : callable
        Builds the module the weights load into, on the current default device.
    feature_dim, input_size : int
    normalisation : ((mean), (std))
    interpolation : str
    resize_to : int, optional
        See :class:`EncoderConfig`.
    convert : callable, optional
        ``(state_dict, module) -> state_dict``: the hub file's key names (and layout) mapped
        onto the module's, as the model's own code does.
    ignore_prefixes : tuple of str
        Keys of the file that the feature model does not use (a pooler, a mask token).
    head : callable, optional
        Wraps the loaded module into the feature model (class token and mean patch token).
    """

    name: str
    hub: HubFile
    licence: str
    gated: bool
    params: str
    architecture: Callable[[], nn.Module]
    feature_dim: int
    input_size: int = 224
    normalisation: tuple[tuple[float, float, float], tuple[float, float, float]] = IMAGENET
    interpolation: str = "bilinear"
    resize_to: int | None = None
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None
    ignore_prefixes: tuple[str, ...] = ()
    head: Callable[[nn.Module], nn.Module] | None = None

    def build(self, weights: Path, device: str = "cpu") -> nn.Module:
        """The feature model with the weights of file ``weights`` loaded.

        On ``device="meta"`` nothing is allocated and the file's tensors are not read: the
        names and shapes of its state dict are checked against the architecture only.

        Raises
        ------
        ZoompipeError
            The file is unreadable or does not fit the architecture (one line saying how).
        """
        import torch

        with torch.device(device):
            model = self.architecture()
        state = read_state_dict(weights, meta=device == "meta")
        if self.convert is not None:
            state = self.convert(state, model)
        load_checked(model, state, source=str(weights), encoder=self.name, ignore_prefixes=self.ignore_prefixes)
        return (self.head(model) if self.head is not None else model).eval()

    def config(self, weights: str) -> EncoderConfig:
        """The encoder's config, with ``weights`` as the weights' identity."""
        mean, std = self.normalisation
        return EncoderConfig(name=self.name, feature_dim=self.feature_dim, weights=weights,
                             input_size=self.input_size, mean=mean, std=std,
                             interpolation=self.interpolation, resize_to=self.resize_to)

    @property
    def info(self) -> EncoderInfo:
        return EncoderInfo(feature_dim=self.feature_dim, input_size=self.input_size, licence=self.licence,
                           gated=self.gated, source=f"hub {self.hub.repo_id}", hub_page=self.hub.page,
                           params=self.params)


_FOUNDATION: dict[str, FoundationModel] = {}


def register_foundation(model: FoundationModel) -> FoundationModel:
    """Add ``model`` to the encoder registry under ``model.name``; returns it."""

    def build(weights: Path | None, variant: str | None) -> tuple[nn.Module, EncoderConfig]:
        # The registry's locator has already turned None or a folder into the file.
        path = locate_weights(model.hub, model.name, weights)
        return model.build(path), model.config(file_sha256(path))

    register_encoder(model.name, locate_weights=partial(locate_weights, model.hub, model.name),
                     info=model.info)(build)
    _FOUNDATION[model.name] = model
    return model


def timm_vit(arch: str, swiglu: bool = False, **kwargs: object) -> Callable[[], nn.Module]:
    """A builder of timm model ``arch`` with ``kwargs``, no pretrained weights, no classifier.

    ``swiglu`` adds timm's packed SwiGLU MLP with SiLU (``mlp_layer=SwiGLUPacked,
    act_layer=SiLU``), as Virchow, UNI2-h and H0-mini are built.
    """

    def build() -> nn.Module:
        import timm
        from torch import nn

        extra = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU} if swiglu else {}
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs, **extra)

    return build


def cls_mean_pool(vit: nn.Module) -> nn.Module:
    """concat(class token, mean of the patch tokens after the registers) of a timm ViT."""
    from ._layers import ClsMeanPool

    return ClsMeanPool(vit)


def check_weights(name: str, weights: Path | None = None) -> tuple[Path, str]:
    """Find the weights of foundation model ``name`` and check them against its architecture.

    The check reads names and shapes only (the model is built on the ``meta`` device), so a
    downloaded or copied file of gigabytes is vetted in seconds, before a run relies on it.

    Parameters
    ----------
    name : str
        A foundation model's registry name.
    weights : Path, optional
        A file or folder, as ``--weights`` takes it; None looks in the Hugging Face cache,
        then the hub.

    Returns
    -------
    path : Path
        The weights file.
    identity : str
        ``sha256:<hex>``, as feature files record it.

    Raises
    ------
    ZoompipeError
        ``name`` is not a foundation model; the weights cannot be found or do not fit.
    """
    from ..errors import ZoompipeError

    model = _FOUNDATION.get(name)
    if model is None:
        raise ZoompipeError(f"{name!r} is not a hub model; check one of: {', '.join(sorted(_FOUNDATION))}")
    path = locate_weights(model.hub, name, weights)
    model.build(path, device="meta")
    return path, file_sha256(path)
