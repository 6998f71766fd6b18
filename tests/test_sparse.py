"""Sparse zoom training: base features and raw slides give the model dense training gives."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from zoompipe.cli.main import cli
from zoompipe.dataset import read_bags
from zoompipe.engine import ZoomPredictor
from zoompipe.features import read_feature_file
from zoompipe.preprocess import PreprocessConfig, preprocess_slides
from zoompipe.sparse import LazyRows, RowStore, SparseSettings, coverage_order
from zoompipe.synthetic import write_synthetic_slide
from zoompipe.train import train_model

CASCADE = [2.5, 5.0, 10.0]
PATCH = 64
#: The runtime is named, not left to "auto" (which picks per machine): the runs are compared bit
#: for bit, and OpenVINO's CPU features of a patch do not depend on the batch it is embedded in,
#: while torch's oneDNN convolutions differ in the last bits between batch shapes, and sparse
#: training embeds other batches than preprocessing.
ENCODER = dict(precision="fp32", runtime="openvino")
#: Small and seeded; the same for the dense and the sparse run.
TRAINING = dict(k=1, hidden=32, attn_hidden=16, epochs=3, lr=1e-3, seed=3, progress=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six small slides, preprocessed twice: the full cascade (dense) and the base alone."""
    # A declared dependency, but an image without it (the GPU machine's) should skip these bit-for-bit
    # comparisons, not error in the fixture.
    pytest.importorskip("openvino", reason="the bit-for-bit comparisons embed with OpenVINO (ENCODER)")
    root = tmp_path_factory.mktemp("sparse")
    slides = []
    for i in range(6):
        slides.append(root / "slides" / f"s{i}.svs")
        slides[-1].parent.mkdir(exist_ok=True)
        write_synthetic_slide(slides[-1], 1600, 1200, mpp=0.5, seed=30 + i,
                              layout=dict(n_lesions=1, grade=2 * (i % 2)))
    for name, mags in (("dense", CASCADE), ("base", CASCADE[:1])):
        config = PreprocessConfig(magnifications=mags, patch_size=PATCH, **ENCODER)
        assert {r.status for r in preprocess_slides(slides, root / name, config, progress=False)} == {"ok"}
    (root / "labels.csv").write_text("slide_id,label\n" + "".join(f"s{i},{'ab'[i % 2]}\n" for i in range(6)))
    (root / "splits.csv").write_text(
        "slide_id,split\n" + "".join(f"s{i},{'train' if i < 4 else 'val'}\n" for i in range(6)))
    return root


def _train(root: Path, out: str, sparse: SparseSettings | None = None, **kwargs) -> dict:
    features = root / ("base" if sparse else "dense") / "features"
    extra = {"magnifications": CASCADE, "sparse": sparse} if sparse else {}
    return train_model(features, root / "labels.csv", root / out, splits_csv=root / "splits.csv",
                       **{**TRAINING, **extra, **kwargs})


