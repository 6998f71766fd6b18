"""The synthetic lesion cohort: deterministic, stratified, and its classes differ only when zoomed in."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from zoompipe.synthetic import GRADES, LESION_COVERAGE, SyntheticTissue, lesion_nuclei

SLIDE = dict(width=16384, height=16384, mpp=0.5, seed=3, n_lesions=3, tissue_fraction=0.4)


def test_grades_look_the_same_at_low_magnification_and_differ_at_10x():
    grades = [SyntheticTissue(**SLIDE, grade=g) for g in (0, 1, 2)]
    lesion = grades[0].lesion_mask(16)
    assert lesion.any()
    # 8 um/px (1.25x): nuclei are smaller than a pixel, so every grade renders the same pixels.
    low = [g.render(16, 0, 0, 1024, 1024) for g in grades]
    assert all(np.array_equal(low[0], other) for other in low[1:])
    tissue = grades[0].tissue_mask(16)
    assert low[0][lesion].mean() < low[0][tissue & ~lesion].mean()  # lesions look denser in every grade
    # 1 um/px (10x) inside a lesion: the nuclei differ between grades.
    ys, xs = np.nonzero(lesion)
    x, y = int(xs[len(xs) // 2] * 16), int(ys[len(ys) // 2] * 16)
    high = [g.render(1, x - 128, y - 128, 256, 256) for g in grades]
    assert not np.array_equal(high[0], high[2])
    assert 0 < LESION_COVERAGE < 1


def test_cohort_is_stratified_and_deterministic_across_processes(tmp_path):
    script = ("import sys; from zoompipe.synthetic import write_cohort; "
              "write_cohort(sys.argv[1], 9, width=2048, height=2048, lesions=(1, 1))")
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        subprocess.run([sys.executable, "-c", script, str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
        outputs.append(out)
    for name in ("labels.csv", "splits.csv"):
        assert (outputs[0] / name).read_text() == (outputs[1] / name).read_text()
    labels = dict(line.split(",") for line in (outputs[0] / "labels.csv").read_text().split()[1:])
    splits = dict(line.split(",") for line in (outputs[0] / "splits.csv").read_text().split()[1:])
    for label in set(labels.values()):
        assert sorted(splits[s] for s in labels if labels[s] == label) == ["test", "train", "val"]
    assert len(list((outputs[0] / "slides").glob("*.svs"))) == 9
    assert len(list((outputs[0] / "regions").glob("*.png"))) == 9


def test_grade_strength_interpolates_from_normal_and_defaults_to_the_grades():
    assert lesion_nuclei(2) == GRADES[2]
    assert lesion_nuclei(2, 0.0) == GRADES[0]
    radius = [lesion_nuclei(2, s)[0] for s in (0.0, 0.5, 1.0)]
    assert radius[0] < radius[1] < radius[2]
    # At strength 0 the lesions of every grade render the same pixels, even at 10x.
    grades = [SyntheticTissue(**SLIDE, grade=g, grade_strength=0.0) for g in (0, 2)]
    ys, xs = np.nonzero(grades[0].lesion_mask(16))
    x, y = int(xs[len(xs) // 2] * 16), int(ys[len(ys) // 2] * 16)
    high = [g.render(1, x - 128, y - 128, 256, 256) for g in grades]
    assert np.array_equal(high[0], high[1])
