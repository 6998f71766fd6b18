"""Feature files, splits, metrics, and training and evaluation end to end (library and CLI)."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from zoompipe.cli.main import cli
from zoompipe.contract import EncoderSettings, GridSettings, PipelineContract, SlideSettings
from zoompipe.dataset import (
    SlideDataset,
    agreed_contract,
    make_splits,
    read_bags,
    read_labels,
    read_splits,
)
from zoompipe.errors import ContractError, FeatureFileError, UsageError
from zoompipe.evaluate import evaluate_run
from zoompipe.features import write_feature_file as write_preprocessed
from zoompipe.grid import PatchGrid, child_grid
from zoompipe.metrics import classification_metrics
from zoompipe.model import create_model, load_run
from zoompipe.model.teacher import load_teacher
from zoompipe.train import seed_everything, train_model, train_one_epoch

MAGS = [1.25, 2.5, 10.0]
LEVEL0_MPP = 0.25
PATCH = 256
DIM = 16


def toy_contract(encoder: str = "toy", min_tissue: float = 0.1, mpp: float = LEVEL0_MPP) -> PipelineContract:
    """The contract of the toy feature files, with this slide's resolution."""
    return PipelineContract(
        grid=GridSettings(magnifications=MAGS, patch_size=PATCH, min_tissue=min_tissue),
        encoder=EncoderSettings(name=encoder, feature_dim=DIM, weights="toy", precision="fp32"),
        slide=SlideSettings(mpp=mpp, mpp_source="override"))


