"""ONNX graphs of encoders, exported once per encoder and weights and kept in the user's cache.

A graph is named by the encoder, its input size and a digest of its weights, so new weights
(``--weights``, another package version) get a new graph and old ones are never served
stale. Each export is written under a temporary name and renamed once it has been checked:
two processes exporting at once each write their own file and the last rename wins, and a
reader only ever sees a complete, checked graph.

A graph made from a weights file is also indexed by that file's digest, so the next run finds
it without building the model (and without importing timm): half a second instead of three.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import __version__
from ..atomic import atomic_path, write_text
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


def _index_path(name: str, source: Path) -> Path:
    # The same file through the same code gives the same graph; the versions of zoompipe and
    # timm stand for the code that builds the model.
    digest = hashlib.sha256(f"{name}|{__version__}|{metadata.version('timm')}|".encode())
    with open(source, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return cache_dir() / "onnx" / "by-file" / f"{digest.hexdigest()[:24]}.json"


def find_graph(name: str, source: Path) -> tuple[Path, EncoderConfig] | None:
    """The cached graph and config of encoder ``name`` built from weights file ``source``."""
    try:
        entry = json.loads(_index_path(name, source).read_text())
    except (OSError, ValueError):
        return None
    graph = cache_dir() / "onnx" / entry["graph"]
    config = {**entry["config"], "mean": tuple(entry["config"]["mean"]), "std": tuple(entry["config"]["std"])}
    return (graph, EncoderConfig(**config)) if graph.exists() else None


def remember_graph(name: str, source: Path, graph: Path, config: EncoderConfig) -> None:
    """Index ``graph`` under weights file ``source``, for :func:`find_graph`."""
    index = _index_path(name, source)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        write_text(index, json.dumps({"graph": graph.name, "config": asdict(config)}))
    except OSError:
        pass  # a read-only cache only costs the next run a model build


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
    model: nn.Module, config: EncoderConfig, check: Callable[[Path], None], path: Path | None = None
) -> tuple[Path, bool]:
    """The cached ONNX graph of ``model``, exported and checked first if there is none.

    Parameters
    ----------
    model : torch.nn.Module
        The encoder's feature model, float32.
    config : EncoderConfig
    check : callable
        Called on a freshly exported graph before it is cached; raises to refuse it.
    path : Path, optional
        ``graph_path(model, config)`` when the caller has it (it hashes every weight).

    Returns
    -------
    path : Path
    exported : bool
        Whether this call exported the graph (False when it came from the cache).
    """
    path = path or graph_path(model, config)
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        export_onnx(model, config, tmp)
        check(tmp)
    return path, True