def _log(run: Path) -> list[list[str]]:
    return [line.split(",")[:7] for line in (run / "log.csv").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


@pytest.fixture(scope="module")
def runs(cohort) -> tuple[dict, dict]:
    """Dense and sparse training with the paper's loss (no zoom target), one seed; the sparse run
    embeds ahead (lookahead 1), so that everything checked of it holds with embedding ahead too."""
    dense = _train(cohort, "dense_run", zoom_target_weight=0.0)
    sparse = _train(cohort, "sparse_run", SparseSettings(**ENCODER, lookahead=1), zoom_target_weight=0.0)
    return dense, sparse


def test_sparse_training_gives_the_dense_model(cohort, runs) -> None:
    dense, sparse = runs
    assert _log(cohort / "sparse_run") == _log(cohort / "dense_run")  # losses, F1 and sigma per epoch
    a, b = _weights(cohort / "dense_run"), _weights(cohort / "sparse_run")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    assert sparse["best_epoch"] == dense["best_epoch"]
    # The run's contract is the cascade's, so it predicts from raw slides like a dense run.
    config = json.loads((cohort / "sparse_run" / "config.json").read_text())
    assert config["pipeline"] == json.loads((cohort / "dense_run" / "config.json").read_text())["pipeline"]
    prediction = ZoomPredictor(cohort / "sparse_run", precision="fp32").predict(cohort / "slides" / "s5.svs")
    assert [m.magnification for m in prediction.magnifications] == CASCADE


def test_cached_children_are_the_dense_features_of_their_cells(cohort, runs) -> None:
    report = runs[1]["sparse"]
    cached_total = {"5x": 0, "10x": 0}
    for i in range(6):
        cache = read_feature_file(cohort / "sparse_run" / "feature_cache" / f"s{i}.h5")
        dense = read_feature_file(cohort / "dense" / "features" / f"s{i}.h5")
        assert cache.attrs["sparse_cache"] and cache.magnifications == CASCADE
        for grid, features, dense_grid, dense_features in zip(cache.grids, cache.features, dense.grids,
                                                              dense.features):
            cells = {tuple(c): row for row, c in enumerate(dense_grid.cells.tolist())}
            rows = np.array([cells[tuple(c)] for c in grid.cells.tolist()], np.int64)
            np.testing.assert_array_equal(grid.coords, dense_grid.coords[rows])
            np.testing.assert_allclose(features, dense_features[rows], rtol=0, atol=1e-5)
            if grid.magnification != CASCADE[0]:
                cached_total[f"{grid.magnification:g}x"] += len(grid)
        assert len(cache.grids[0]) == len(dense.grids[0])  # the base in full
        read_bags(cohort / "sparse_run" / "feature_cache" / f"s{i}.h5", CASCADE)  # parents: rows of the group below
    # Every patch cached was embedded by this run and counted once: in its step, or ahead of it
    # (SparseSettings.lookahead) and then used; the rest of what was embedded ahead is counted too.
    embedded, ahead = report["embedded_patches"], report["ahead"]
    in_step = {g: sum(e.get(p, {}).get(g, 0) for e in report["per_epoch"] for p in ("train", "val"))
               for g in ("5x", "10x")}
    assert ahead["lookahead"] == 1 and sum(ahead["used"].values()) > 0
    assert {g: in_step[g] + ahead["used"][g] for g in in_step} == cached_total
    assert {g: embedded[g] for g in in_step} == {g: in_step[g] + ahead["embedded"][g] for g in in_step}
    assert all(ahead["used"][g] <= ahead["embedded"][g] for g in in_step)
    assert report["dense_patches"]["10x"] > 2 * embedded["10x"]
    assert report["total_dense"] == sum(report["dense_patches"].values())
    assert report["dense_patches"]["2.5x"] == embedded["2.5x"]


def test_a_rerun_reuses_the_cache_and_trains_the_same_model(cohort, runs) -> None:
    result = CliRunner().invoke(cli, [
        "train", "--sparse", "--features", str(cohort / "base" / "features"), "--labels",
        str(cohort / "labels.csv"), "--splits", str(cohort / "splits.csv"), "--out", str(cohort / "rerun"),
        "--magnifications", "2.5,5,10", "--cache-dir", str(cohort / "sparse_run" / "feature_cache"),
        "--precision", "fp32", "--k", "1", "--hidden", "32", "--attn-hidden", "16", "--epochs", "3", "--lr", "1e-3",
        "--seed", "3", "--zoom-target-weight", "0", "--lookahead", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((cohort / "rerun" / "train_summary.json").read_text())["sparse"]
    assert all(set(epoch) == {"epoch"} for epoch in report["per_epoch"])  # nothing embedded again
    first = runs[1]["sparse"]
    unused = {g: first["ahead"]["embedded"][g] - first["ahead"]["used"][g] for g in ("5x", "10x")}
    assert report["reused_from_cache"] == {g: first["embedded_patches"][g] - unused[g] for g in ("5x", "10x")}
    a, b = _weights(cohort / "sparse_run"), _weights(cohort / "rerun")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_rows_embedded_ahead_are_known_only_once_a_step_asks_for_them() -> None:
    bags = [torch.arange(12.0).view(4, 3), torch.arange(48.0).view(16, 3)]
    embedded: list[tuple[int, list[int], bool]] = []

    def embed(ahead: bool):
        def rows(level: int, rows: np.ndarray) -> np.ndarray:
            embedded.append((level, rows.tolist(), ahead))
            return bags[level][rows].numpy()
        return rows

    lazy = LazyRows(RowStore([4, 16], bags[0].numpy()), [torch.arange(16).view(4, 4)], embed(False), embed(True))
    torch.testing.assert_close(lazy.ahead(1, torch.tensor([9, 2, 5])), bags[1][[9, 2, 5]])
    assert lazy.store.count(1) == 0 and lazy.known()[0][1].shape == (0, 3)  # staged, not known
    lazy.keep_reached()  # after the exploration: all three were reached, all stay
    torch.testing.assert_close(lazy.rows(1, torch.tensor([2, 3])), bags[1][[2, 3]])
    assert embedded == [(1, [2, 5, 9], True), (1, [3], False)]  # row 2 was not embedded twice
    assert lazy.used_ahead[1] == 1 and lazy.store.known_rows(1).tolist() == [2, 3]
    lazy.ahead(1, torch.tensor([3, 9]))  # known and staged rows are not embedded again
    lazy.keep_reached()  # row 5 was not reached again: it goes
    assert embedded[2:] == [] and sorted(lazy.staged[1]) == [9]


def test_embedding_ahead_trains_the_same_model(cohort) -> None:
    # With the zoom target, whose teacher reads every row known so far: rows embedded ahead that
    # no step asked for must not reach it, or embedding ahead would change the model.
    runs = {n: _train(cohort, f"ahead_{n}", SparseSettings(**ENCODER, lookahead=n,
                                                           cache_dir=str(cohort / f"ahead_{n}_cache")))
            for n in (0, 2)}
    assert _log(cohort / "ahead_2") == _log(cohort / "ahead_0")
    a, b = _weights(cohort / "ahead_0"), _weights(cohort / "ahead_2")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    for i in range(6):
        cells = [read_feature_file(cohort / f"ahead_{n}_cache" / f"s{i}.h5").grids for n in (0, 2)]
        for grid_0, grid_2 in zip(*cells):
            np.testing.assert_array_equal(grid_2.cells, grid_0.cells)
    ahead = runs[2]["sparse"]["ahead"]
    assert sum(ahead["used"].values()) > 0 and runs[0]["sparse"]["ahead"]["embedded"] == {"5x": 0, "10x": 0}


def _explored(cache: Path, slide_id: str) -> set[int]:
    """Base rows with a child in a sparse cache."""
    return set(read_feature_file(cache / f"{slide_id}.h5").grids[1].parent.tolist())


def test_the_cover_takes_the_odd_patches_first_and_weighs_them() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 8))
    features[[7, 21, 40]] += 6.0  # a small, distinct kind of tissue
    features[13] -= 10.0  # the most distinct of all, but with no tissue
    weights = np.ones(60)
    weights[13] = 0.0
    order = coverage_order(features, weights)
    assert sorted(order.tolist()) == list(range(60)) and order[-1] == 13
    assert order[0] in (7, 21, 40)
    assert len({7, 21, 40} & set(order[:3].tolist())) == 1  # one of a kind, then other kinds
    assert coverage_order(features)[0] == 13  # unweighted, it comes first
    np.testing.assert_array_equal(coverage_order(features, weights, 5), order[:5])
    no_tissue = coverage_order(features, np.zeros(60))  # ties everywhere: still every row once
    assert sorted(no_tissue.tolist()) == list(range(60))


def test_a_budget_allows_the_first_of_the_cover_among_patches_with_children() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 4)).astype(np.float32)
    children = torch.arange(24).view(6, 4)
    children[2] = -1  # no children: never chosen, whatever its features
    base[2] += 20.0
    lazy = LazyRows(RowStore([6, 24], base), [children], lambda level, rows: None, budget=0.5)
    candidates = np.array([0, 1, 3, 4, 5])
    cover = candidates[coverage_order(base[candidates], None, 3)]
    assert np.flatnonzero(lazy.selectable(1).numpy()).tolist() == sorted(cover.tolist())
    assert int(lazy.selectable(4).sum()) == 4  # never fewer than K
    assert lazy.selectable(1) is lazy.selectable(1)  # fixed for the run
    assert LazyRows(RowStore([6, 24], base), [children], lambda level, rows: None).selectable(1) is None


