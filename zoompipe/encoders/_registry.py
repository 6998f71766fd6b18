"""Name -> builder table behind :func:`zoompipe.encoders.create_encoder`."""

from __future__ import annotations

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


_BUILDERS: dict[str, EncoderBuilder] = {}
_DEFAULT_WEIGHTS: dict[str, Callable[[], Path]] = {}


def register_encoder(
    name: str, default_weights: Callable[[], Path] | None = None
) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Decorator adding a builder to the registry under ``name``.

    A name ending in ``":"`` (``"timm:"``) registers a family: ``create_encoder("timm:x")``
    calls that builder with ``variant="x"``. ``default_weights``, for encoders whose default
    weights are a local file (shipped in a package), returns that file: a graph cached for it
    is then found without building the model.
    """

    def decorate(builder: EncoderBuilder) -> EncoderBuilder:
        if name in _BUILDERS:
            raise ValueError(f"encoder {name!r} is already registered")
        _BUILDERS[name] = builder
        if default_weights is not None:
            _DEFAULT_WEIGHTS[name] = default_weights
        return builder

    return decorate


def weights_file(name: str, weights: Path | None) -> Path | None:
    """The file the weights of encoder ``name`` come from: ``weights``, else its default
    weights' file where that is local, else None (weights from a hub)."""
    if weights is not None:
        return weights
    default = _DEFAULT_WEIGHTS.get(name)
    return default() if default is not None else None


def list_encoders() -> list[str]:
    """Registered encoder names, sorted; a family shows as ``"timm:<model>"``."""
    return sorted(key + "<model>" if key.endswith(":") else key for key in _BUILDERS)


def lookup(name: str) -> tuple[EncoderBuilder, str | None]:
    """The builder for ``name`` and the variant to pass it."""
    family, colon, variant = name.partition(":")
    builder = _BUILDERS.get(family + colon)
    if builder is None or (colon and not variant):
        raise ZoompipeError(
            f"unknown encoder {name!r}; choose one of: {', '.join(list_encoders())}"
        )
    return builder, (variant if colon else None)
