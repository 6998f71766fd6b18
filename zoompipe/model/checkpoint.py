"""Run folders: ``model.safetensors`` (weights) and ``config.json`` (model and pipeline settings).

Weights are only ever read with safetensors, never unpickled, so a run folder from elsewhere
cannot execute code. ``config.json`` holds::

    {"model": <ZoomMILConfig.to_dict()>, "class_names": [...], <pipeline keys>,
     "zoompipe_version": "..."}

where the pipeline keys (encoder, magnifications, mpp, patch_size, tissue, ...) are whatever the
caller passes, stored verbatim, so that a predictor can redo the preprocessing the model was
trained with.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zoompipe import __version__
from zoompipe.atomic import atomic_path, write_text
from zoompipe.errors import CheckpointError
from zoompipe.model.zoommil import ZoomMIL, ZoomMILConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# torch.save writes a zip archive; plain pickles start with the PROTO opcode.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def save_run(
    run_dir: str | os.PathLike,
    model: ZoomMIL,
    class_names: Sequence[str],
    pipeline: dict[str, Any],
) -> Path:
    """Write a model and its settings to a run folder, replacing any previous ones atomically.

    Parameters
    ----------
    run_dir : path
        Run folder, created if needed.
    model : ZoomMIL
        Model to save.
    class_names : sequence of str
        Class name of each output, in order.
    pipeline : dict
        JSON-serialisable preprocessing settings, stored verbatim at the top level of
        ``config.json``; may not use the keys ``model``, ``class_names`` or
        ``zoompipe_version``.

    Returns
    -------
    Path
        The run folder.
    """
    reserved = {"model", "class_names", "zoompipe_version"} & pipeline.keys()
    if reserved:
        raise ValueError(f"pipeline metadata may not set {sorted(reserved)}")
    if len(class_names) != model.config.n_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model.config.n_classes} classes"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model": model.config.to_dict(),
        "class_names": list(class_names),
        **pipeline,
        "zoompipe_version": __version__,
    }
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS_NAME) as tmp:
        save_file(weights, str(tmp))
    write_text(run_dir / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return run_dir


def load_run(
    run_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[ZoomMIL, dict[str, Any]]:
    """Load a run folder written by :func:`save_run`.

    Parameters
    ----------
    run_dir : path
        Run folder.
    device : str or torch.device
        Device to put the model on.

    Returns
    -------
    model : ZoomMIL
        The model, in eval mode.
    config : dict
        Contents of ``config.json``.

    Raises
    ------
    CheckpointError
        If a file is missing, not valid JSON or safetensors, or the weights do not fit the
        configuration.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    config = _read_config(run_dir / CONFIG_NAME)
    try:
        model = ZoomMIL(ZoomMILConfig.from_dict(config["model"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{run_dir / CONFIG_NAME}: invalid model settings ({_one_line(exc)})"
        ) from None
    if len(config["class_names"]) != model.config.n_classes:
        raise CheckpointError(
            f"{run_dir / CONFIG_NAME}: {len(config['class_names'])} class names for a model with "
            f"{model.config.n_classes} classes"
        )
    weights = _read_weights(run_dir / WEIGHTS_NAME)
    _check_shapes(weights, model, run_dir)
    model.load_state_dict(weights)
    return model.to(device).eval(), config


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; a run folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )


def _read_config(path: Path) -> dict[str, Any]:
    _require_file(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({_one_line(exc)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' settings")
    if not isinstance(config.get("class_names"), list):
        raise CheckpointError(f"{path} has no 'class_names' list")
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    _require_file(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        with path.open("rb") as f:
            head = f.read(4)
        if head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(
                f"{path} is a pickle (torch.save) file, which zoompipe never loads; "
                "save the weights with safetensors"
            ) from None
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({_one_line(exc)})"
        ) from None


def _check_shapes(weights: dict[str, torch.Tensor], model: ZoomMIL, run_dir: Path) -> None:
    # load_state_dict would report these as a multi-line RuntimeError.
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    where = f"{run_dir / WEIGHTS_NAME} does not match {CONFIG_NAME}"
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} missing tensors (first: {missing[0]})")
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} unexpected tensors (first: {unexpected[0]})"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(weights[name].shape)}, expected {shape}"
            )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