def test_an_exploration_budget_caps_the_base_patches_explored(cohort, runs) -> None:
    budget = 0.2
    summary = _train(cohort, "budget", SparseSettings(**ENCODER, explore_budget=budget), epochs=4)
    assert summary["sparse"]["explore_budget"] == budget
    fewer = 0
    for i in range(4):  # the training slides; validation's hard top-K reads K parents, as always
        n = len(read_feature_file(cohort / "base" / "features" / f"s{i}.h5").grids[0])
        explored = _explored(cohort / "budget" / "feature_cache", f"s{i}")
        assert 0 < len(explored) <= max(math.ceil(budget * n), TRAINING["k"])
        fewer += len(explored) < len(_explored(cohort / "sparse_run" / "feature_cache", f"s{i}"))
    assert fewer >= 2  # the unlimited run of fewer epochs explored more
    code, out = _cli_error(cohort, "--out", str(cohort / "bad_budget"), "--magnifications", "2.5,5,10",
                           "--explore-budget", "1.5")
    assert code == 2 and "budget" in out and len(out.strip().splitlines()) == 1


def test_children_embedded_by_cluster_workers_train_the_same_model(cohort, runs) -> None:
    # One worker process builds the encoder and embeds every child, in the steps and ahead.
    report = _train(cohort, "on_cluster", SparseSettings(**ENCODER, cluster="local:1", lookahead=1,
                                                         cache_dir=str(cohort / "on_cluster_cache")),
                    zoom_target_weight=0.0)["sparse"]
    assert _log(cohort / "on_cluster") == _log(cohort / "sparse_run")
    a, b = _weights(cohort / "sparse_run"), _weights(cohort / "on_cluster")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    assert report["embedded_patches"] == runs[1]["sparse"]["embedded_patches"]
    for i in range(6):
        local = read_feature_file(cohort / "sparse_run" / "feature_cache" / f"s{i}.h5")
        remote = read_feature_file(cohort / "on_cluster_cache" / f"s{i}.h5")
        for a_grid, b_grid, a_features, b_features in zip(local.grids, remote.grids, local.features,
                                                          remote.features):
            np.testing.assert_array_equal(b_grid.cells, a_grid.cells)
            np.testing.assert_allclose(b_features, a_features, rtol=0, atol=1e-5)


