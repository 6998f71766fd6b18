"""The zooming engine: same answer as the model on dense features, and reads only what it selects."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from zoompipe.cli.main import cli
from zoompipe.dataset import agreed_contract
from zoompipe.engine import ZoomPredictor
from zoompipe.features import read_feature_file
from zoompipe.grid import children_index
from zoompipe.heatmap import render_heatmaps
from zoompipe.model import ZoomMIL, ZoomMILConfig, create_model, save_run
from zoompipe.predict import predict_slides, read_prediction
from zoompipe.preprocess import PreprocessConfig, preprocess_slides
from zoompipe.slide import Slide, open_slide
from zoompipe.synthetic import write_synthetic_slide
from zoompipe.tiling import tile_slide

CASCADE = [2.5, 5.0, 10.0]
PATCH = 64
K = 3


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    slide = root / "lesion.svs"
    write_synthetic_slide(slide, 6000, 5000, mpp=0.5, seed=21, layout=dict(n_lesions=2, grade=2))
    config = PreprocessConfig(magnifications=CASCADE, patch_size=PATCH, precision="fp32", batch_size=32)
    assert [r.status for r in preprocess_slides([slide], root / "pre", config, progress=False)] == ["ok"]
    return slide, root / "pre" / "features" / "lesion.h5"


def _run(tmp_path, features_path, mags, seed=0, architecture="zoommil", **settings):
    torch.manual_seed(seed)
    extra = {"k": K, "attn_hidden": 32, **settings} if architecture == "zoommil" else {}
    model = create_model(architecture, in_dim=1280, n_classes=3, magnifications=mags, hidden=64, **extra)
    save_run(tmp_path / "run", model.eval(), architecture, ["a", "b", "c"], agreed_contract([features_path]))
    return tmp_path / "run", model


def _dense(model, features_path, mags):
    saved = read_feature_file(features_path, magnifications=mags)
    bags = [torch.from_numpy(f) for f in saved.features]
    children = [torch.from_numpy(children_index(a, b)) for a, b in zip(saved.grids, saved.grids[1:])]
    with torch.inference_mode():
        return model.eval()(bags, children), saved


@pytest.mark.parametrize("architecture, mags, settings", [
    ("zoommil", CASCADE, {}), ("zoommil", CASCADE, {"children_per_parent": 1}), ("abmil", [10.0], {}),
    ("clam_sb", [2.5], {}), ("clam_mb", [10.0], {}), ("transmil", [5.0], {})])
def test_predict_on_raw_slide_equals_model_on_dense_features(preprocessed, tmp_path, architecture, mags, settings):
    slide, features_path = preprocessed
    run, model = _run(tmp_path, features_path, mags, architecture=architecture, **settings)
    dense, saved = _dense(model, features_path, mags)
    # The features' precision: "auto" would take bf16 on a CPU with native bf16.
    prediction = ZoomPredictor(run, workers=2, precision="fp32").predict(slide)
    # Same precision, same patches, same encoder: only float summation order differs.
    np.testing.assert_allclose(prediction.probabilities, dense.probabilities.numpy(), atol=1e-4)
    for step, report in enumerate(prediction.magnifications):
        rows = dense.rows[step].numpy()
        np.testing.assert_array_equal(report.rows, rows)
        np.testing.assert_array_equal(report.boxes, saved.grids[step].boxes()[rows])
        np.testing.assert_allclose(report.attention, dense.attention[step].numpy(), atol=1e-4)
        if step < len(dense.selected):
            np.testing.assert_array_equal(report.rows[report.selected], dense.selected[step].numpy())
    if settings.get("children_per_parent") == 1:  # each patch chosen at 2.5x under its own parent
        parents = saved.grids[1].parent[dense.selected[1].numpy()]
        assert len(dense.selected[1]) == len(dense.selected[0]) == len(set(parents.tolist()))
    if len(mags) == 1:  # a model on one magnification sees every patch there that training saw
        assert prediction.magnifications[0].patches_embedded == len(saved.grids[0])


def test_only_selected_regions_are_read(preprocessed, tmp_path, monkeypatch):
    slide, features_path = preprocessed
    run, _ = _run(tmp_path, features_path, CASCADE, seed=1)
    reads: Counter = Counter()
    lock = threading.Lock()
    original = Slide.read_region

    def counting(self, x, y, width, height, mpp):
        if width == height == PATCH:
            with lock:
                reads[round(mpp, 6)] += 1
        return original(self, x, y, width, height, mpp)

    monkeypatch.setattr(Slide, "read_region", counting)
    prediction = ZoomPredictor(run).predict(slide)
    base = prediction.magnifications[0].patches_embedded
    # At 10x (the last magnification) only the selected parents' children with tissue are read,
    # the very rows the feature file holds under them (children="tissue").
    last = read_feature_file(features_path, [CASCADE[-1]], load_features=False).grids[0]
    middle = prediction.magnifications[1]
    tissue_children = np.flatnonzero(np.isin(last.parent, middle.rows[middle.selected]))
    assert 0 < len(tissue_children) < K * 4
    assert reads == {4.0: base, 2.0: K * 4, 1.0: len(tissue_children)}
    np.testing.assert_array_equal(prediction.magnifications[2].rows, tissue_children)
    assert [m.patches_embedded for m in prediction.magnifications] == [base, K * 4, len(tissue_children)]
    assert prediction.full_read_patches == len(last) < base * 4 * 4
    assert base > K  # the test is only meaningful when selection actually drops patches


def test_heatmaps_have_thumbnail_size_and_change_only_tissue(preprocessed, tmp_path):
    slide_path, features_path = preprocessed
    run, _ = _run(tmp_path, features_path, CASCADE)
    prediction = ZoomPredictor(run).predict(slide_path)
    with open_slide(slide_path) as slide:
        mask = tile_slide(slide, prediction.pipeline).mask
        images = render_heatmaps(prediction, slide, mask)
        thumb = images["thumbnail"]
    tissue = cv2.resize(mask.mask.astype(np.uint8), thumb.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    for mag in CASCADE:
        overlay = images[f"attention_{mag:g}x"]
        assert overlay.shape == thumb.shape
        changed = (overlay != thumb).any(axis=-1)
        assert changed.any() and not (changed & ~tissue).any()
    assert images["zoom"].shape == thumb.shape and (images["zoom"] != thumb).any()
    # The panel shows zoom + 3 overlays in two columns within about MAX_SIDE pixels, plus a colour bar.
    assert images["panel"].shape[1] <= 2048 + 2 * 4 + 60 and images["panel"].shape[0] > thumb.shape[0] // 2


def test_predict_command_writes_json_heatmaps_and_reports_bad_slides(preprocessed, tmp_path):
    slide, features_path = preprocessed
    run, _ = _run(tmp_path, features_path, CASCADE)
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide")
    out = tmp_path / "pred"
    result = CliRunner().invoke(cli, ["predict", str(slide), str(bad), "--model", str(run), "--out", str(out),
                                      "--heatmap", "--geojson", "--profile"])
    assert result.exit_code == 1, result.output
    assert "lesion: " in result.output and "a full read at 10x would embed" in result.output
    assert "error: " in result.output and "broken.svs" in result.output and "Traceback" not in result.output
    saved = read_prediction(out / "lesion.json")
    assert len(saved.magnifications) == 3
    np.testing.assert_allclose(saved.probabilities, ZoomPredictor(run).predict(slide).probabilities, atol=1e-5)
    for name in ("attention_2.5x", "attention_10x", "zoom", "panel"):
        assert cv2.imread(str(out / f"lesion_{name}.png")) is not None
    assert (out / "lesion_regions.geojson").exists()
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["slide_id"], r["status"], r["predicted"]) for r in rows] == [
        ("lesion", "ok", saved.predicted), ("broken", "failed", "")]
    assert float(rows[0]["p_a"]) == pytest.approx(saved.probabilities[0], abs=1e-6)
    redraw = CliRunner().invoke(cli, ["heatmap", str(out / "lesion.json"), str(slide), "--out", str(tmp_path / "re")])
    assert redraw.exit_code == 0, redraw.output
    assert (tmp_path / "re" / "lesion_zoom.png").exists()


def test_predict_real_aperio_slide_with_the_demo_model(cmu_slide, tmp_path):
    result = CliRunner().invoke(cli, ["predict", str(cmu_slide), "--out", str(tmp_path), "--heatmap"])
    assert result.exit_code == 0, result.output
    assert "using the demo model" in result.output
    prediction = read_prediction(tmp_path / "CMU-1-Small-Region.json")
    assert prediction.slide_dimensions == (2220, 2967) and prediction.slide_mpp == pytest.approx(0.499)
    # Every box read at a magnification lies inside a box zoomed into at the one below (level-0 px).
    for low, high in zip(prediction.magnifications, prediction.magnifications[1:]):
        chosen = low.boxes[low.selected]
        inside = ((high.boxes[:, None, :2] >= chosen[None, :, :2]) & (high.boxes[:, None, 2:] <= chosen[None, :, 2:]))
        assert inside.all(axis=-1).any(axis=1).all()
    assert prediction.magnifications[0].boxes[:, :2].min() == 0
    assert cv2.imread(str(tmp_path / "CMU-1-Small-Region_panel.png")) is not None


def test_predict_refuses_a_pickled_checkpoint_in_one_line(preprocessed, tmp_path):
    slide, features_path = preprocessed
    run = tmp_path / "run"
    model = ZoomMIL(ZoomMILConfig(in_dim=1280, n_classes=2, magnifications=[2.5], hidden=8, attn_hidden=4))
    save_run(run, model, "zoommil", ["a", "b"], agreed_contract([features_path]))
    torch.save(model.state_dict(), run / "model.safetensors")  # a pickle under the safetensors name
    copy = tmp_path / "second.svs"
    shutil.copy(slide, copy)
    out = tmp_path / "out"
    # The model loads while the first slide's tissue is found; its fault is the run's, not the
    # slide's: the batch stops at once instead of failing every slide in turn.
    result = CliRunner().invoke(cli, ["predict", str(slide), str(copy), "--model", str(run), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "pickle" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not list((out / "status").glob("*.json")) and not (out / "predictions.csv").exists()
    # A run whose features were not made by zoompipe is refused before any slide is opened.
    save_run(run, model, "zoommil", ["a", "b"], None)
    result = CliRunner().invoke(cli, ["predict", "whatever.svs", "--model", str(run)])
    assert result.exit_code == 1 and "CLAM/TRIDENT" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_crash_in_one_slide_fails_it_and_the_batch_goes_on(preprocessed, tmp_path, monkeypatch):
    slide, features_path = preprocessed
    run, _ = _run(tmp_path, features_path, [2.5], architecture="abmil")
    inputs = []
    for name in ("first", "crash", "last"):
        inputs.append(tmp_path / f"{name}.svs")
        shutil.copy(slide, inputs[-1])
    original = Slide.read_region

    def reader(self, *args, **kwargs):
        if self.slide_id == "crash":
            raise RuntimeError("decoder\nexploded")  # not one of zoompipe's errors
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Slide, "read_region", reader)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", *map(str, inputs), "--model", str(run), "--out", str(out)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "crash.svs" in errors[0] and "RuntimeError: decoder exploded" in errors[0]
    with open(out / "predictions.csv") as handle:
        assert [(r["slide_id"], r["status"]) for r in csv.DictReader(handle)] == [
            ("first", "ok"), ("crash", "failed"), ("last", "ok")]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "status").glob("*.json")}
    assert {k: r["status"] for k, r in records.items()} == {"first": "ok", "crash": "failed", "last": "ok"}
    assert "decoder exploded" in records["crash"]["error"]
    with open(out / "status.csv") as handle:
        assert sorted(r["slide_id"] for r in csv.DictReader(handle)) == ["crash", "first", "last"]

    # An interrupt stops the batch, but what was done is on disk.
    def interrupt(self, *args, **kwargs):
        if self.slide_id == "crash":
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Slide, "read_region", interrupt)
    again = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt):
        predict_slides(inputs, ZoomPredictor(run), again)
    with open(again / "predictions.csv") as handle:
        assert [r["slide_id"] for r in csv.DictReader(handle)] == ["first"]
    assert (again / "status.csv").exists() and (again / "status" / "first.json").exists()


def test_two_slides_with_one_id_are_refused_naming_both(preprocessed, tmp_path):
    slide, features_path = preprocessed
    run, _ = _run(tmp_path, features_path, [2.5], architecture="abmil")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(slide, tmp_path / folder / "same.svs")
    paths = [str(tmp_path / "a" / "same.svs"), str(tmp_path / "b" / "same.svs")]
    for args in (["predict", *paths, "--model", str(run), "--out", str(tmp_path / "p")],
                 ["preprocess", *paths, "--out", str(tmp_path / "q")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        line, = result.output.strip().splitlines()
        assert line.startswith("error: ") and paths[0] in line and paths[1] in line
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_predict_uses_the_masks_the_run_was_preprocessed_with(preprocessed, tmp_path):
    slide, _ = preprocessed
    masks = tmp_path / "masks"
    masks.mkdir()
    ring = [[0, 0], [3000, 0], [3000, 2500], [0, 2500], [0, 0]]
    (masks / "lesion.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    config = PreprocessConfig(magnifications=[2.5], patch_size=PATCH, precision="fp32", mask_dir=str(masks))
    assert [r.status for r in preprocess_slides([slide], tmp_path / "pre", config, progress=False)] == ["ok"]
    features_path = tmp_path / "pre" / "features" / "lesion.h5"
    saved = read_feature_file(features_path, load_features=False)
    assert saved.contract.tissue.user_masks.file == "lesion.geojson"
    run, _ = _run(tmp_path, features_path, [2.5], architecture="abmil")

    result = CliRunner().invoke(cli, ["predict", str(slide), "--model", str(run), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "--mask-dir" in result.output and not (tmp_path / "p").exists()
    result = CliRunner().invoke(cli, ["predict", str(slide), "--model", str(run), "--out", str(tmp_path / "p"),
                                      "--mask-dir", str(masks), "--heatmap"])
    assert result.exit_code == 0, result.output
    prediction = read_prediction(tmp_path / "p" / "lesion.json")
    np.testing.assert_array_equal(prediction.magnifications[0].boxes, saved.grids[0].boxes())
    assert (saved.grids[0].coords < 3000).all()
    # The heatmap is drawn inside the drawn mask only.
    panel = cv2.imread(str(tmp_path / "p" / "lesion_attention_2.5x.png"))[..., ::-1]
    with open_slide(slide) as handle:
        thumb = render_heatmaps(prediction, handle, tile_slide(handle, prediction.pipeline, masks).mask)["thumbnail"]
        scale = handle.mpp * max(handle.dimensions) / max(thumb.shape[:2])
    changed = (panel != thumb).any(axis=-1)
    ys, xs = np.nonzero(changed)
    assert changed.any() and xs.max() * scale < 3000 + scale and ys.max() * scale < 2500 + scale
