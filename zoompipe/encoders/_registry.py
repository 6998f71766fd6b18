"""Name -> builder table behind :func:`zoompipe.encoders.create_encoder`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ..errors import ZoompipeError
from .config import EncoderConfig

if TYPE_CHECKING:
    from torch import nn


class EncoderBuilder(Protocol):
    """Builds a frozen feature extractor and the config that goes with it.

    A builder receives ``weights`` (a state-dict file, or None for the encoder's default
    weights) and, for a family such as ``timm:``, the part of the name after the colon as
    ``variant``. It returns a module mapping normalised ``(B, 3, S, S)`` float tensors to
    ``(B, feature_dim)`` features, and its :class:`EncoderConfig`.
    """

    def __call__(
        self, weights: Path | None, variant: str | None
    ) -> tuple[nn.Module, EncoderConfig]: ...


@dataclass(frozen=True)
class EncoderInfo:
    """What ``zoompipe encoders`` lists about an encoder, known without building it.

    Attributes
    ----------
    feature_dim, input_size : int or None
        None where they depend on the model chosen (``timm:<model>``).
    licence : str
        Licence of the weights.
    gated : bool
        Whether the hub asks users to accept terms (and a token) before downloading.
    source : str
        Where the default weights come from.
    hub_page : str
        Web page of the weights, for gated models the page where the terms are accepted.
    params : str
        Parameter count, as the model card gives it.
    """

    feature_dim: int | None
    input_size: int | None
    licence: str
    gated: bool = False
    source: str = ""
    hub_page: str = ""
    params: str = ""


#: Finds the weights file of an encoder from what the user gave (a file, a folder or nothing).
Locator = Callable[[Path | None], Path | None]

_BUILDERS: dict[str, EncoderBuilder] = {}
_LOCATORS: dict[str, Locator] = {}
_INFO: dict[str, EncoderInfo] = {}


def register_encoder(
    name: str, locate_weights: Locator | None = None, info: EncoderInfo | None = None
) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Decorator adding a builder to the registry under ``name``.

    A name ending in ``":"`` (``"timm:"``) registers a family: ``create_encoder("timm:x")``
    calls that builder with ``variant="x"``. ``locate_weights`` turns what the user passed
    (a file, a folder laid out as a hub snapshot, or None for the default weights) into the
    weights file the builder gets; with it, the weights' digest is known before the model is
    built, so a cached graph is found without building it and mismatched weights are refused
    before minutes of loading. ``info`` is what ``zoompipe encoders`` lists.
    """

    def decorate(builder: EncoderBuilder) -> EncoderBuilder:
        if name in _BUILDERS:
            raise ValueError(f"encoder {name!r} is already registered")
        _BUILDERS[name] = builder
        if locate_weights is not None:
            _LOCATORS[name] = locate_weights
        if info is not None:
            _INFO[name] = info
        return builder

    return decorate


def weights_file(name: str, weights: Path | None) -> Path | None:
    """The file the weights of encoder ``name`` come from: ``weights`` (or the file inside
    that folder), else its default weights' file where that is local or cached, else None
    (weights that a hub library fetches itself).

    Raises
    ------
    ZoompipeError
        The weights cannot be found (see the encoder's locator for the message).
    """
    if weights is not None and not weights.exists():
        raise ZoompipeError(f"weights file not found: {weights}")
    locate = _LOCATORS.get(name.partition(":")[0] + (":" if ":" in name else ""))
    if locate is not None:
        return locate(weights)
    if weights is not None and weights.is_dir():
        raise ZoompipeError(f"encoder {name} takes a weights file, not a folder: {weights}")
    return weights


def list_encoders() -> list[str]:
    """Registered encoder names, sorted; a family shows as ``"timm:<model>"``."""
    return sorted(key + "<model>" if key.endswith(":") else key for key in _BUILDERS)


def encoder_info(name: str) -> EncoderInfo | None:
    """What the registry knows of ``name`` (a name of :func:`list_encoders`) without building it."""
    return _INFO.get(name.removesuffix("<model>"))


def lookup(name: str) -> tuple[EncoderBuilder, str | None]:
    """The builder for ``name`` and the variant to pass it."""
    family, colon, variant = name.partition(":")
    builder = _BUILDERS.get(family + colon)
    if builder is None or (colon and not variant):
        raise ZoompipeError(
            f"unknown encoder {name!r}; choose one of: {', '.join(list_encoders())}"
        )
    return builder, (variant if colon else None)
