"""ONNX graphs of encoders, exported once per encoder and weights and kept in the user's cache.

A graph is named by the encoder, its input size and a digest of its weights, so new weights
(``--weights``, another package version) get a new graph and old ones are never served
stale. Each export is written under a temporary name and renamed once it has been checked:
two processes exporting at once each write their own file and the last rename wins, and a
reader only ever sees a complete, checked graph.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..atomic import atomic_path
from .config import EncoderConfig

if TYPE_CHECKING:
    from torch import nn

# The TorchScript exporter covers the CNNs and ViTs of the registry; opset 17 is the oldest
# with LayerNormalization, which keeps ViT graphs to one node per norm.
OPSET = 17


def cache_dir() -> Path:
    """zoompipe's cache folder: ``$ZOOMPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/zoompipe``,
    else ``~/.cache/zoompipe``."""
    if os.environ.get("ZOOMPIPE_CACHE_DIR"):
        return Path(os.environ["ZOOMPIPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zoompipe"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state dict, with its name, dtype and shape."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # Raw bytes as uint8: bf16 and friends have no numpy dtype.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def graph_path(model: nn.Module, config: EncoderConfig) -> Path:
    """Where the ONNX graph of ``model`` under ``config`` is cached."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.name)
    return cache_dir() / "onnx" / f"{name}-{config.input_size}px-{weights_digest(model)[:20]}.onnx"


def export_onnx(model: nn.Module, config: EncoderConfig, path: Path) -> None:
    """Write ``model`` as an ONNX graph taking normalised ``(B, 3, S, S)`` float32 input."""
    import torch

    example = torch.zeros(2, 3, config.input_size, config.input_size)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the torch.export one, which
        # fails on timm's EfficientNets in torch 2.14; its tracer warnings are about control
        # flow that a frozen encoder does not have.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (example,), str(path), input_names=["pixels"], output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET,
            dynamo=False,
        )


def cached_graph(
    model: nn.Module, config: EncoderConfig, check: Callable[[Path], None]
) -> tuple[Path, bool]:
    """The cached ONNX graph of ``model``, exported and checked first if there is none.

    Parameters
    ----------
    model : torch.nn.Module
        The encoder's feature model, float32.
    config : EncoderConfig
    check : callable
        Called on a freshly exported graph before it is cached; raises to refuse it.

    Returns
    -------
    path : Path
    exported : bool
        Whether this call exported the graph (False when it came from the cache).
    """
    path = graph_path(model, config)
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        export_onnx(model, config, tmp)
        check(tmp)
    return path, True