def test_with_every_child_cached_the_zoom_target_is_the_dense_one(cohort) -> None:
    # A dense feature file is a complete cache: sparse training then reads what dense reads, the
    # teacher included, and embeds nothing.
    full = cohort / "full_cache"
    shutil.copytree(cohort / "dense" / "features", full)
    settings = dict(epochs=2, zoom_target_weight=1.0)
    _train(cohort, "dense_target", **settings)
    report = _train(cohort, "sparse_target", SparseSettings(**ENCODER, cache_dir=full), **settings)["sparse"]
    assert all(set(epoch) == {"epoch"} for epoch in report["per_epoch"])
    assert _log(cohort / "sparse_target") == _log(cohort / "dense_target")
    a, b = _weights(cohort / "dense_target"), _weights(cohort / "sparse_target")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def _cli_error(cohort: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["train", "--sparse", "--features", str(cohort / "base" / "features"),
                                      "--labels", str(cohort / "labels.csv"), "--splits", str(cohort / "splits.csv"),
                                      "--epochs", "1", *args])
    return result.exit_code, result.output


def test_bad_sparse_runs_fail_in_one_line(cohort, tmp_path) -> None:
    code, out = _cli_error(cohort, "--out", str(tmp_path / "a"), "--architecture", "abmil")
    assert code == 2 and "--sparse trains zooming models" in out and len(out.strip().splitlines()) == 1
    code, out = _cli_error(cohort, "--out", str(tmp_path / "b"), "--magnifications", "5,10")
    assert code == 2 and "must start at the features' base magnification 2.5x" in out
    code, out = _cli_error(cohort, "--out", str(tmp_path / "c"))
    assert code == 2 and "give the cascade" in out
    # A cache made under other settings (here: another cascade) is refused, not mixed in.
    code, out = _cli_error(cohort, "--out", str(tmp_path / "d"), "--magnifications", "2.5,10", "--cache-dir",
                           str(cohort / "dense" / "features"))
    last = out.strip().splitlines()[-1]  # after the tiling progress bar
    assert code == 1 and last.startswith("error: ") and "feature cache made under other settings" in last
    assert "Traceback" not in out
    code, out = _cli_error(cohort, "--out", str(tmp_path / "e"), "--magnifications", "2.5,5,10", "--slides",
                           str(tmp_path / "missing.svs"))
    assert code == 2 and "no such file" in out
    code, out = _cli_error(cohort, "--out", str(tmp_path / "g"), "--magnifications", "2.5,5,10", "--cluster", "lots")
    assert code == 2 and "--cluster 'lots'" in out and len(out.strip().splitlines()) == 1
    # Slides moved away from the path the feature files record: the slide is named, no traceback.
    moved = tmp_path / "moved"
    shutil.copytree(cohort / "base" / "features", moved)
    with h5py.File(moved / "s0.h5", "r+") as f:
        f.attrs["slide_path"] = str(tmp_path / "gone" / "s0.svs")
    result = CliRunner().invoke(cli, ["train", "--sparse", "--features", str(moved), "--labels",
                                      str(cohort / "labels.csv"), "--splits", str(cohort / "splits.csv"), "--epochs",
                                      "1", "--out", str(tmp_path / "f"), "--magnifications", "2.5,5,10"])
    assert result.exit_code == 1 and "gone" in result.output and "Traceback" not in result.output



