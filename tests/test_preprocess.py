"""`zoompipe preprocess`: feature files that read back, resume, atomic writes, bad slides."""

from __future__ import annotations

import csv
import json
import shutil

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from zoompipe.cli.main import cli
from zoompipe.encoders import create_encoder
from zoompipe.features import read_feature_file, write_feature_file
from zoompipe.grid import build_cascade, children_index
from zoompipe.patches import iter_patch_batches, read_patches
from zoompipe.preprocess import PreprocessConfig, preprocess_slides, run_contract
from zoompipe.slide import open_slide
from zoompipe.synthetic import write_synthetic_slide
from zoompipe.qc import TISSUE_RGB
from zoompipe.tissue import mask_from_geojson, tissue_mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))

MAGS = [2.5, 5.0]


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("efficientnet_lite0", precision="fp32")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    for seed in (1, 2):
        write_synthetic_slide(folder / f"s{seed}.svs", 5000, 4000, mpp=0.5, seed=seed)
    return folder


def _config(**kwargs) -> PreprocessConfig:
    return PreprocessConfig(magnifications=MAGS, patch_size=128, precision="fp32", batch_size=16, **kwargs)


def _status(out):
    with (out / "status.csv").open() as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def test_feature_file_matches_grid_and_direct_embedding(slides, tmp_path, encoder):
    results = preprocess_slides([slides / "s1.svs"], tmp_path, _config(children="all"), progress=False)
    assert [r.status for r in results] == ["ok"]
    saved = read_feature_file(tmp_path / "features" / "s1.h5")
    contract = saved.contract
    assert (contract.encoder.name, contract.encoder.feature_dim, contract.encoder.precision) == \
        ("efficientnet_lite0", 1280, "fp32")
    assert contract.grid.magnifications == tuple(MAGS) and contract.grid.patch_size == 128
    assert contract.slide.mpp == 0.5 and contract.tissue.user_masks is None
    assert saved.magnifications == MAGS
    with open_slide(slides / "s1.svs") as slide:
        mask = tissue_mask(slide, _config().tissue)
        grids = build_cascade(mask, slide.mpp, MAGS, patch_size=128, min_tissue=0.1)
        for grid, stored, features in zip(grids, saved.grids, saved.features):
            np.testing.assert_array_equal(stored.coords, grid.coords)
            np.testing.assert_array_equal(stored.parent, grid.parent)
            assert stored.patch_size_level0 == grid.patch_size_level0
            direct = encoder.embed(read_patches(slide, grid.coords, grid.mpp, 128))
            np.testing.assert_allclose(features, direct, rtol=0, atol=1e-4)
    # The explicit hierarchy survives the round trip: 4 children per parent, all present.
    index = children_index(saved.grids[0], saved.grids[1])
    assert index.shape == (len(saved.grids[0]), 4) and (index >= 0).all()
    with open_slide(slides / "s1.svs") as slide:
        # The GeoJSON holds the tissue: rasterised again, it is the mask.
        assert iou(mask_from_geojson(tmp_path / "geojson" / "s1.geojson", slide).mask, mask.mask) >= 0.99
    # The QC image outlines that tissue in green: every outline pixel lies on the mask's edge,
    # and the edge is outlined all around.
    qc = cv2.imread(str(tmp_path / "masks" / "s1.png"))[..., ::-1]
    green = (qc == TISSUE_RGB).all(axis=-1)
    edge = cv2.resize(mask.mask.astype(np.uint8), qc.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    edge = cv2.morphologyEx(edge, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    scale = mask.mask.shape[1] / qc.shape[1]
    near = lambda where, pixels: cv2.distanceTransform((~where).view(np.uint8), cv2.DIST_L2, 3) <= pixels
    tolerance = 1 / scale + 2  # one mask pixel and the line width, in QC pixels
    assert green.sum() > 100 and near(edge, tolerance)[green].all()
    assert near(green, tolerance)[edge].mean() > 0.95


def test_children_tissue_keeps_the_last_magnifications_tissue_patches(slides, tmp_path):
    every = preprocess_slides([slides / "s1.svs"], tmp_path / "all", _config(children="all"), progress=False)
    tissue = preprocess_slides([slides / "s1.svs"], tmp_path / "tissue", _config(), progress=False)
    assert [r.status for r in every + tissue] == ["ok", "ok"]
    full = read_feature_file(tmp_path / "all" / "features" / "s1.h5")
    kept = read_feature_file(tmp_path / "tissue" / "features" / "s1.h5")
    assert (full.contract.grid.children, kept.contract.grid.children) == ("all", "tissue")
    # The base is the same; at the last magnification only the children with min_tissue remain,
    # with the same features and parents.
    np.testing.assert_array_equal(kept.grids[0].coords, full.grids[0].coords)
    rows = np.flatnonzero(full.grids[1].tissue >= 0.1)
    assert 0 < len(rows) < len(full.grids[1])
    np.testing.assert_array_equal(kept.grids[1].coords, full.grids[1].coords[rows])
    np.testing.assert_array_equal(kept.grids[1].parent, full.grids[1].parent[rows])
    np.testing.assert_allclose(kept.features[1], full.features[1][rows], rtol=0, atol=1e-5)
    # A dropped child is a hole (-1) in its parent's bag of children.
    index = children_index(kept.grids[0], kept.grids[1])
    assert (index >= 0).sum() == len(rows) and (index < 0).any()


def test_reader_threads_return_batches_in_order(slides):
    with open_slide(slides / "s2.svs") as slide:
        coords = np.array([[x, y] for y in range(0, 4000, 700) for x in range(0, 5000, 900)])
        expected = read_patches(slide, coords, 2.0, 64)
        for workers in (0, 1, 3):
            got = np.concatenate(list(iter_patch_batches(slide, coords, 2.0, 64, batch_size=5, workers=workers)))
            np.testing.assert_array_equal(got, expected)


def test_resume_skips_done_and_redoes_deleted(slides, tmp_path):
    config = _config()
    first = preprocess_slides([slides], tmp_path, config, progress=False)
    assert sorted(r.status for r in first) == ["ok", "ok"]
    stamp = (tmp_path / "features" / "s1.h5").stat().st_mtime_ns
    second = preprocess_slides([slides], tmp_path, config, progress=False)
    assert [r.status for r in second] == ["skipped", "skipped"]
    (tmp_path / "masks" / "s2.png").unlink()
    third = {r.slide_id: r.status for r in preprocess_slides([slides], tmp_path, config, progress=False)}
    assert third == {"s1": "skipped", "s2": "ok"}
    assert (tmp_path / "features" / "s1.h5").stat().st_mtime_ns == stamp
    assert _status(tmp_path)["s1"]["status"] == "skipped"
    # A damaged table or record never stops a run: the table is rebuilt from the records.
    (tmp_path / "status.csv").write_bytes(b"\x00garbage")
    (tmp_path / "status" / "s2.json").write_text("{not json")
    with pytest.warns(UserWarning, match="damaged status record"):
        fourth = preprocess_slides([slides], tmp_path, config, progress=False)
    assert [r.status for r in fourth] == ["skipped", "skipped"]
    assert {k: r["status"] for k, r in _status(tmp_path).items()} == {"s1": "skipped", "s2": "skipped"}


def test_interrupted_write_leaves_no_complete_looking_file(slides, tmp_path, monkeypatch):
    original = h5py.Group.create_dataset

    def crash(self, name, *args, **kwargs):
        if name == "features" and self.name == "/5x":
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way through the file
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        preprocess_slides([slides / "s1.svs"], tmp_path, _config(), progress=False)
    assert list((tmp_path / "features").iterdir()) == []
    monkeypatch.setattr(h5py.Group, "create_dataset", original)
    assert [r.status for r in preprocess_slides([slides / "s1.svs"], tmp_path, _config(), progress=False)] == ["ok"]
    assert read_feature_file(tmp_path / "features" / "s1.h5").magnifications == MAGS


def test_bad_slide_is_recorded_and_the_run_goes_on(slides, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slides / "s1.svs", folder / "good.svs")
    (folder / "corrupt.svs").write_bytes(b"\x00garbage" * 100)
    result = CliRunner().invoke(cli, ["preprocess", str(folder), "--out", str(tmp_path / "out"),
                                      "--magnifications", "2.5,5", "--patch-size", "128", "--precision", "fp32"])
    assert result.exit_code == 1, result.output
    status = _status(tmp_path / "out")
    assert status["good"]["status"] == "ok" and status["good"]["detail"].startswith("2.5x:")
    assert status["corrupt"]["status"] == "failed" and "not a whole-slide image" in status["corrupt"]["error"]
    assert (tmp_path / "out" / "features" / "good.h5").exists()
    assert not (tmp_path / "out" / "features" / "corrupt.h5").exists()
    assert "Traceback" not in result.output


def test_clam_layout_is_read_as_one_magnification(tmp_path):
    path = tmp_path / "clam.h5"
    coords = np.array([[0, 0], [512, 0], [0, 512]], np.int64)
    features = np.random.default_rng(0).standard_normal((3, 1024)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=coords).attrs.update(patch_size=256, patch_size_level0=512)
        f.create_dataset("features", data=features)
    saved = read_feature_file(path, magnifications=[10])
    np.testing.assert_array_equal(saved.grids[0].coords, coords)
    np.testing.assert_array_equal(saved.features[0], features)
    np.testing.assert_array_equal(saved.grids[0].cells, [[0, 0], [1, 0], [0, 1]])
    assert saved.attrs["feature_dim"] == 1024 and saved.magnifications == [10.0]


def test_write_feature_file_refuses_misaligned_rows(slides, tmp_path):
    with open_slide(slides / "s1.svs") as slide:
        grids = build_cascade(tissue_mask(slide, _config().tissue), slide.mpp, MAGS, patch_size=128)
    with pytest.raises(ValueError):
        contract = run_contract(_config(), create_encoder("efficientnet_lite0", precision="fp32"))
        write_feature_file(tmp_path / "x.h5", contract, {}, grids, [np.zeros((1, 4), np.float32)] * 2)
    assert not any(tmp_path.iterdir())


def test_mask_drawn_in_qupath_replaces_segmentation(slides, tmp_path):
    masks = tmp_path / "masks_in"
    masks.mkdir()
    # One rectangle in level-0 pixels over the top-left 2048 x 2048 px: only patches there remain.
    ring = [[0, 0], [2048, 0], [2048, 2048], [0, 2048], [0, 0]]
    (masks / "s1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}]}))
    results = preprocess_slides([slides / "s1.svs"], tmp_path / "out", _config(mask_dir=str(masks)), progress=False)
    assert [r.status for r in results] == ["ok"]
    base = read_feature_file(tmp_path / "out" / "features" / "s1.h5", load_features=False).grids[0]
    assert len(base) > 0 and (base.coords < 2048).all()


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--encoder", "nope"], ["--workers", "0"],
                                  ["--mask-dir", "/no/such/folder"]], ids=lambda a: " ".join(a))
def test_bad_options_exit_2_before_anything_is_written(slides, tmp_path, args):
    result = CliRunner().invoke(cli, ["preprocess", str(slides), "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    line, = result.output.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
