"""Slide access by resolution, on real files written by the tests and on the real CMU slide."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_rgb
from zoompipe.cli.main import cli
from zoompipe.errors import SlideError
from zoompipe.slide import load_mpp_overrides, open_slide
from zoompipe.slide.backends import TileCache
from zoompipe.synthetic import write_array_slide, write_synthetic_slide

BACKENDS = ["openslide", "tiffslide"]
FLAVOURS = {"aperio": "slide.svs", "generic": "slide.tif"}


@pytest.fixture(scope="module", params=list(FLAVOURS))
def array_slide(request, tmp_path_factory):
    """A lossless 3-level slide (0.5, 1, 2 mpp) and the arrays written into it."""
    path = tmp_path_factory.mktemp(request.param) / FLAVOURS[request.param]
    image = random_rgb(1000, 1300, seed=1)
    levels = write_array_slide(path, image, mpp=0.5, downsamples=(1, 2, 4), compression="zlib",
                               flavour=request.param, tile=128)
    return path, levels


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_returns_written_pixels_at_each_level_mpp(array_slide, backend):
    path, levels = array_slide
    with open_slide(path, backend=backend) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_count == 3
        for level, mpp in enumerate((0.5, 1.0, 2.0)):
            assert slide.best_level(mpp) == level
            ds = 2**level
            x, y = 64 * ds, 48 * ds  # level-0 coordinates
            got = slide.read_region(x, y, 100, 80, mpp)
            np.testing.assert_array_equal(got, levels[level][48:128, 64:164])


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_between_levels_reads_finer_level_and_area_resizes(array_slide, backend):
    path, levels = array_slide
    with open_slide(path, backend=backend) as slide:
        # 4 mpp is coarser than every level: read level 2 (2 mpp) and halve it.
        got = slide.read_region(400, 320, 50, 40, 4.0)
        expected = cv2.resize(levels[2][80:160, 100:200], (50, 40), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(got, expected)
        # 1.5 mpp lies between level 1 (1 mpp) and level 2: level 1 is read, never level 2.
        assert slide.best_level(1.5) == 1
        got = slide.read_region(200, 100, 60, 60, 1.5)
        expected = cv2.resize(levels[1][50:140, 100:190], (60, 60), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_bounds_is_white(array_slide, backend):
    path, levels = array_slide
    with open_slide(path, backend=backend) as slide:
        w, h = slide.dimensions
        got = slide.read_region(w - 10, h - 20, 30, 30, 0.5)
        np.testing.assert_array_equal(got[:20, :10], levels[0][h - 20:, w - 10:])
        assert (got[20:] == 255).all() and (got[:, 10:] == 255).all()
        assert (slide.read_region(-500, -500, 16, 16, 0.5) == 255).all()


def test_backends_agree_on_jpeg_slide(tmp_path):
    path = tmp_path / "tissue.svs"
    write_synthetic_slide(path, 3000, 2000, mpp=0.25, seed=3)
    reads = []
    for backend in BACKENDS:
        with open_slide(path, backend=backend) as slide:
            reads.append([slide.read_region(1000, 700, 256, 256, mpp) for mpp in (0.25, 0.5, 1.0, 2.5)])
    for a, b in zip(*reads):
        # Both decode the same JPEG tiles; libjpeg variants may differ by a rounding step.
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.mark.parametrize("which", ["synthetic", "cmu"])
def test_auto_reads_aperio_with_tiffslide_pixel_for_pixel(tmp_path, request, which):
    if which == "cmu":
        slide_path, x, y = request.getfixturevalue("cmu_slide"), 900, 1300
    else:
        slide_path, x, y = tmp_path / "tissue.svs", 1000, 700
        write_synthetic_slide(slide_path, 3000, 2000, mpp=0.25, seed=3)
    with open_slide(slide_path) as auto, open_slide(slide_path, backend="openslide") as reference:
        assert (auto.backend, auto.vendor) == ("tiffslide", "aperio")
        assert auto.mpp == reference.mpp and auto.level_dimensions == reference.level_dimensions
        for mpp in (auto.mpp, 2 * auto.mpp, 1.0, 2.5):
            np.testing.assert_array_equal(auto.read_region(x, y, 256, 256, mpp),
                                          reference.read_region(x, y, 256, 256, mpp))
        with auto.reopen() as handle:  # reader threads get the same backend
            assert handle.backend == "tiffslide"


def test_cached_tiles_give_tiffslides_pixels_at_every_level_and_edge(tmp_path):
    import tiffslide

    path = tmp_path / "edges.svs"  # sides that are no multiple of the tile: partial edge tiles
    write_synthetic_slide(path, 3001, 2222, mpp=0.25, seed=9)
    rng = np.random.default_rng(0)
    with open_slide(path, backend="tiffslide") as slide, tiffslide.TiffSlide(str(path)) as reference:
        backend = slide._backend
        tiff = reference.ts_tifffile
        # A cache of three tiles: most reads evict, the rest hit.
        backend._tiles = small = TileCache(tiff.series[reference.properties["tiffslide.series-index"]],
                                           backend._slide.ts_tifffile.filehandle, max_bytes=3 * 256 * 256 * 3)
        for level, (w, h) in enumerate(slide.level_dimensions):
            boxes = [(w - 37, h - 21, 37, 21), (0, 0, 1, 1), (0, 0, w, min(h, 300))]
            for _ in range(25):
                bw, bh = int(rng.integers(1, min(w, 600) + 1)), int(rng.integers(1, min(h, 600) + 1))
                boxes.append((int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1)), bw, bh))
            for x, y, bw, bh in boxes:
                assert small.read(level, x, y, bw, bh) is not None  # JPEG RGB tiles: the cache reads them
                ds = slide.level_downsamples[level]
                expected = reference.read_region((round(x * ds), round(y * ds)), level, (bw, bh), as_array=True)
                np.testing.assert_array_equal(backend.read(level, x, y, bw, bh), expected)
        assert len(small._tiles) <= 3


def test_thumbnail_never_reads_level_zero_of_a_pyramid(tmp_path, monkeypatch):
    path = tmp_path / "tissue.svs"
    write_synthetic_slide(path, 4096, 4096, mpp=0.25, seed=4, downsamples=(1, 4, 16))
    with open_slide(path) as slide:
        levels_read = []
        read = slide._backend.read
        monkeypatch.setattr(slide._backend, "read", lambda level, *box: levels_read.append(level) or read(level, *box))
        thumb = slide.thumbnail(8.0)
        assert thumb.shape == (128, 128, 3)
        assert set(levels_read) == {2}
        levels_read.clear()
        slide.thumbnail(2.0)
        assert set(levels_read) == {1}


def test_thumbnail_matches_area_downsample(array_slide):
    path, levels = array_slide
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.thumbnail(2.0), levels[2])
        thumb = slide.thumbnail(4.0)
        assert thumb.shape == (125, 163, 3)  # rounded up: the last column is half slide, half white
        expected = cv2.resize(levels[2][:, :324], (162, 125), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(thumb[:, :162], expected)


def test_mpp_sources_and_override(tmp_path, recwarn):
    image = np.full((300, 400, 3), 200, np.uint8)
    power_only = tmp_path / "power.svs"
    write_array_slide(power_only, image, mpp=None, downsamples=(1,), magnification=20, compression="zlib")
    with open_slide(power_only) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "objective-power")
    assert any("objective power" in str(w.message) for w in recwarn)

    bare = tmp_path / "bare.tif"
    write_array_slide(bare, image, mpp=None, downsamples=(1,), flavour="generic", compression="zlib")
    with pytest.raises(SlideError, match="--mpp"):
        open_slide(bare)
    with open_slide(bare, mpp=0.3) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.3, "override")

    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\nbare,0.3\n")
    assert load_mpp_overrides(table) == {"bare": 0.3}


def test_generic_tiff_mpp_from_resolution_tags(tmp_path):
    path = tmp_path / "generic.tif"
    write_array_slide(path, random_rgb(256, 256), mpp=0.2631, downsamples=(1,), flavour="generic",
                      compression="zlib")
    for backend in BACKENDS:
        with open_slide(path, backend=backend) as slide:
            assert slide.mpp == pytest.approx(0.2631, rel=1e-4)  # no rounding to 0.25


@pytest.mark.parametrize("backend", BACKENDS)
def test_cmu_slide(cmu_slide, backend):
    with open_slide(cmu_slide, backend=backend) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20
        assert slide.vendor == "aperio"
        patch = slide.read_region(1000, 1000, 224, 224, 1.0)
        assert patch.shape == (224, 224, 3) and patch.std() > 10  # tissue, not glass


def test_info_command_on_cmu(cmu_slide):
    result = CliRunner().invoke(cli, ["info", "--json", str(cmu_slide)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["dimensions"] == [2220, 2967]
    assert info["mpp"] == pytest.approx(0.499)
    assert info["objective_power"] == 20
    assert info["vendor"] == "aperio"


def _bad_inputs(tmp_path):
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "random.svs").write_bytes(os.urandom(4096))
    (tmp_path / "notes.svs").write_text("not a slide\n" * 50)
    png = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes()
    (tmp_path / "picture.svs").write_bytes(png)
    good = tmp_path / "good.svs"
    write_synthetic_slide(good, 2048, 2048, seed=5)
    data = good.read_bytes()
    (tmp_path / "truncated.svs").write_bytes(data[: len(data) // 2])
    write_array_slide(tmp_path / "nompp.tif", random_rgb(64, 64), mpp=None, downsamples=(1,), flavour="generic",
                      compression="zlib")
    return {
        "missing": (tmp_path / "missing.svs", "no such file"),
        "directory": (tmp_path, "is a directory"),
        "empty": (tmp_path / "empty.svs", "empty file"),
        "random bytes": (tmp_path / "random.svs", "not a whole-slide image"),
        "text": (tmp_path / "notes.svs", "not a whole-slide image"),
        "png": (tmp_path / "picture.svs", "not a whole-slide image"),
        "truncated": (tmp_path / "truncated.svs", "truncated"),
        "no mpp": (tmp_path / "nompp.tif", "--mpp"),
    }


def test_bad_inputs_give_one_line_errors_and_status_1(tmp_path):
    runner = CliRunner()
    for name, (path, expected) in _bad_inputs(tmp_path).items():
        for backend in ("auto", "tiffslide"):
            with pytest.raises(SlideError, match=expected):
                open_slide(path, backend=backend)
        result = runner.invoke(cli, ["info", str(path)])
        assert result.exit_code == 1, name
        assert result.exception is None or isinstance(result.exception, SystemExit), name
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, result.output)
        assert "Traceback" not in result.output
