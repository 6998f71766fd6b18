"""Any timm model as an encoder: ``timm:<model_name>``, pooled pre-logit features.

``<model_name>`` is anything ``timm.create_model`` takes: a registry name with an optional
pretrained tag (``resnet50.a1_in1k``), or a hub name (``hf-hub:bioptimus/H0-mini``). Keyword
arguments for ``create_model`` follow a ``?``, joined by ``&``, so the name written into
feature files says how the model was built::

    timm:hf-hub:bioptimus/H0-mini?act_layer=torch.nn.SiLU&mlp_layer=timm.layers.SwiGLUPacked

Values are JSON (``224``, ``1e-5``, ``true``, ``"token"``) or, for layer arguments, the dotted
name of a class in ``timm.layers`` or ``torch.nn``; anything else is a plain string.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, ZoompipeError
from ._hub import create_pretrained
from ._registry import EncoderInfo, register_encoder
from ._weights import load_checked, read_state_dict
from .config import EncoderConfig

if TYPE_CHECKING:
    from torch import nn

PREFIX = "timm:"
#: Modules whose classes a kwarg may name; nothing else is imported from a name.
_CLASS_MODULES = ("timm.layers", "torch.nn")


def name_with_kwargs(name: str, kwargs: dict[str, Any]) -> str:
    """``name`` with ``kwargs`` appended in the canonical ``?key=value&...`` form.

    Raises
    ------
    UsageError
        ``name`` is not a ``timm:`` name, or a value cannot be written (a class outside
        ``timm.layers`` and ``torch.nn``, an object).
    """
    if not name.startswith(PREFIX):
        raise UsageError(f"model kwargs are for timm:<model> encoders, not {name}")
    base, _, query = name.partition("?")
    merged = {**parse_kwargs(query), **kwargs} if query else dict(kwargs)
    parts = []
    for key, value in sorted(merged.items()):
        if isinstance(value, type):
            public = [m for m in _CLASS_MODULES if getattr(importlib.import_module(m), value.__name__, None) is value]
            if not public:
                raise UsageError(f"kwarg {key}: name a class of {' or '.join(_CLASS_MODULES)}, not {value}")
            value = f"{public[0]}.{value.__name__}"
        elif not isinstance(value, str):
            try:
                value = json.dumps(value)
            except TypeError:
                raise UsageError(f"kwarg {key}: {value!r} cannot be written into an encoder name") from None
        parts.append(f"{key}={value}")
    return f"{base}?{'&'.join(parts)}"


def _importable(dotted: str) -> bool:
    return any(dotted.startswith(module + ".") for module in _CLASS_MODULES)


def parse_kwargs(query: str) -> dict[str, Any]:
    """``"a=1&mlp_layer=timm.layers.SwiGLUPacked"`` -> ``{"a": 1, "mlp_layer": <class>}``."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise UsageError(f"model kwarg {item!r} is not key=value")
        kwargs[key] = _value(key, text)
    return kwargs


def _value(key: str, text: str) -> Any:
    module, _, attr = text.rpartition(".")
    if key.endswith("_layer") and _importable(text):
        # The public timm.layers / torch.nn namespaces re-export the classes by short name.
        for public in _CLASS_MODULES:
            if module.startswith(public):
                found = getattr(importlib.import_module(public), attr, None)
                if isinstance(found, type):
                    return found
        raise UsageError(f"model kwarg {key}: no class {text}")
    try:
        return json.loads(text)
    except ValueError:
        return text


@register_encoder(PREFIX, info=EncoderInfo(
    feature_dim=None, input_size=None, licence="the model's", source="timm (hf-hub: names from the hub)",
    hub_page="https://huggingface.co/timm"))
def timm_model(
    weights: Path | None, variant: str | None
) -> tuple[nn.Module, EncoderConfig]:
    """A timm model without its classifier, normalised as its pretrained config says.

    ``variant`` is a timm model name with optional kwargs (see the module docstring).
    ``weights`` is a state dict for that model; classifier tensors in it are ignored. Without
    it the model's default weights come from the hub.
    """
    import timm

    name = PREFIX + variant
    arch, _, query = variant.partition("?")
    kwargs = parse_kwargs(query)
    from_hub = arch.startswith(("hf-hub:", "hf_hub:"))
    if not from_hub and not timm.is_model(arch):
        raise ZoompipeError(f"unknown encoder {name!r}: timm has no model {arch!r}")
    kwargs.setdefault("num_classes", 0)
    try:
        if weights is None:
            model = create_pretrained(arch, name, **kwargs)
        else:
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as err:
        # timm raises RuntimeError for an unknown pretrained tag ("resnet50.nope").
        raise ZoompipeError(f"unknown encoder {name!r}: {err}") from None
    except TypeError as err:
        raise UsageError(f"encoder {name!r}: {err}") from None
    except OSError as err:
        # hf-hub: names need the repository's config.json even without its weights.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ZoompipeError(f"encoder {name!r}: cannot fetch {arch}'s config ({reason}); put the "
                            "repository in the Hugging Face cache, or name its folder as timm:local-dir:FOLDER") from None
    cfg = model.pretrained_cfg
    if weights is not None:
        heads = cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        load_checked(
            model, read_state_dict(weights), source=str(weights), encoder=name,
            ignore_prefixes=tuple(head + "." for head in heads),
        )
    config = EncoderConfig(
        name=name,
        # head_hidden_size differs from num_features where a pre-logits layer follows pooling.
        feature_dim=getattr(model, "head_hidden_size", None) or model.num_features,
        weights=str(weights) if weights is not None else f"timm {arch}",
        input_size=cfg["input_size"][-1],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation") or "bilinear",
    )
    return model, config
