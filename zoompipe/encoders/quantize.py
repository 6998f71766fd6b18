"""Int8 graphs of encoders for OpenVINO on CPU: an opt-in trade of exactness for speed.

An encoder's checked fp32 ONNX graph (:mod:`zoompipe.encoders.export`) is quantised once by
NNCF's post-training quantisation and kept beside it in the cache as OpenVINO IR
(``<graph>.int8.xml`` and ``.bin``). Calibration reads procedural H&E-like patches
(:class:`~zoompipe.synthetic.SyntheticTissue`, at 10x, 2.5x and 1.25x alike), so the graph is
the same on every machine and for every cohort, and nothing is downloaded.

Int8 features are not those of fp32: ``benchmarks/encoder_runtimes.py`` measures the speed and
the features' cosine similarity to fp32, and the README gives what it changes in predictions.
Features and models of one precision should not be mixed with another's without checking.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import numpy as np

from ..errors import ZoompipeError
from .config import EncoderConfig

#: Calibration patches (NNCF's default subset is 300): quantising EfficientNet-Lite0 on 128
#: takes about 7 s on 2 cores, paid once per graph.
CALIBRATION_PATCHES = 128


def quantized_path(onnx: Path) -> Path:
    """Where the int8 graph quantised from the fp32 graph ``onnx`` is cached."""
    return onnx.with_name(f"{onnx.stem}.int8.xml")


def calibration_patches(config: EncoderConfig, n: int = CALIBRATION_PATCHES, seed: int = 0) -> np.ndarray:
    """Normalised ``(n, 3, S, S)`` float32 tissue patches for calibrating ``config``'s encoder.

    Patches are drawn at random places of a synthetic slide with lesions, at downsamples 2, 4
    and 16 of 0.5 um/px (10x, 2.5x, 1.25x: the magnifications a cascade reads), and kept when
    at least 10% of their pixels are tissue, the tiling's default rule (glass included).
    """
    from ..synthetic import SyntheticTissue

    side = config.input_size
    slide = SyntheticTissue(16384, 16384, mpp=0.5, seed=seed + 1, n_lesions=4, grade=2, tissue_fraction=0.6)
    rng = np.random.default_rng(seed)
    patches = []
    while len(patches) < n:
        downsample = float(rng.choice([2.0, 4.0, 16.0]))
        limit = 16384 / downsample - side
        patch = slide.render(downsample, int(rng.uniform(0, limit)), int(rng.uniform(0, limit)), side, side)
        if (patch.mean(axis=2) < 220).mean() >= 0.1:
            patches.append(patch)
    x = np.stack(patches).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    mean = np.asarray(config.mean, np.float32)[:, None, None]
    std = np.asarray(config.std, np.float32)[:, None, None]
    return (x - mean) / std


def quantized_graph(onnx: Path, config: EncoderConfig) -> Path:
    """The int8 OpenVINO graph of the fp32 graph ``onnx``, quantised and cached if there is none.

    Raises
    ------
    ZoompipeError
        NNCF is not installed.
    """
    target = quantized_path(onnx)
    if target.exists():
        return target
    if importlib.util.find_spec("nncf") is None:
        raise ZoompipeError("precision int8 needs the package nncf: pip install 'zoompipe[int8]'")
    import nncf
    import openvino

    calibration = calibration_patches(config)
    model = nncf.quantize(
        openvino.Core().read_model(str(onnx)),
        nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))]),
        subset_size=len(calibration),
        # Symmetric activations: 1.1x faster and closer to fp32 than MIXED on EfficientNet-Lite0.
        preset=nncf.QuantizationPreset.PERFORMANCE,
    )
    # IR is two files: the weights are renamed into place first, so a reader that finds the
    # .xml finds its .bin. Quantisation is deterministic, so concurrent writers write the same.
    tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:12]}.tmp.xml")
    try:
        openvino.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return target
