"""Training state at the end of an epoch, kept so that a stopped run resumes where it was.

Everything the next epoch depends on is kept: the model's and the optimiser's tensors, the
learning-rate scheduler, the random generators (torch's global one, which draws dropout and the
perturbed top-K's noise, and the sampler's), the best epoch so far and, for sparse training,
the patches embedded per epoch. A resumed run therefore takes the same steps as one that was
never stopped and ends with the same model (``tests/test_train.py``); with ``--sparse`` the
children embedded before the stop are read back from the feature cache.

The state lives in ``<run>/resume/``: ``state-<epoch>.safetensors`` (tensors) and
``state.json`` (the rest, naming the epoch), each written atomically. The JSON is written last
and the previous epoch's tensors removed only after it, so a stop at any point leaves a JSON
and the tensors of the same epoch. No pickle is involved. A run that finishes removes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_text
from .errors import UsageError

STATE_VERSION = 1


@dataclass
class Best:
    """The best epoch so far: validation weighted F1, then the lower loss on ties."""

    epoch: int
    f1: float
    loss: float
    accuracy: float

    def beaten_by(self, f1: float, loss: float) -> bool:
        return (f1, -loss) > (self.f1, -self.loss)


@dataclass
class TrainingState:
    """What is not tensors in a resumable state (see the module docstring)."""

    epoch: int
    fingerprint: str
    best: Best | None
    scheduler: dict[str, Any]
    param_groups: list[dict[str, Any]]
    per_epoch: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION


def fingerprint(settings: dict[str, Any]) -> str:
    """Digest of the settings a run's steps depend on; a resume must have the same."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_dir(run_dir: Path) -> Path:
    """Where the resumable state of a run is kept."""
    return Path(run_dir) / "resume"


def save_state(run_dir: Path, state: TrainingState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               sampler_generator: torch.Generator, average: torch.nn.Module | None = None) -> None:
    """Write the state after ``state.epoch`` (atomically; a stop mid-write keeps the previous one).

    ``average`` is the moving average of the weights, when the run keeps one.
    """
    folder = state_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{name}": value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    if average is not None:
        tensors.update({f"average.{name}": value.detach().cpu().contiguous()
                        for name, value in average.state_dict().items()})
    for index, slots in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{key}": torch.as_tensor(value).cpu().contiguous()
                        for key, value in slots.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.sampler"] = sampler_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    current = _tensors_path(folder, state.epoch)
    with atomic_path(current) as tmp:
        save_file(tensors, str(tmp), metadata={"epoch": str(state.epoch)})
    write_text(folder / "state.json", json.dumps(asdict(state), indent=1) + "\n")
    for stale in folder.glob("state-*.safetensors"):
        if stale != current:
            stale.unlink(missing_ok=True)


def _tensors_path(folder: Path, epoch: int) -> Path:
    return folder / f"state-{epoch}.safetensors"


def load_state(run_dir: Path, expected_fingerprint: str, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, sampler_generator: torch.Generator,
               average: torch.nn.Module | None = None) -> TrainingState | None:
    """Restore the state of a stopped run into ``model``, ``optimizer``, ``average`` and the generators.

    Returns
    -------
    TrainingState or None
        None when the run folder holds no state (nothing to resume: the run starts afresh).

    Raises
    ------
    UsageError
        The state was saved by a run with other settings or another split, or is unreadable.
    """
    folder = state_dir(run_dir)
    if not (folder / "state.json").exists():
        return None
    try:
        data = json.loads((folder / "state.json").read_text())
        best = data.pop("best")
        state = TrainingState(**data, best=Best(**best) if best else None)
        tensors = load_file(str(_tensors_path(folder, state.epoch)))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"cannot resume from {folder}: {err}") from None
    if state.version != STATE_VERSION or state.fingerprint != expected_fingerprint:
        raise UsageError(f"{run_dir} holds a run started with other settings or another split; "
                         "train with those, or into another folder")
    model.load_state_dict(_prefixed(tensors, "model."))
    if average is not None:
        average.load_state_dict(_prefixed(tensors, "average."))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state.param_groups})
    torch.set_rng_state(tensors["rng.torch"])
    sampler_generator.set_state(tensors["rng.sampler"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    return state


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def clear_state(run_dir: Path) -> None:
    """Remove the resumable state of a finished run."""
    shutil.rmtree(state_dir(run_dir), ignore_errors=True)
