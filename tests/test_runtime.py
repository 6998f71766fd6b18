"""The CPU runtime: OpenVINO features equal torch fp32, graphs are cached once and exported safely.

OpenVINO runs fp32 (and int8), and precision "auto" is bf16 on a CPU with native bf16, so the
tests ask for fp32 wherever they mean it: they must pass on any CPU.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from zoompipe.encoders import EncoderConfig, create_encoder, register_encoder
from zoompipe.encoders.encoder import _cpu_has_int8_dot_product, _warn_once, resolve_precision
from zoompipe.encoders.runtime import TOLERANCE, OpenVinoForward, resolve_runtime
from zoompipe.errors import ZoompipeError
from zoompipe.slide import open_slide
from zoompipe.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def tissue_patches(tmp_path_factory) -> np.ndarray:
    """Sixteen 256 px patches read from a synthetic slide at 1 mpp, lesions and background."""
    path = tmp_path_factory.mktemp("slide") / "tissue.svs"
    write_synthetic_slide(path, 4096, 2048, mpp=0.5, seed=3, layout=dict(n_lesions=2, grade=2))
    with open_slide(path) as slide:
        return np.stack([slide.read_region(x, y, 256, 256, 1.0)[..., :3]
                         for y in (0, 512, 1024, 1536) for x in (0, 1024, 2048, 3072)])


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory) -> dict:
    """Seeded weights for a CNN and a ViT of timm, as a user passes them with --weights."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for arch in ("resnet18", "vit_tiny_patch16_224"):
        torch.manual_seed(0)
        files[arch] = folder / f"{arch}.safetensors"
        save_file(timm.create_model(arch, pretrained=False).state_dict(), files[arch])
    return files


@pytest.mark.parametrize("name", ["efficientnet_lite0", "timm:resnet18", "timm:vit_tiny_patch16_224"])
def test_openvino_features_equal_torch_fp32(name, tissue_patches, weights_files):
    weights = weights_files.get(name.removeprefix("timm:"))
    fast = create_encoder(name, weights=weights, runtime="openvino", precision="fp32")
    reference = create_encoder(name, weights=weights, runtime="torch", precision="fp32")
    assert (fast.runtime, fast.precision, reference.runtime) == ("openvino", "fp32", "torch")
    ours, theirs = fast.embed(tissue_patches), reference.embed(tissue_patches)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    # Patches that the features tell apart far beyond the tolerance: the comparison means something.
    assert np.ptp(theirs, axis=0).max() > 1000 * TOLERANCE
    assert np.abs(ours - theirs).max() <= TOLERANCE
    np.testing.assert_array_equal(ours, fast.embed(tissue_patches))


