"""Precision follows the hardware: bf16 and fp32 features lead the model to the same diagnosis.

Tolerance. bf16 keeps 8 significant bits, so every layer of the encoder rounds by up to 2^-9
(0.2%) relative; lite0's features then differ from fp32 by 6-14% (L2, relative; cosine
0.990-0.999) on the demo slide below (measured on a CPU with native bf16). The demo model's
probabilities move by under 0.001 there, and the test allows 0.05. Its zoom heads, taught where
the lesions are, are steep: bf16 moved one of the nine base patches' zoom scores by 28% of their
spread and swapped it for the third-ranked patch, one of the K = 2 picks. On the zoom benchmark
(README, "Precision and runtime follow the hardware") bf16 swapped 1-3 patches of K in 41 of 134
zoom steps (at 1.25x, patches within 6% of the score spread of the K-th) and kept the diagnosis
on 79 of 80 slides. So the test asks for the same class and close probabilities, and at every
step compared (the same bag in both) at least half of the K picks shared and, at the base step
(where no per-parent limit reorders the ranking), every patch that bf16 adds among fp32's top 2K:
bf16 may reorder patches at the edge of the top K, not send the zoom elsewhere. After a step
whose picks differ, the two runs read different patches and are no longer compared.
"""

import warnings

import numpy as np
import pytest
import torch

from zoompipe.encoders import create_encoder
from zoompipe.encoders.encoder import _cpu_has_fast_bf16, _warn_once
from zoompipe.engine import ZoomPredictor
from zoompipe.predict import demo_run_dir
from zoompipe.synthetic import write_synthetic_slide

PROBABILITY_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def demo_slides(tmp_path_factory):
    """A malignant slide the size of `make demo`'s (20480 x 16384 px at 0.5 mpp).

    One slide: bf16 is emulated on most CPUs and embeds about 4x slower than fp32.
    """
    path = tmp_path_factory.mktemp("demo") / "malignant.svs"
    write_synthetic_slide(path, 20480, 16384, mpp=0.5, seed=9, layout=dict(grade=2))
    return [path]


def test_bf16_and_fp32_features_give_the_same_diagnosis_and_nearly_the_same_zoom(demo_slides):
    fp32 = ZoomPredictor(demo_run_dir(), precision="fp32", runtime="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 on most CPUs: slow, which is not the point here
        bf16 = ZoomPredictor(demo_run_dir(), precision="bf16")
    assert (fp32.encoder.precision, bf16.encoder.precision) == ("fp32", "bf16")
    compared = 0
    for path in demo_slides:
        a, b = fp32.predict(path), bf16.predict(path)
        assert a.predicted == b.predicted
        assert np.abs(a.probabilities - b.probabilities).max() <= PROBABILITY_TOLERANCE
        for step, (low_a, low_b) in enumerate(zip(a.magnifications[:-1], b.magnifications[:-1])):
            np.testing.assert_array_equal(low_a.rows, low_b.rows)  # the same bag at this step
            picked_a, picked_b = set(low_a.rows[low_a.selected]), set(low_b.rows[low_b.selected])
            compared += 1
            k = len(picked_a)
            assert len(picked_b) == k > 0
            assert len(picked_a & picked_b) >= k / 2
            if step == 0:
                top_2k = set(low_a.rows[np.argsort(-low_a.selection_scores)[:2 * k]])
                assert picked_b - picked_a <= top_2k
            if picked_a != picked_b:
                break
    assert compared >= len(demo_slides)


@pytest.mark.skipif(_cpu_has_fast_bf16(), reason="this CPU runs bf16 natively")
def test_explicit_bf16_on_a_cpu_without_it_warns_once():
    _warn_once.cache_clear()
    with pytest.warns(UserWarning, match="no native bf16") as caught:
        create_encoder(precision="bf16")
        create_encoder(precision="bf16")
    assert len([w for w in caught if "bf16" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert create_encoder(precision="auto").precision == "fp32"


def test_auto_precision_follows_the_cpu(monkeypatch):
    predictor = ZoomPredictor(demo_run_dir())
    # The demo model's features were bf16; that is reported, not imposed.
    assert predictor.encoder_report["training_precision"] == "bf16"
    assert predictor.encoder.precision == ("bf16" if _cpu_has_fast_bf16() else "fp32")
    assert predictor.encoder_report["precision"] == predictor.encoder.precision
    assert predictor.encoder.device == torch.device("cpu")
