"""Run folders: ``model.safetensors`` (weights) and ``config.json`` (a :class:`RunConfig`).

Weights are only ever read with safetensors, never unpickled, so a run folder from elsewhere
cannot execute code. ``config.json`` is one versioned record: the architecture and its
hyper-parameters (rebuilt with :func:`~zoompipe.model.registry.create_model`), the class
names, and the pipeline contract the training features share, so that a predictor can redo
the preprocessing the model was trained with.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from zoompipe.atomic import atomic_path, write_text
from zoompipe.contract import PipelineContract
from zoompipe.errors import CheckpointError, ZoompipeError, one_line
from zoompipe.model.registry import create_model
from zoompipe.run_config import CONFIG_NAME, WEIGHTS_NAME, RunConfig, read_run_config, require_file

# torch.save writes a zip archive; plain pickles start with the PROTO opcode.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class Run(NamedTuple):
    """A loaded run: the model, in eval mode, and its configuration."""

    model: nn.Module
    config: RunConfig


def save_run(
    run_dir: str | os.PathLike,
    model: nn.Module,
    architecture: str,
    class_names: Sequence[str],
    pipeline: PipelineContract | None,
) -> Path:
    """Write a model and its settings to a run folder, replacing any previous ones atomically.

    Parameters
    ----------
    run_dir : path
        Run folder, created if needed.
    model : nn.Module
        A registered model (its ``config`` is a dataclass).
    architecture : str
        The name it is registered under.
    class_names : sequence of str
        Class name of each output, in order.
    pipeline : PipelineContract or None
        The training features' contract (:func:`~zoompipe.dataset.agreed_contract`).

    Returns
    -------
    Path
        The run folder.
    """
    if len(class_names) != model.config.n_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model.config.n_classes} classes"
        )
    config = RunConfig(architecture=architecture, model=dataclasses.asdict(model.config),
                       class_names=list(class_names), pipeline=pipeline)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS_NAME) as tmp:
        save_file(weights, str(tmp))
    write_text(run_dir / CONFIG_NAME, config.to_json(indent=2) + "\n")
    return run_dir


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """Load a run folder written by :func:`save_run`.

    Parameters
    ----------
    run_dir : path
        Run folder.
    device : str or torch.device
        Device to put the model on.

    Returns
    -------
    Run
        ``(model, config)``, the model in eval mode.

    Raises
    ------
    CheckpointError, ContractError
        If a file is missing, not valid JSON or safetensors, written by another schema version,
        or the weights do not fit the configuration.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    try:
        model = create_model(config.architecture, **config.model)
    except ZoompipeError as exc:
        raise CheckpointError(f"{run_dir / CONFIG_NAME}: {exc}") from None
    if len(config.class_names) != model.config.n_classes:
        raise CheckpointError(
            f"{run_dir / CONFIG_NAME}: {len(config.class_names)} class names for a model with "
            f"{model.config.n_classes} classes"
        )
    weights = _read_weights(run_dir / WEIGHTS_NAME)
    _check_shapes(weights, model, run_dir)
    model.load_state_dict(weights)
    return Run(model.to(device).eval(), config)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    require_file(path)
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
            f"{path} is not a valid safetensors file ({one_line(exc)})"
        ) from None


def _check_shapes(weights: dict[str, torch.Tensor], model: nn.Module, run_dir: Path) -> None:
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