def test_graph_is_exported_once_per_weights(tmp_path, monkeypatch, weights_files, tissue_patches):
    monkeypatch.setenv("ZOOMPIPE_CACHE_DIR", str(tmp_path))
    first = create_encoder("timm:resnet18", weights=weights_files["resnet18"], runtime="openvino", precision="fp32")
    graphs = list(tmp_path.rglob("*.onnx"))
    assert first.exported and len(graphs) == 1
    stamp = graphs[0].stat().st_mtime_ns, graphs[0].stat().st_ino
    second = create_encoder("timm:resnet18", weights=weights_files["resnet18"], runtime="openvino",
                            precision="fp32")
    assert not second.exported and second.runtime == "openvino"
    assert (graphs[0].stat().st_mtime_ns, graphs[0].stat().st_ino) == stamp
    np.testing.assert_array_equal(first.embed(tissue_patches[:2]), second.embed(tissue_patches[:2]))
    # Other weights, same architecture: a graph of their own.
    other = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(other, tmp_path / "other.safetensors")
    assert create_encoder("timm:resnet18", weights=tmp_path / "other.safetensors", runtime="openvino",
                          precision="fp32").exported
    assert len(list(tmp_path.rglob("*.onnx"))) == 2
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_the_compiled_model_is_kept_for_the_next_process(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOOMPIPE_CACHE_DIR", str(tmp_path))
    first = create_encoder(runtime="openvino", precision="fp32")  # exports and checks: nothing compiled is kept yet
    assert first.exported and not list(tmp_path.rglob("*.blob"))
    graph = first.graph.graph
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    compiled = OpenVinoForward(graph, 2)
    (blob,) = tmp_path.rglob("*.blob")
    stamp, size = (blob.stat().st_mtime_ns, blob.stat().st_ino), blob.stat().st_size
    imported = OpenVinoForward(graph, 2)  # imported from the blob, not compiled again
    assert (blob.stat().st_mtime_ns, blob.stat().st_ino) == stamp
    torch.testing.assert_close(imported(x), compiled(x), rtol=0, atol=0)
    blob.write_bytes(blob.read_bytes()[: size // 2])  # a damaged blob is compiled anew, and replaced
    torch.testing.assert_close(OpenVinoForward(graph, 2)(x), compiled(x), rtol=0, atol=0)
    assert blob.stat().st_size > size // 2
    stamp = blob.stat().st_mtime_ns, blob.stat().st_ino
    torch.testing.assert_close(OpenVinoForward(graph, 2)(x), compiled(x), rtol=0, atol=0)
    assert (blob.stat().st_mtime_ns, blob.stat().st_ino) == stamp  # the new blob imports
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_cached_graph_loads_without_building_the_model(tmp_path):
    # The default weights ship as a file: its digest finds the graph, and timm is never imported.
    probe = ("import sys; from zoompipe.encoders import create_encoder; "
             "e = create_encoder(runtime='openvino', precision='fp32'); "
             "print(e.runtime, e.exported, e.model is None, 'timm' in sys.modules)")
    env = dict(os.environ, ZOOMPIPE_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["openvino", "True", "False", "True"],
                                                ["openvino", "False", "True", "False"]], runs[-1].stderr[-2000:]


def test_auto_takes_the_runtime_measured_faster_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOOMPIPE_CACHE_DIR", str(tmp_path))
    first = create_encoder(precision="fp32")  # exports the graph, times both runtimes, records the faster
    records = list(tmp_path.rglob("*.runtime"))
    assert first.exported and len(records) == 1
    assert records[0].read_text().strip() == first.runtime in ("torch", "openvino")
    assert records[0].name.startswith(next(tmp_path.rglob("*.onnx")).stem)
    # Whatever was measured, later runs follow the record and do not measure again; a graph known
    # to be the faster loads without building the model.
    for choice in ("torch", "openvino", "torch"):
        records[0].write_text(choice + "\n")
        again = create_encoder(precision="fp32")
        assert (again.runtime, again.model is None, again.exported) == (choice, choice == "openvino", False)
        assert (again.graph is None) == (choice == "torch")
        assert records[0].read_text().strip() == choice


# Each process exports, then waits in the check until the other has exported too, so both
# renames race for the same cache entry every time.
CONCURRENT_EXPORT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from zoompipe.encoders import lookup
    from zoompipe.encoders.export import cached_graph
    from zoompipe.encoders.runtime import OpenVinoForward

    me, other = Path(sys.argv[1]), Path(sys.argv[2])
    builder, variant = lookup("efficientnet_lite0")
    model, config = builder(weights=None, variant=variant)

    def check(tmp):
        me.touch()
        while not other.exists():
            time.sleep(0.05)

    path, exported = cached_graph(model, config, check)
    print(exported, path)
""")


def test_concurrent_exports_leave_one_complete_graph(tmp_path, monkeypatch, tissue_patches):
    env = dict(os.environ, ZOOMPIPE_CACHE_DIR=str(tmp_path / "cache"))
    marks = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_EXPORT, str(mine), str(theirs)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mine, theirs in (marks, marks[::-1])]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.split()[0] for out, _ in outputs] == ["True", "True"]  # both really exported
    assert len({out.split()[1] for out, _ in outputs}) == 1
    files = list((tmp_path / "cache").rglob("*"))
    assert [p.suffix for p in files if p.is_file()] == [".onnx"]
    # The graph that won is complete: a fresh encoder reads it instead of exporting.
    monkeypatch.setenv("ZOOMPIPE_CACHE_DIR", str(tmp_path / "cache"))
    cached = create_encoder("efficientnet_lite0", precision="fp32")
    assert not cached.exported
    reference = create_encoder("efficientnet_lite0", runtime="torch", precision="fp32")
    assert np.abs(cached.embed(tissue_patches[:4]) - reference.embed(tissue_patches[:4])).max() <= TOLERANCE


class _SingularValues(nn.Module):
    """A feature model with an operator ONNX does not have (linalg_svdvals)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x.mean(2))


@register_encoder("test_svd")
def _svd_encoder(weights, variant):
    return _SingularValues(), EncoderConfig(name="test_svd", feature_dim=3, weights="none", input_size=32)


def test_an_encoder_that_does_not_export_runs_on_torch(tissue_patches):
    with pytest.warns(UserWarning, match="does not export to ONNX.*runs on torch"):
        encoder = create_encoder("test_svd", precision="fp32")
    assert encoder.runtime == "torch"
    assert encoder.embed(tissue_patches[:2]).shape == (2, 3)
    with pytest.raises(ZoompipeError, match="does not export") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            create_encoder("test_svd", runtime="openvino", precision="fp32")
    assert "\n" not in str(info.value)


def test_runtime_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu, "fp32") == "openvino"
    assert resolve_runtime("auto", cpu, "bf16") == "torch"
    assert resolve_runtime("auto", cuda, "fp16") == "torch"
    assert resolve_runtime("torch", cpu, "fp32") == "torch"
    assert resolve_runtime("auto", cpu, "int8") == "openvino"
    with pytest.raises(ZoompipeError, match="fp32 or int8 on CPU only"):
        resolve_runtime("openvino", cuda, "fp32")
    with pytest.raises(ZoompipeError, match="fp32 or int8 on CPU only"):
        resolve_runtime("openvino", cpu, "bf16")
    with pytest.raises(ZoompipeError, match="int8 runs on OpenVINO only"):
        resolve_runtime("torch", cpu, "int8")
    with pytest.raises(ZoompipeError, match="int8 runs on CPU"):
        resolve_precision("int8", cuda)
    assert resolve_precision("auto", cpu) != "int8"  # only ever asked for
    with pytest.raises(ZoompipeError, match="unknown runtime"):
        resolve_runtime("tensorrt", cpu, "fp32")


def test_int8_is_quantised_once_close_to_fp32_and_not_equal(tmp_path, monkeypatch, tissue_patches):
    monkeypatch.setenv("ZOOMPIPE_CACHE_DIR", str(tmp_path))
    _warn_once.cache_clear()
    dot_product = _cpu_has_int8_dot_product()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        int8 = create_encoder(precision="int8")
    assert any("no int8 dot product" in str(w.message) for w in caught) is not dot_product
    assert (int8.precision, int8.runtime) == ("int8", "openvino")
    (graph,) = tmp_path.rglob("*.int8.xml")
    assert graph.with_suffix(".bin").stat().st_size > 1_000_000
    assert 'element_type="i8"' in graph.read_text()  # int8 weights, not an fp32 graph renamed
    stamp = graph.stat().st_mtime_ns, graph.stat().st_ino
    ours = int8.embed(tissue_patches)
    theirs = create_encoder(precision="fp32", runtime="torch").embed(tissue_patches)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert np.abs(ours - theirs).max() > 100 * TOLERANCE  # really quantised
    # Closest on tissue; blank glass, which tiling drops, sits furthest from the calibration.
    # Without VNNI or AMX the CPU's int8 kernels stray further (an AVX2 EPYC: 0.93 on tissue, 0.85
    # in all).
    tissue = (tissue_patches.mean(axis=3) < 220).mean(axis=(1, 2)) >= 0.1
    floor_tissue, floor_all = (0.98, 0.9) if dot_product else (0.9, 0.8)
    assert tissue.sum() >= 4 and cosine[tissue].min() > floor_tissue and cosine.min() > floor_all, cosine
    again = create_encoder(precision="int8")
    assert (graph.stat().st_mtime_ns, graph.stat().st_ino) == stamp
    np.testing.assert_array_equal(again.embed(tissue_patches), ours)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
