"""Run folders: round trip, atomic writes, and a one-line CheckpointError for every bad case."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from zoompipe.contract import EncoderSettings, GridSettings, PipelineContract
from zoompipe.errors import CheckpointError
from zoompipe.model import ZoomMIL, ZoomMILConfig, load_run, save_run

PIPELINE = PipelineContract(
    grid=GridSettings(magnifications=[1.25, 2.5], patch_size=256, min_tissue=0.1),
    encoder=EncoderSettings(name="efficientnet_lite0", feature_dim=16, weights="test", precision="fp32"))


def _model(**kwargs) -> ZoomMIL:
    torch.manual_seed(0)
    settings = {"in_dim": 16, "n_classes": 3, "magnifications": [1.25, 2.5], "k": 2,
                "hidden": 32, "attn_hidden": 8, **kwargs}
    return ZoomMIL(ZoomMILConfig(**settings)).eval()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return save_run(tmp_path / "run", _model(), "zoommil", ["a", "b", "c"], PIPELINE)


def test_round_trip_gives_identical_logits(run_dir: Path) -> None:
    bags = [torch.randn(7, 16), torch.randn(28, 16)]
    children = [torch.arange(28).view(7, 4)]
    model, config = load_run(run_dir)
    assert not model.training
    torch.testing.assert_close(model(bags, children).logits, _model()(bags, children).logits,
                               rtol=0, atol=0)
    assert config.class_names == ["a", "b", "c"] and config.architecture == "zoommil"
    assert config.model == _model().config.to_dict()
    assert config.schema_version == 1
    assert config.pipeline == PIPELINE
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "model.safetensors"]


def _write_pickle(run_dir: Path) -> None:
    torch.save(_model().state_dict(), run_dir / "model.safetensors")


def _write_random(run_dir: Path) -> None:
    (run_dir / "model.safetensors").write_bytes(os.urandom(4096))


def _truncate(run_dir: Path) -> None:
    path = run_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _edit_model_config(**changes):
    def edit(run_dir: Path) -> None:
        path = run_dir / "config.json"
        config = json.loads(path.read_text())
        config["model"].update(changes)
        path.write_text(json.dumps(config))

    return edit


def _edit_config(**changes):
    def edit(run_dir: Path) -> None:
        path = run_dir / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


BAD_CASES = {
    "missing folder": shutil.rmtree,
    "missing config": lambda run_dir: (run_dir / "config.json").unlink(),
    "missing weights": lambda run_dir: (run_dir / "model.safetensors").unlink(),
    "pickle weights": _write_pickle,
    "random bytes": _write_random,
    "truncated weights": _truncate,
    "invalid json": lambda run_dir: (run_dir / "config.json").write_text('{"model": {'),
    "old schema": _edit_config(schema_version=0),
    "no schema": _edit_config(schema_version=None),
    "unknown architecture": _edit_config(architecture="resnet"),
    "size mismatch": _edit_model_config(in_dim=32),
    "missing tensors": _edit_model_config(magnifications=[1.25, 2.5, 10.0]),
    "unexpected tensors": _edit_model_config(magnifications=[1.25]),
    "unknown setting": _edit_model_config(depth=3),
    "bad setting": _edit_model_config(magnifications=[2.5, 1.25]),
    "class count": _edit_model_config(n_classes=2),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_run_folder_raises_one_line_checkpoint_error(run_dir: Path, case: str) -> None:
    BAD_CASES[case](run_dir)
    with pytest.raises(CheckpointError) as info:
        load_run(run_dir)
    message = str(info.value)
    assert message and "\n" not in message
    if case == "pickle weights":
        assert "pickle" in message
    if case.endswith("schema"):
        assert "version" in message and "reads version 1" in message


def test_save_replaces_a_previous_run(run_dir: Path) -> None:
    save_run(run_dir, _model(n_classes=2), "zoommil", ["x", "y"], None)
    model, config = load_run(run_dir)
    assert config.class_names == ["x", "y"] and model.config.n_classes == 2 and config.pipeline is None
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_save_rejects_inconsistent_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_run(tmp_path, _model(), "zoommil", ["a", "b"], None)
    assert not any(tmp_path.iterdir())
