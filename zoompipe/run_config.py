"""A run folder's ``config.json``, read without torch.

What a run was trained on and how its features were made is all a predictor needs to start on a
slide (tissue, grid); the weights, and torch with them, can load meanwhile
(:class:`zoompipe.predict.BackgroundPredictor`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from zoompipe import __version__
from zoompipe.contract import PipelineContract, Versioned
from zoompipe.errors import CheckpointError, ContractError, one_line

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class RunConfig(Versioned):
    """The content of a run's ``config.json``.

    Attributes
    ----------
    architecture : str
        Registered model name (:func:`~zoompipe.model.registry.list_models`).
    model : dict
        Its hyper-parameters, validated by the architecture's own config class.
    class_names : list of str
        Class of each output, in order.
    pipeline : PipelineContract or None
        How the training features were made; None for CLAM/TRIDENT features, which cannot be
        redone from raw slides.
    zoompipe_version : str
        The version that wrote the run.
    """

    what: ClassVar[str] = "run config"
    redo: ClassVar[str] = "train the run again with this zoompipe"
    architecture: str
    model: dict[str, Any]
    class_names: list[str]
    pipeline: PipelineContract | None
    zoompipe_version: str = __version__


def require_file(path: Path) -> None:
    """Refuse a run folder that lacks ``path``."""
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; a run folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` of a run folder.

    Raises
    ------
    CheckpointError
        The folder or its ``config.json`` is missing, unreadable, or of another schema version.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    path = run_dir / CONFIG_NAME
    require_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({one_line(exc)})") from None
    try:
        return RunConfig.from_json(text, path)
    except ContractError as exc:
        raise CheckpointError(str(exc)) from None


def predict_contract(config: RunConfig, run_dir: str | os.PathLike) -> PipelineContract:
    """The pipeline contract a predictor redoes on raw slides.

    Raises
    ------
    CheckpointError
        The run was trained on features that do not record how they were made.
    """
    if config.pipeline is None:
        raise CheckpointError(f"{run_dir}: the model was trained on CLAM/TRIDENT features, which do not "
                              "record how their patches were made; predict needs features from zoompipe preprocess")
    return config.pipeline