def test_sparse_training_with_the_zoom_target_finds_the_planted_regions() -> None:
    # The planted cohort of test_zoommil (40 base patches, 2 regions that carry the class at 10x
    # among 12 decoys as visible at 1.25x and 2.5x), trained sparsely with the zoom target: the
    # teacher reads the children embedded so far, and each zoom head is compared with it only
    # on patches whose descendants are all known. Measured: 0.99 accuracy, 98.5% / 98% of the
    # regions (dense: 0.99, 98% / 98%); the noise (0.5 decaying to 0.005, as in the dense test)
    # explores most of the cohort, so this checks localisation only.
    from test_zoommil import MAGS, PLANTED, _accuracy, _train, make_slides, regions_reached

    stores: dict[int, LazyRows] = {}

    def lazy(bags: list[torch.Tensor], children: list[torch.Tensor]) -> LazyRows:
        # One store per slide across epochs, as a cache file; "embedding" reads the planted bag.
        return stores.setdefault(id(bags[0]), LazyRows(RowStore([len(b) for b in bags], bags[0].numpy()), children,
                                                       lambda level, rows: bags[level][rows].numpy()))

    train = make_slides(200, seed=10, **PLANTED)
    regions: list = []
    test = make_slides(100, seed=11, regions=regions, **PLANTED)
    model = _train(MAGS, train, epochs=12, wrap=lazy, k=0.1, sigma=0.5, sigma_end=0.005)
    accuracy, shares = _accuracy(model, test), regions_reached(model, test, regions)
    print(f"sparse ZoomMIL: test accuracy {accuracy:.3f}, planted regions selected {shares[0]:.3f} at 1.25x and "
          f"{shares[1]:.3f} at 2.5x")
    assert accuracy >= 0.95
    assert shares[0] >= 0.95 and shares[1] >= 0.95


def test_a_stopped_sparse_run_resumes_with_its_cache_to_the_same_model(cohort, runs, monkeypatch) -> None:
    import zoompipe.train

    real, calls = zoompipe.train.predict_logits, []

    def dies_in_epoch_3(*args, **kwargs):  # stopped while validating the last epoch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    settings = SparseSettings(**ENCODER, cache_dir=str(cohort / "resumed_cache"), lookahead=1)
    monkeypatch.setattr(zoompipe.train, "predict_logits", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _train(cohort, "resumed", settings, zoom_target_weight=0.0)
    monkeypatch.setattr(zoompipe.train, "predict_logits", real)
    resumed = _train(cohort, "resumed", settings, zoom_target_weight=0.0, resume=True)
    assert _log(cohort / "resumed") == _log(cohort / "sparse_run")
    a, b = _weights(cohort / "sparse_run"), _weights(cohort / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # What the first two epochs embedded came back from the cache and is still counted.
    assert resumed["sparse"]["per_epoch"][:2] == runs[1]["sparse"]["per_epoch"][:2]
    assert sum(resumed["sparse"]["reused_from_cache"].values()) > 0