def write_feature_file(
    path: Path, label: int, seed: int, n_base: int = 6, drop: float = 0.0,
    contract: PipelineContract | None = None, shift: float = 1.5,
) -> list[dict[str, np.ndarray]]:
    """Write a zoompipe feature file with plain h5py, in preprocess's layout; return its groups.

    Base patches sit on a coarse lattice; each patch's children tile it at the next
    magnification. Rows of every group are shuffled (only ``parent`` links them), and a
    fraction ``drop`` of the 10x patches is left out, as background children would be. The
    class shows as a shift of feature 0 at every magnification.
    """
    rng = np.random.default_rng(seed)
    cells = rng.choice(64, size=n_base, replace=False)
    side = PATCH * 10 / MAGS[0] / LEVEL0_MPP
    coords = [np.stack([cells % 8, cells // 8], axis=1) * side]
    parents = [np.full(n_base, -1)]
    for low, high in zip(MAGS, MAGS[1:]):
        r = round(high / low)
        offsets = np.stack(np.meshgrid(np.arange(r), np.arange(r)), -1).reshape(-1, 2)
        step = PATCH * 10 / high / LEVEL0_MPP
        coords.append((coords[-1][:, None, :] + offsets[None] * step).reshape(-1, 2))
        parents.append(np.repeat(np.arange(len(coords[-2])), r * r))
    if drop:
        keep = rng.random(len(coords[-1])) >= drop
        coords[-1], parents[-1] = coords[-1][keep], parents[-1][keep]
    groups = []
    new_row_of_prev = None
    for xy, parent in zip(coords, parents):
        order = rng.permutation(len(xy))  # shuffled rows: only `parent` links the groups
        parent = parent[order] if new_row_of_prev is None else new_row_of_prev[parent[order]]
        new_row_of_prev = np.argsort(order)
        features = rng.normal(size=(len(xy), DIM)).astype(np.float32)
        features[:, 0] += shift * label
        groups.append({"coords": xy[order].astype(np.int64), "features": features, "parent": parent})
    with h5py.File(path, "w") as f:
        f.attrs.update(slide_id=path.stem, magnifications=MAGS,
                       pipeline=(contract or toy_contract(mpp=0.25 + seed / 1000)).to_json())
        for m, g in zip(MAGS, groups):
            group = f.create_group(f"{m:g}x")
            side = PATCH * 10 / m / LEVEL0_MPP
            for key in ("coords", "features", "parent"):
                group.create_dataset(key, data=g[key])
            group.create_dataset("cells", data=g["coords"] // round(side))
            group.create_dataset("tissue", data=np.ones(len(g["coords"]), np.float32))
            group.attrs.update(magnification=m, mpp=10 / m, patch_size=PATCH, patch_size_level0=side)
    return groups


def _sorted_by_yx(xy: np.ndarray) -> bool:
    return bool(np.all(np.diff(xy[:, 1] * 10**9 + xy[:, 0]) > 0))


def test_children_index_follows_parent_column_not_row_order(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    groups = write_feature_file(path, label=1, seed=0)
    bags, children, coords = read_bags(path, MAGS)
    assert [b.shape for b in bags] == [(6, DIM), (24, DIM), (384, DIM)]
    assert [c.shape for c in children] == [(6, 4), (24, 16)]
    for i, index in enumerate(children):
        torch.testing.assert_close(bags[i], torch.from_numpy(groups[i]["features"]))
        for p, rows in enumerate(index.numpy()):
            assert np.all(groups[i + 1]["parent"][rows] == p)
            assert _sorted_by_yx(coords[i + 1][rows])


def test_subsets_of_magnifications_and_padding(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    groups = write_feature_file(path, label=0, seed=1, drop=0.25)
    bags, children, coords = read_bags(path, [1.25, 10.0])
    assert children[0].shape == (6, 64)
    n_10x = len(groups[2]["parent"])
    assert int((children[0] >= 0).sum()) == n_10x and int((children[0] < 0).sum()) == 384 - n_10x
    for p, rows in enumerate(children[0].numpy()):
        rows = rows[rows >= 0]
        assert np.all(groups[1]["parent"][groups[2]["parent"][rows]] == p)
        assert _sorted_by_yx(coords[1][rows])
    # A single magnification above the base is the whole group: ABMIL at 10x.
    bags, children, _ = read_bags(path, [10.0])
    assert bags[0].shape == (n_10x, DIM) and children == []


def test_clam_layout_and_bad_files(tmp_path: Path) -> None:
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:
        f.create_dataset("coords", data=np.zeros((5, 2), np.int64))
        f.create_dataset("features", data=np.ones((5, DIM), np.float32))
        f.attrs["magnification"] = 20.0
    bags, children, _ = read_bags(clam, [20.0])
    assert bags[0].shape == (5, DIM) and children == []
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    write_feature_file(tmp_path / "s.h5", label=0, seed=2)
    bad = [(clam, [1.25, 2.5]), (tmp_path / "junk.h5", MAGS),
           (tmp_path / "missing.h5", MAGS), (tmp_path / "s.h5", [1.25, 5.0])]
    for path, mags in bad:
        with pytest.raises(FeatureFileError) as info:
            read_bags(path, mags)
        assert "\n" not in str(info.value)


def test_training_files_must_agree_on_the_contract(tmp_path: Path) -> None:
    for i in range(3):  # each slide its own resolution: that is not a disagreement
        write_feature_file(tmp_path / f"s{i}.h5", label=0, seed=i)
    paths = sorted(tmp_path.glob("*.h5"))
    agreed = agreed_contract(paths)
    assert agreed == toy_contract().for_run() and agreed.slide is None
    write_feature_file(tmp_path / "other.h5", label=0, seed=9, contract=toy_contract(encoder="resnet50_trunc"))
    write_feature_file(tmp_path / "tissue.h5", label=0, seed=9, contract=toy_contract(min_tissue=0.5))
    for odd, field in (("other.h5", "encoder.name: 'toy' vs 'resnet50_trunc'"),
                       ("tissue.h5", "grid.min_tissue: 0.1 vs 0.5")):
        with pytest.raises(ContractError) as info:
            agreed_contract([*paths, tmp_path / odd])  # the odd one last: every file is checked
        message = str(info.value)
        assert "\n" not in message and field in message
        assert str(tmp_path / odd) in message and str(paths[0]) in message


def test_feature_file_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    write_feature_file(path, label=0, seed=0)
    with h5py.File(path, "a") as f:
        f.attrs["pipeline"] = f.attrs["pipeline"].replace('"schema_version":1', '"schema_version":7')
    with pytest.raises(ContractError, match="schema version 7, this zoompipe reads version 1"):
        read_bags(path, MAGS)
    with h5py.File(path, "a") as f:
        del f.attrs["pipeline"]
    with pytest.raises(ContractError, match="schema version missing"):
        read_bags(path, MAGS)


def test_stratified_folds_test_every_slide_once() -> None:
    labels = {f"s{i:02d}": "ab"[i % 3 == 0] for i in range(30)}
    folds = [make_splits(labels, n_folds=5, fold=f, seed=7) for f in range(5)]
    assert folds[0] == make_splits(labels, n_folds=5, fold=0, seed=7)
    tested = [s for split in folds for s, name in split.items() if name == "test"]
    assert sorted(tested) == sorted(labels)
    for split in folds:
        test = [labels[s] for s, name in split.items() if name == "test"]
        assert sorted(test) == ["a"] * 4 + ["b"] * 2  # classes in proportion


def test_splits_put_every_class_in_every_split_or_refuse() -> None:
    # 20 / 8 / 3 slides: dealing in one sequence across classes used to leave the small class
    # out of a split; now each class reaches train, val and test in every fold.
    labels = {f"s{i:02d}": "a" for i in range(20)}
    labels |= {f"t{i}": "b" for i in range(8)} | {f"u{i}": "c" for i in range(3)}
    for fold in range(5):
        split = make_splits(labels, n_folds=5, fold=fold, seed=3)
        for name in ("a", "b", "c"):
            roles = {role for s, role in split.items() if labels[s] == name}
            assert roles == {"train", "val", "test"}, (fold, name, roles)
    # Classes with at least 5 slides are tested exactly once over the 5 folds.
    tested = [s for f in range(5) for s, role in make_splits(labels, 5, f, seed=3).items()
              if role == "test" and labels[s] != "c"]
    assert sorted(tested) == sorted(s for s in labels if labels[s] != "c")
    with pytest.raises(UsageError, match="class 'c' has 2 patient"):
        make_splits({k: v for k, v in labels.items() if k != "u2"}, n_folds=5)


def test_splits_keep_a_patients_slides_together() -> None:
    labels = {f"s{i:02d}": "ab"[i % 2] for i in range(40)}
    patients = {s: f"p{int(s[1:]) // 4}" for s in labels}  # 4 slides per patient
    labels = {s: labels[f"s{(int(s[1:]) // 4) * 4:02d}"] for s in labels}  # one class per patient
    for fold in range(5):
        split = make_splits(labels, n_folds=5, fold=fold, seed=1, patients=patients)
        for patient in set(patients.values()):
            assert len({split[s] for s in labels if patients[s] == patient}) == 1
    # The split seed alone decides the split.
    assert make_splits(labels, 5, 0, seed=1) != make_splits(labels, 5, 0, seed=2)


def test_metrics() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.7 + 0.1
    metrics = classification_metrics(labels, probs)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # One-vs-rest AUCs counted by hand over (positive, negative) pairs, ties counting half:
    # class 0: 5/8, class 1: 7/8, class 2: 6/8. Per-class F1: 1/2, 4/5, 2/3, equal supports.
    assert metrics["auc"] == pytest.approx((5 / 8 + 7 / 8 + 6 / 8) / 3)
    assert metrics["weighted_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))["auc"] is None
    json.dumps(metrics)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("features")
    labels = root / "labels.csv"
    rows = [(f"slide{i:02d}", ["benign", "tumour"][i % 2]) for i in range(20)]
    for i, (slide_id, label) in enumerate(rows):
        write_feature_file(root / f"{slide_id}.h5", label=["benign", "tumour"].index(label), seed=i,
                           drop=0.1)
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label"), *rows])
    return root, labels


def test_train_and_evaluate_with_the_library(features, tmp_path: Path) -> None:
    features_dir, labels = features
    run = tmp_path / "run"
    summary = train_model(features_dir, labels, run, k=2, epochs=3, lr=1e-3, seed=1, progress=False)
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 20
    assert 1 <= summary["best_epoch"] <= summary["epochs_run"] == 3
    assert {"model.safetensors", "config.json", "splits.csv", "log.csv",
            "train_summary.json"} <= {p.name for p in run.iterdir()}
    with open(run / "log.csv") as f:
        log = list(csv.DictReader(f))
    assert [row["epoch"] for row in log] == ["1", "2", "3"]
    assert list(log[0]) == ["epoch", "train_loss", "val_loss", "val_acc", "val_f1", "lr", "sigma"]
    assert float(log[0]["sigma"]) == 0.05 and float(log[-1]["sigma"]) == 0.005  # decayed

    model, config = load_run(run)
    assert model.config.magnifications == MAGS and model.config.k == 2
    assert config.class_names == ["benign", "tumour"] and config.architecture == "zoommil"
    assert config.pipeline == toy_contract().for_run()

    metrics = evaluate_run(run, features_dir, labels, tmp_path / "eval", split="test")
    assert metrics["n_slides"] == summary["n_test"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics


def test_the_learning_rate_falls_on_a_plateau_or_stays_constant(features, tmp_path: Path) -> None:
    features_dir, labels = features
    # At lr 1e-7 the validation loss cannot fall by the plateau rule's 1e-4: with patience 1 the
    # rate falls by 0.8 after two epochs without a lower loss, then again two epochs later.
    rates = {}
    for patience in (1, 0):
        summary = train_model(features_dir, labels, tmp_path / f"p{patience}", k=2, epochs=6, lr=1e-7,
                              lr_patience=patience, seed=1, progress=False)
        assert summary["training"]["lr_patience"] == patience
        with open(tmp_path / f"p{patience}" / "log.csv") as f:
            rates[patience] = [float(row["lr"]) for row in csv.DictReader(f)]
    assert rates[1] == pytest.approx([1e-7, 1e-7, 1e-7, 8e-8, 8e-8, 6.4e-8])
    assert rates[0] == [1e-7] * 6


def test_a_warm_up_trains_the_zoom_target_alone(features, tmp_path: Path, monkeypatch) -> None:
    import zoompipe.train

    features_dir, labels = features
    ids = [f"slide{i:02d}" for i in range(6)]
    data = SlideDataset(features_dir, ids, [i % 2 for i in range(6)], MAGS)
    torch.manual_seed(0)
    model = create_model("zoommil", in_dim=DIM, n_classes=2, magnifications=MAGS, k=2, hidden=16, attn_hidden=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # What only the zoomed bags' classification trains: the pooling heads below the last magnification.
    zoomed_only = {name for name, _ in model.named_parameters() if name.startswith(("levels.0.attention",
                                                                                     "levels.1.attention"))}
    for teacher_only, frozen in ((True, zoomed_only), (False, set())):
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        train_one_epoch(model, data, range(len(data)), optimizer, "cpu", teacher_only=teacher_only)
        unchanged = {name for name, p in model.named_parameters() if torch.equal(p, before[name])}
        assert unchanged == frozen

    epochs_run = []

    def recorded(*args, teacher_only: bool = False, **kwargs) -> float:
        epochs_run.append(teacher_only)
        return train_one_epoch(*args, teacher_only=teacher_only, **kwargs)

    monkeypatch.setattr(zoompipe.train, "train_one_epoch", recorded)
    # Half of 3 epochs, rounded down; a model without a zoom target has no warm-up.
    for case, (architecture, zoom_target_weight, mags, applied) in enumerate((
            ("zoommil", 1.0, MAGS, 1), ("zoommil", 0.0, MAGS, 0), ("zoommil", 1.0, [10.0], 0),
            ("abmil", 1.0, None, 0))):
        epochs_run.clear()
        summary = train_model(features_dir, labels, tmp_path / f"run{case}", k=2, epochs=3, warmup=0.5,
                              architecture=architecture, magnifications=mags, zoom_target_weight=zoom_target_weight,
                              lr=1e-3, seed=1, progress=False)
        assert summary["training"]["warmup"] == 0.5 and summary["training"]["warmup_epochs"] == applied
        assert epochs_run == [True] * applied + [False] * (3 - applied)


def test_zoommil_follows_a_trained_abmil_run_or_refuses_it_in_one_line(features, tmp_path: Path) -> None:
    import hashlib

    features_dir, labels = features
    widths = dict(hidden=16, attn_hidden=8, seed=1, progress=False)
    abmil = tmp_path / "abmil"
    train_model(features_dir, labels, abmil, architecture="abmil", magnifications=[10.0], epochs=2, lr=1e-3, **widths)
    # At lr 0 nothing trains, so the run keeps what the teacher gave it.
    summary = train_model(features_dir, labels, tmp_path / "taught", k=2, epochs=2, lr=0.0, teacher=abmil, **widths)
    assert summary["training"]["warmup"] == 0.5 and summary["training"]["warmup_epochs"] == 0
    assert summary["teacher"] == {"run": str(abmil), "weights_sha256": "sha256:" + hashlib.sha256(
        (abmil / "model.safetensors").read_bytes()).hexdigest(), "target": "own-evidence"}
    taught, teacher = load_run(tmp_path / "taught").model, load_run(abmil).model
    for ours, theirs in ((taught.levels[-1].project, teacher.project), (taught.levels[-1].attention, teacher.attention),
                         (taught.classifier, teacher.classifier)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert not torch.equal(taught.levels[0].project[0].weight, teacher.project[0].weight)
    # With a teacher its target pulls the last attention too, by default; without one there is no target.
    assert taught.config.attention_target_weight == 1.0
    untaught = train_model(features_dir, labels, tmp_path / "untaught", k=2, epochs=1, **widths)
    assert load_run(untaught["run_dir"]).model.config.attention_target_weight == 0.0
    # Loading the teacher leaves the global random stream alone, so a taught run draws what another draws.
    pipeline = load_run(abmil).config.pipeline
    state = torch.random.get_rng_state()
    load_teacher(abmil, taught, ["benign", "tumour"], pipeline)
    assert torch.equal(torch.random.get_rng_state(), state)

    zoommil = tmp_path / "taught"
    other_width = tmp_path / "wide"
    train_model(features_dir, labels, other_width, architecture="abmil", magnifications=[10.0], epochs=1,
                **{**widths, "hidden": 32})
    at_25 = tmp_path / "abmil25"
    train_model(features_dir, labels, at_25, architecture="abmil", magnifications=[2.5], epochs=1, **widths)
    for case, teacher_run, settings, message in (
            ("a zoommil run", zoommil, {}, "architecture abmil"),
            ("another width", other_width, {}, "hidden 16"),
            ("another magnification", at_25, {}, r"magnifications \[10.0\]"),
            ("no zoom target", abmil, {"zoom_target_weight": 0.0}, "no zoom target"),
            ("a baseline", abmil, {"architecture": "abmil"}, "no zoom target"),
            ("an attention target without a teacher", None, {"attention_target_weight": 0.5}, "give --teacher"),
            ("own evidence for a baseline", None, {"architecture": "abmil", "teacher_target": "own-evidence"},
             "no zoom target"),
            ("a teacher's target without a teacher", None, {"teacher_target": "evidence"}, "give --teacher")):
        with pytest.raises(UsageError, match=message) as info:
            train_model(features_dir, labels, tmp_path / case, k=2, epochs=1, teacher=teacher_run,
                        **{**widths, **settings})
        assert "\n" not in str(info.value)
        assert not (tmp_path / case / "model.safetensors").exists()
    result = CliRunner().invoke(cli, ["train", "--features", str(features_dir), "--labels", str(labels), "--out",
                                      str(tmp_path / "cli"), "--teacher", str(zoommil)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    for target in ("attention", "evidence", "own-evidence"):
        result = CliRunner().invoke(cli, ["train", "--features", str(features_dir), "--labels", str(labels), "--out",
                                          str(tmp_path / target), "--teacher", str(abmil), "--teacher-target", target,
                                          "--k", "2", "--hidden", "16", "--attn-hidden", "8", "--epochs", "1"])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / target / "train_summary.json").read_text())["teacher"]["target"] == target
        assert load_run(tmp_path / target).model.config.attention_target_weight == 1.0
    # The same seed and teacher: only where the zoom heads were sent differs.
    zoom_heads = [load_run(tmp_path / target).model.levels[0].zoom.score.weight for target in ("evidence", "own-evidence")]
    assert not torch.equal(*zoom_heads)
    # Without a teacher the zoom heads follow the model's own last head: its attention, or its evidence.
    own = train_model(features_dir, labels, tmp_path / "own-untaught", k=2, epochs=1, teacher_target="own-evidence",
                      **widths)
    assert own["training"]["own_evidence"] and not untaught["training"]["own_evidence"] and "teacher" not in own
    assert not torch.equal(load_run(tmp_path / "own-untaught").model.levels[0].zoom.score.weight,
                           load_run(tmp_path / "untaught").model.levels[0].zoom.score.weight)


@pytest.mark.parametrize("lr_patience, ema_epochs", [(5, 0), (0, 0), (0, 2)])
def test_a_stopped_run_resumes_to_the_model_of_an_unstopped_one(features, tmp_path: Path, monkeypatch,
                                                                 lr_patience: int, ema_epochs: float) -> None:
    from safetensors.torch import load_file

    import zoompipe.train

    features_dir, labels = features
    settings = dict(k=2, epochs=4, lr=1e-3, lr_patience=lr_patience, ema_epochs=ema_epochs, seed=1, progress=False)
    whole = train_model(features_dir, labels, tmp_path / "whole", **settings)

    real, calls = zoompipe.train.predict_logits, []

    def dies_in_epoch_3(*args, **kwargs):  # the process is stopped while validating epoch 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = tmp_path / "stopped"
    monkeypatch.setattr(zoompipe.train, "predict_logits", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_model(features_dir, labels, run, **settings)
    monkeypatch.setattr(zoompipe.train, "predict_logits", real)
    assert (run / "resume" / "state.json").exists() and json.loads((run / "resume" / "state.json").read_text())["epoch"] == 2
    # One tensor file, of the epoch the JSON names: the earlier epochs' went once it was written.
    assert [p.name for p in (run / "resume").glob("*.safetensors")] == ["state-2.safetensors"]
    with pytest.raises(UsageError, match="other settings") as info:
        train_model(features_dir, labels, run, **{**settings, "lr": 2e-3}, resume=True)
    assert "\n" not in str(info.value)

    resumed = train_model(features_dir, labels, run, **settings, resume=True)
    assert {k: v for k, v in resumed.items() if k != "run_dir"} == {k: v for k, v in whole.items() if k != "run_dir"}
    assert (run / "log.csv").read_text() == (tmp_path / "whole" / "log.csv").read_text()
    ours, theirs = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not (run / "resume").exists()  # a finished run keeps no state


def test_train_and_evaluate_commands(features, tmp_path: Path) -> None:
    features_dir, labels = features
    splits = tmp_path / "splits.csv"
    names = {f"slide{i:02d}": "train" if i < 12 else "val" if i < 16 else "test" for i in range(20)}
    with open(splits, "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "split"), *names.items()])
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(cli, [
        "train", "--features", str(features_dir), "--labels", str(labels), "--out", str(run),
        "--splits", str(splits), "--magnifications", "1.25,2.5", "--k", "3", "--epochs", "2",
        "--lr", "1e-3", "--patience", "5"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_train"] == 12
    assert read_splits(run / "splits.csv") == names

    out = tmp_path / "eval"
    result = runner.invoke(cli, [
        "evaluate", "--model", str(run), "--features", str(features_dir), "--labels", str(labels),
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    truth = read_labels(labels)
    assert len(predictions) == metrics["n_slides"] == 20
    assert list(predictions[0]) == ["slide_id", "label", "pred", "p_benign", "p_tumour"]
    assert all(row["label"] == truth[row["slide_id"]] for row in predictions)
    accuracy = np.mean([row["label"] == row["pred"] for row in predictions])
    assert metrics["accuracy"] == pytest.approx(accuracy)
    # The file's probabilities are the model's on the same bags.
    model, _ = load_run(run)
    dataset = SlideDataset(features_dir, [r["slide_id"] for r in predictions], [0] * 20, [1.25, 2.5], cache=False)
    with torch.no_grad():
        expected = [torch.softmax(model(bags, children).logits, 0)[1].item() for bags, children, _ in dataset]
    assert [float(r["p_tumour"]) for r in predictions] == pytest.approx(expected, abs=1e-6)
    assert np.array(metrics["confusion_matrix"]).sum() == 20


def test_dataset_rejects_missing_files_and_other_encoders(features, tmp_path: Path) -> None:
    features_dir, _ = features
    with pytest.raises(FeatureFileError, match="1 of 2 feature files are missing"):
        SlideDataset(features_dir, ["slide00", "nope"], [0, 0], MAGS)
    dataset = SlideDataset(features_dir, ["slide00"], [0], MAGS, feature_dim=DIM + 1)
    with pytest.raises(FeatureFileError, match="same encoder"):
        dataset[0]


def test_reads_files_written_by_preprocess(tmp_path: Path) -> None:
    cells = np.array([[0, 0], [3, 1], [2, 5]])
    side = PATCH * 10 / MAGS[0] / LEVEL0_MPP
    grids = [PatchGrid(magnification=MAGS[0], mpp=10 / MAGS[0], patch_size=PATCH, patch_size_level0=side,
                       cells=cells, coords=cells * int(side), tissue=np.ones(3, np.float32),
                       parent=np.full(3, -1))]
    for m in MAGS[1:]:
        grids.append(child_grid(grids[-1], m))
    # Keep only some 10x patches, in reverse order, so that neither completeness nor row order
    # can be relied on.
    keep = np.arange(len(grids[2]))[::-3]
    grids[2] = replace(grids[2], cells=grids[2].cells[keep], coords=grids[2].coords[keep],
                       tissue=grids[2].tissue[keep], parent=grids[2].parent[keep])
    features = [np.random.default_rng(0).normal(size=(len(g), DIM)).astype(np.float32) for g in grids]
    write_preprocessed(tmp_path / "p.h5", toy_contract(), {"slide_id": "p"}, grids, features)
    bags, children, coords = read_bags(tmp_path / "p.h5", MAGS)
    assert [len(b) for b in bags] == [3, 12, len(keep)]
    assert int((children[1] >= 0).sum()) == len(keep)
    for p, rows in enumerate(children[1].numpy()):
        rows = rows[rows >= 0]
        assert np.all(grids[2].parent[rows] == p) and _sorted_by_yx(coords[2][rows])
    assert agreed_contract([tmp_path / "p.h5"]).grid.magnifications == tuple(MAGS)


def test_the_weight_average_is_validated_and_kept(features, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    features_dir, labels = features
    settings = dict(k=2, hidden=16, attn_hidden=8, epochs=3, lr=1e-2, seed=1, progress=False)
    runs = {}
    # An average over a single step is the last step's weights; one over ~forever stays at the
    # initialisation, whichever epoch validation keeps.
    for name, ema_epochs in (("off", 0.0), ("one_step", 1 / 12), ("forever", 1e9)):
        summary = train_model(features_dir, labels, tmp_path / name, ema_epochs=ema_epochs, **settings)
        assert summary["n_train"] == 12 and summary["training"]["ema_epochs"] == ema_epochs
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    seed_everything(1)
    initial = create_model("zoommil", in_dim=DIM, n_classes=2, magnifications=MAGS, k=2, hidden=16,
                           attn_hidden=8).state_dict()
    assert all(torch.equal(runs["one_step"][key], runs["off"][key]) for key in runs["off"])
    assert all(torch.allclose(runs["forever"][key], initial[key], atol=1e-6) for key in runs["off"])
    assert not all(torch.allclose(runs["off"][key], initial[key], atol=1e-3) for key in runs["off"])


@pytest.mark.parametrize("case", ["k 0", "epochs 0", "ema-epochs -1", "warmup 1", "no label column", "unknown architecture"])
def test_bad_options_exit_2_with_one_line_and_write_nothing(features, tmp_path: Path, case: str) -> None:
    features_dir, labels = features
    args = ["train", "--features", str(features_dir), "--labels", str(labels), "--out", str(tmp_path / "run")]
    if case == "no label column":
        bad = tmp_path / "labels.csv"
        bad.write_text("slide_id,diagnosis\nslide00,benign\n")
        args[4] = str(bad)
    else:
        option, value = case.split()
        args += [f"--{option}", value]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def separable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """32 slides whose class shifts feature 0 of every patch, with a fixed 20/6/6 split."""
    root = tmp_path_factory.mktemp("separable")
    rows = [(f"s{i:02d}", ["benign", "tumour"][i % 2]) for i in range(32)]
    for i, (slide_id, label) in enumerate(rows):
        write_feature_file(root / f"{slide_id}.h5", label=label == "tumour", seed=100 + i, n_base=3)
    labels, splits = root / "labels.csv", root / "splits.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label"), *rows])
    with open(splits, "w", newline="") as f:
        names = ["train"] * 20 + ["val"] * 6 + ["test"] * 6
        csv.writer(f).writerows([("slide_id", "split"), *((s, n) for (s, _), n in zip(rows, names))])
    return root, labels, splits


@pytest.mark.parametrize("architecture", ["zoommil", "abmil", "clam_sb", "clam_mb", "transmil"])
def test_every_architecture_trains_evaluates_and_beats_chance(separable, tmp_path: Path, architecture: str) -> None:
    features_dir, labels, splits = separable
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--features", str(features_dir), "--labels", str(labels), "--out", str(run), "--splits",
        str(splits), "--architecture", architecture, "--epochs", "12", "--lr", "1e-3", "--hidden", "32",
        "--attn-hidden", "16", "--k", "2"])
    assert result.exit_code == 0, result.output
    model, config = load_run(run)
    assert config.architecture == architecture and type(model).__module__.endswith(
        {"zoommil": "zoommil", "abmil": "abmil", "clam_sb": "clam", "clam_mb": "clam", "transmil": "transmil"}[architecture])
    # The baselines read the files' highest magnification; ZoomMIL the whole cascade.
    assert model.config.magnifications == (MAGS if architecture == "zoommil" else [10.0])
    metrics = evaluate_run(run, features_dir, labels, tmp_path / "eval", split="test")
    assert metrics["n_slides"] == 6 and metrics["accuracy"] >= 5 / 6, metrics


def test_evaluate_refuses_features_made_unlike_the_training_features(features, tmp_path: Path) -> None:
    features_dir, labels = features
    run = tmp_path / "run"
    train_model(features_dir, labels, run, k=2, epochs=1, seed=0, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    for i, slide_id in enumerate(read_labels(labels)):
        write_feature_file(other / f"{slide_id}.h5", label=i % 2, seed=i, contract=toy_contract(encoder="uni"))
    with pytest.raises(ContractError) as info:
        evaluate_run(run, other, labels, tmp_path / "eval")
    assert "encoder.name: 'toy' vs 'uni'" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "eval").exists()
