"""The zooming engine: same answer as the model on dense features, and reads only what it selects."""

from __future__ import annotations

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
from zoompipe.model import ZoomMIL, ZoomMILConfig, save_run
from zoompipe.predict import read_prediction
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


def _run(tmp_path, features_path, mags, seed=0):
    torch.manual_seed(seed)
    model = ZoomMIL(ZoomMILConfig(in_dim=1280, n_classes=3, magnifications=mags, k=K, hidden=64, attn_hidden=32))
    save_run(tmp_path / "run", model.eval(), "zoommil", ["a", "b", "c"], agreed_contract([features_path]))
    return tmp_path / "run", model


def _dense(model, features_path, mags):
    saved = read_feature_file(features_path, magnifications=mags)
    bags = [torch.from_numpy(f) for f in saved.features]
    children = [torch.from_numpy(children_index(a, b)) for a, b in zip(saved.grids, saved.grids[1:])]
    with torch.inference_mode():
        return model.eval()(bags, children), saved


@pytest.mark.parametrize("mags", [CASCADE, [10.0]], ids=["zoommil", "abmil-10x"])
def test_predict_on_raw_slide_equals_model_on_dense_features(preprocessed, tmp_path, mags):
    slide, features_path = preprocessed
    run, model = _run(tmp_path, features_path, mags)
    dense, saved = _dense(model, features_path, mags)
    prediction = ZoomPredictor(run, workers=2).predict(slide)
    # Same precision, same patches, same encoder: only float summation order differs.
    np.testing.assert_allclose(prediction.probabilities, dense.probabilities.numpy(), atol=1e-4)
    for step, report in enumerate(prediction.magnifications):
        rows = dense.rows[step].numpy()
        np.testing.assert_array_equal(report.rows, rows)
        np.testing.assert_array_equal(report.boxes, saved.grids[step].boxes()[rows])
        np.testing.assert_allclose(report.attention, dense.attention[step].numpy(), atol=1e-4)
        if step < len(dense.selected):
            np.testing.assert_array_equal(report.rows[report.selected], dense.selected[step].numpy())
    if mags == [10.0]:  # ABMIL at 10x sees every 10x patch that training saw
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
    assert reads == {4.0: base, 2.0: K * 4, 1.0: K * 4}
    assert [m.patches_embedded for m in prediction.magnifications] == [base, K * 4, K * 4]
    assert prediction.full_read_patches == base * 4 * 4
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
    assert saved.predicted in ("a", "b", "c") and len(saved.magnifications) == 3
    for name in ("attention_2.5x", "attention_10x", "zoom", "panel"):
        assert cv2.imread(str(out / f"lesion_{name}.png")) is not None
    assert (out / "lesion_regions.geojson").exists()
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 3 and ",failed," in rows[2]
    redraw = CliRunner().invoke(cli, ["heatmap", str(out / "lesion.json"), str(slide), "--out", str(tmp_path / "re")])
    assert redraw.exit_code == 0, redraw.output
    assert (tmp_path / "re" / "lesion_zoom.png").exists()


def test_predict_real_aperio_slide_with_the_demo_model(cmu_slide, tmp_path):
    result = CliRunner().invoke(cli, ["predict", str(cmu_slide), "--out", str(tmp_path), "--heatmap"])
    assert result.exit_code == 0, result.output
    assert "using the demo model" in result.output
    prediction = read_prediction(tmp_path / "CMU-1-Small-Region.json")
    assert prediction.slide_dimensions == (2220, 2967) and prediction.slide_mpp == pytest.approx(0.499)
    assert abs(sum(prediction.probabilities) - 1) < 1e-5
    # Every box read at a magnification lies inside a box zoomed into at the one below (level-0 px).
    for low, high in zip(prediction.magnifications, prediction.magnifications[1:]):
        chosen = low.boxes[low.selected]
        inside = ((high.boxes[:, None, :2] >= chosen[None, :, :2]) & (high.boxes[:, None, 2:] <= chosen[None, :, 2:]))
        assert inside.all(axis=-1).any(axis=1).all()
    assert prediction.magnifications[0].boxes[:, :2].min() == 0
    assert cv2.imread(str(tmp_path / "CMU-1-Small-Region_panel.png")) is not None


def test_predict_refuses_a_pickled_checkpoint_in_one_line(tmp_path):
    run = tmp_path / "run"
    model = ZoomMIL(ZoomMILConfig(in_dim=1280, n_classes=2, magnifications=[1.25], hidden=8, attn_hidden=4))
    save_run(run, model, "zoommil", ["a", "b"], None)
    torch.save(model.state_dict(), run / "model.safetensors")  # a pickle under the safetensors name
    result = CliRunner().invoke(cli, ["predict", "whatever.svs", "--model", str(run)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "pickle" in result.output
    assert len(result.output.strip().splitlines()) == 1
