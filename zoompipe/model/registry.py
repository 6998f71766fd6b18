"""Slide classifiers by name, timm-style: ``create_model("clam_sb", in_dim=1024, n_classes=3)``.

A model class registers with :func:`register_model` and carries

- ``config_class``: the dataclass of its hyper-parameters (stored in a run's ``config.json``),
  taking ``in_dim``, ``n_classes`` and ``magnifications`` like every other;
- ``needs``: what it reads from a slide. ``"dense"``: every patch of its one magnification,
  ``forward([features], [])``. ``"zoom"``: every base patch, then only the children of the
  patches it selects, through ``infer(features, fetch_children)``.

and its ``forward(bags, children, label=None)`` returns a
:class:`~zoompipe.model.output.ModelOutput`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

from torch import nn

from zoompipe.errors import ZoompipeError

NEEDS = ("dense", "zoom")
_MODELS: dict[str, type[nn.Module]] = {}
M = TypeVar("M", bound=type[nn.Module])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator adding a model to the registry under ``name``."""
    def add(cls: M) -> M:
        if getattr(cls, "needs", None) not in NEEDS or not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(f"{cls.__name__} needs a config_class dataclass and needs in {NEEDS}")
        _MODELS[name] = cls
        return cls
    return add


def list_models() -> list[str]:
    """Registered architecture names."""
    return sorted(_MODELS)


def model_class(architecture: str) -> type[nn.Module]:
    """The class registered as ``architecture``.

    Raises
    ------
    ZoompipeError
        Unknown name.
    """
    if architecture not in _MODELS:
        raise ZoompipeError(f"unknown architecture {architecture!r}; choose one of {', '.join(list_models())}")
    return _MODELS[architecture]


def config_fields(architecture: str) -> set[str]:
    """Names of the hyper-parameters an architecture takes."""
    return {f.name for f in dataclasses.fields(model_class(architecture).config_class)}


def create_model(architecture: str, **config: Any) -> nn.Module:
    """Build a registered model from its hyper-parameters.

    Raises
    ------
    ZoompipeError
        Unknown architecture, unknown or missing hyper-parameters, or invalid values.
    """
    cls = model_class(architecture)
    try:
        settings = cls.config_class(**config)
    except (TypeError, ValueError) as err:
        raise ZoompipeError(f"{architecture}: invalid settings ({' '.join(str(err).split())})") from None
    return cls(settings)
