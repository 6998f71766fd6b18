"""Tissue segmentation, user masks, GeoJSON and QC images, on slides written by the tests and on CMU."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from zoompipe.errors import MaskError, NoTissueError, ZoompipeError
from zoompipe.grid import base_grid, build_cascade
from zoompipe.qc import qc_image, tissue_geojson, write_geojson, write_png
from zoompipe.slide import open_slide
from zoompipe.synthetic import GLASS_RGB, write_array_slide, write_synthetic_slide
from zoompipe.tissue import (PRESETS, TissueMask, TissueParams, get_params, mask_from_geojson,
                             mask_from_png, segment_tissue, tissue_mask)

EOSIN = (232, 170, 205)
HEMATOXYLIN = (82, 52, 135)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# -- synthetic slides with known tissue --------------------------------------------------------

SYNTHETIC = {  # name: (width, height, mpp, seed, downsamples)
    "pyramid": (8192, 8192, 0.25, 0, (1, 4, 16)),
    "coarse": (4096, 3072, 2.0, 1, (1, 4)),
    "tall": (3000, 4100, 0.5, 2, (1, 4)),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    slides = {}
    for name, (width, height, mpp, seed, downsamples) in SYNTHETIC.items():
        path = root / f"{name}.svs"
        truth = write_synthetic_slide(path, width, height, mpp=mpp, seed=seed, downsamples=downsamples)
        slides[name] = (path, truth)
    return slides


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_mask_matches_ground_truth(synthetic, name):
    path, truth = synthetic[name]
    with open_slide(path) as slide:
        mask = tissue_mask(slide)
    assert mask.mask.shape == slide.thumbnail_size(8.0)[::-1]
    assert (mask.mpp, mask.slide_mpp, mask.level0_size) == (8.0, slide.mpp, slide.dimensions)
    expected = truth.tissue_mask(mask.downsample)  # floor-sized: the partial last pixel is left out
    got = mask.mask[:expected.shape[0], :expected.shape[1]]
    assert iou(got, expected) >= 0.95
    assert mask.fraction() == pytest.approx(expected.mean(), abs=0.01)
    assert mask.slide_id == name and "threshold" in mask.source


def test_tissue_mask_reads_only_the_coarsest_adequate_level(synthetic, monkeypatch):
    path, _ = synthetic["pyramid"]  # 8192 px at 0.25 mpp; levels at 0.25, 1 and 4 mpp
    with open_slide(path) as slide:
        reads = []
        read = slide._backend.read
        monkeypatch.setattr(slide._backend, "read",
                            lambda level, x, y, w, h: reads.append((level, w * h)) or read(level, x, y, w, h))
        mask = tissue_mask(slide)
        assert mask.mask.shape == (256, 256)
        assert {level for level, _ in reads} == {2}  # 4 mpp, the coarsest level finer than 8 mpp
        # Each pixel of that 512 x 512 level once: 1/256 of level 0, 4x the thumbnail.
        assert sum(size for _, size in reads) == 512 * 512
        reads.clear()
        tissue_mask(slide, get_params(mask_mpp=4.0))
        assert {level for level, _ in reads} == {2}
        assert max(size for _, size in reads) <= 512 * 512  # no read larger than the thumbnail itself


# -- segmentation on drawn images ----------------------------------------------------------------

def drawn_marks(seed: int = 0) -> np.ndarray:
    """Glass with stained, pale and purple tissue, a blue and a black pen stroke (8 mpp)."""
    image = np.empty((300, 400, 3), np.float32)
    image[:] = GLASS_RGB
    cv2.circle(image, (80, 80), 40, EOSIN, -1)
    cv2.circle(image, (80, 220), 40, (240, 230, 236), -1)  # saturation ~10: faint tissue
    cv2.circle(image, (200, 220), 40, HEMATOXYLIN, -1)
    cv2.line(image, (180, 40), (380, 60), (40, 70, 170), 20)  # blue marker
    cv2.line(image, (250, 150), (380, 280), (25, 25, 30), 20)  # black marker
    noise = np.random.default_rng(seed).normal(0, 2, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


POINTS = {"stained": (80, 80), "pale": (220, 80), "purple": (220, 200), "blue pen": (50, 280),
          "black pen": (215, 315), "glass": (150, 150)}


@pytest.mark.parametrize("preset, tissue", [
    ("default", {"stained", "purple", "blue pen"}),
    ("pale", {"stained", "pale", "purple", "blue pen"}),
    ("strict", {"stained", "purple"}),
])
def test_presets_on_pale_tissue_and_pen_marks(preset, tissue):
    mask = segment_tissue(drawn_marks(), 8.0, PRESETS[preset])
    assert {name for name, (row, col) in POINTS.items() if mask[row, col]} == tissue


def test_strict_drops_blue_pen_by_hue_not_by_size():
    mask = segment_tissue(drawn_marks(), 8.0, get_params("strict", pen_hues=None))
    assert mask[POINTS["blue pen"]]


@pytest.mark.parametrize("image", [
    np.full((200, 300, 3), 255, np.uint8),
    np.full((200, 300, 3), GLASS_RGB, np.uint8),
    np.zeros((200, 300, 3), np.uint8),
    np.random.default_rng(0).integers(238, 246, (200, 300, 3), dtype=np.uint8),  # glass noise only
    np.full((1, 1, 3), 255, np.uint8),
    np.full((2, 3, 4), 255, np.uint8),  # RGBA
], ids=["white", "glass", "black", "noisy glass", "one pixel", "rgba"])
def test_blank_images_give_empty_masks(image):
    mask = segment_tissue(image, 8.0)
    assert mask.shape == image.shape[:2] and mask.dtype == bool and not mask.any()


def test_all_tissue_image_is_all_tissue():
    image = np.full((200, 300, 3), EOSIN, np.uint8)
    image[::7] = HEMATOXYLIN  # a histogram with two tissue modes and no glass
    assert segment_tissue(image, 8.0).all()


def test_small_pieces_removed_and_small_holes_filled_by_area_in_microns():
    mask = np.zeros((400, 400), np.uint8)
    cv2.circle(mask, (200, 200), 150, 1, -1)
    cv2.circle(mask, (150, 200), 8, 0, -1)  # hole of ~200 px
    cv2.circle(mask, (250, 200), 40, 0, -1)  # hole of ~5000 px
    cv2.circle(mask, (30, 30), 8, 1, -1)  # speck of ~200 px
    image = np.where(mask[..., None] > 0, np.uint8(EOSIN), np.uint8(GLASS_RGB)).astype(np.uint8)
    params = TissueParams(median_um=0, closing_um=0, min_tissue_area_um2=1000 * 4.0, min_hole_area_um2=1000 * 4.0)
    got = segment_tissue(image, 2.0, params)  # 1000 px at 2 mpp = 4000 um^2
    assert got[200, 150] and not got[200, 250] and not got[30, 30] and got[200, 100]
    # The same areas in microns at half the resolution keep the same pieces and holes.
    half = segment_tissue(cv2.resize(image, (200, 200), interpolation=cv2.INTER_AREA), 4.0, params)
    assert half[100, 75] and not half[100, 125] and not half[15, 15]


@pytest.mark.parametrize("connectivity", [1, 2])
def test_small_components_removed_as_scikit_image_removes_them(connectivity):
    from skimage import morphology

    from zoompipe.tissue import _without_small_components

    rng = np.random.default_rng(connectivity)
    # Blobs of every size, touching diagonally here and there: where 4- and 8-connectivity differ.
    mask = cv2.GaussianBlur(rng.random((300, 400)), (0, 0), 2.0) > 0.52
    for max_size in (0, 1, 5, 40, 300):
        expected = morphology.remove_small_objects(mask, max_size=max_size, connectivity=connectivity)
        got = _without_small_components(mask, max_size, connectivity)
        np.testing.assert_array_equal(got, expected)
        assert got.sum() < mask.sum() or max_size == 0
    # A few small pieces beside a large one: cleared within their boxes, the same result.
    sparse = np.zeros((600, 800), bool)
    sparse[100:400, 100:500] = sparse[10, 10] = sparse[550:552, 700:703] = sparse[401, 501] = True
    for max_size in (1, 6, 10):
        expected = morphology.remove_small_objects(sparse, max_size=max_size, connectivity=connectivity)
        got = _without_small_components(sparse, max_size, connectivity)
        np.testing.assert_array_equal(got, expected)
        assert got.sum() < sparse.sum()


def test_params_round_trip_and_errors():
    for params in PRESETS.values():
        assert TissueParams.from_dict(json.loads(json.dumps(dataclasses.asdict(params)))) == params
    params = get_params("pale", mask_mpp=4.0, otsu_bounds=[10, 20])
    assert (params.mask_mpp, params.otsu_bounds, params.saturation_threshold) == (4.0, (10, 20), 8.0)
    for call, expected in [
        (lambda: get_params("nope"), "unknown tissue preset 'nope'"),
        (lambda: get_params(mask_mpp=-1), "mask_mpp must be positive"),
        (lambda: get_params(sat=3), "unknown tissue parameter(s) sat"),
        (lambda: TissueParams(otsu_bounds=(40, 20)), "otsu_bounds"),
    ]:
        with pytest.raises(MaskError) as err:
            call()
        assert expected in one_line(err)


# -- tissue fraction of boxes ------------------------------------------------------------------

def test_tissue_fraction_is_exact_area_share():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.4
    downsample = 8  # level-0 pixels per mask pixel
    level0 = (53 * 8 - 5, 37 * 8 - 3)  # the slide ends inside the last mask pixels
    tissue = TissueMask(mask, mpp=4.0, level0_size=level0, slide_mpp=0.5)
    full = np.kron(mask, np.ones((downsample, downsample), bool))[:level0[1], :level0[0]]
    assert tissue.fraction() == pytest.approx(full.mean(), abs=1e-9)
    coords = rng.integers(-60, 450, (300, 2))
    sizes = rng.integers(1, 120, 300)
    for (x, y), size in zip(coords, sizes):
        box = full[max(y, 0):max(y + size, 0), max(x, 0):max(x + size, 0)]  # outside the slide is glass
        got = tissue.tissue_fraction(np.array([[x, y]]), float(size))
        assert got.dtype == np.float32 and got[0] == pytest.approx(box.sum() / size**2, abs=1e-5)
    # Fractional boxes: a box of 2.5 mask pixels straddling two columns, one tissue, one glass.
    half = TissueMask(np.array([[1, 0]], bool), mpp=1.0, level0_size=(2, 1), slide_mpp=1.0)
    assert half.tissue_fraction(np.array([[0.5, 0]]), 1.0)[0] == pytest.approx(0.5)
    assert tissue.tissue_fraction(np.zeros((0, 2)), 10.0).shape == (0,)


# -- slides drawn with known shapes: segmentation, GeoJSON and PNG masks ----------------------

@pytest.fixture(scope="module")
def shapes_slide(tmp_path_factory):
    """A 2048 px slide at 1 mpp: a ring with an island in its lake, a block, and a speck."""
    truth = np.zeros((2048, 2048), np.uint8)
    cv2.circle(truth, (700, 800), 600, 1, -1)
    cv2.circle(truth, (700, 800), 250, 0, -1)  # lake of 0.2 mm^2: kept as a hole
    cv2.circle(truth, (700, 800), 150, 1, -1)  # island of 0.07 mm^2: kept as tissue
    cv2.rectangle(truth, (1500, 300), (1900, 1900), 1, -1)
    image = np.where(truth[..., None] > 0, np.uint8(EOSIN), np.uint8(GLASS_RGB)).astype(np.uint8)
    cv2.circle(image, (1700, 150), 30, HEMATOXYLIN, -1)  # 0.003 mm^2 speck: removed
    path = tmp_path_factory.mktemp("shapes") / "shapes.svs"
    write_array_slide(path, image, mpp=1.0, downsamples=(1, 4))
    return path, truth.astype(bool)


def test_drawn_shapes_are_segmented_with_holes_and_islands(shapes_slide):
    path, truth = shapes_slide
    with open_slide(path) as slide:
        mask = tissue_mask(slide)
    assert mask.downsample == 8
    expected = cv2.resize(truth.astype(np.float32), (256, 256), interpolation=cv2.INTER_AREA) >= 0.5
    assert iou(mask.mask, expected) >= 0.95
    assert not mask.mask[800 // 8, 900 // 8]  # lake
    assert mask.mask[800 // 8, 700 // 8]  # island
    assert not mask.mask[150 // 8, 1700 // 8]  # speck
    assert [len(rings) for rings in mask.polygons()] == [2, 1, 1]  # ring + lake, island, block


def test_geojson_round_trip_reproduces_mask(shapes_slide, tmp_path):
    path, _ = shapes_slide
    with open_slide(path) as slide:
        mask = tissue_mask(slide)
        out = tmp_path / "tissue.geojson"
        write_geojson(out, tissue_geojson(mask))
        assert json.loads(out.read_text()) == tissue_geojson(mask)
        again = mask_from_geojson(out, slide)
    np.testing.assert_array_equal(again.mask, mask.mask)
    assert again.source == "mask file tissue.geojson" and again.params is None
    assert [p.name for p in tmp_path.iterdir()] == ["tissue.geojson"]  # no temporary file left


def test_geojson_qupath_variants_and_island_in_lake(shapes_slide, tmp_path):
    path, _ = shapes_slide
    square = lambda x0, y0, x1, y1: [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    features = [
        # The island comes first: the lake of the ring drawn later must not clear it.
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(900, 900, 1100, 1100)]}},
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "MultiPolygon", "coordinates": [
             [square(400, 400, 1600, 1600), square(800, 800, 1200, 1200)],
             [square(1800, 0, 2048, 300)]]}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]}},
        {"type": "Feature", "geometry": None},
    ]
    expected = np.zeros((256, 256), bool)
    centres = (np.arange(256) + 0.5) * 8
    inside = lambda a, b: (centres >= a) & (centres <= b)
    for x0, y0, x1, y1 in [(400, 400, 1600, 1600), (1800, 0, 2048, 300)]:
        expected |= inside(y0, y1)[:, None] & inside(x0, x1)[None]
    expected &= ~(inside(800, 1200)[:, None] & inside(800, 1200)[None])
    expected |= inside(900, 1100)[:, None] & inside(900, 1100)[None]
    with open_slide(path) as slide:
        for document in (features, {"type": "FeatureCollection", "features": features}):
            out = tmp_path / "annotations.geojson"
            out.write_text(json.dumps(document))
            got = mask_from_geojson(out, slide)
            assert (got.mask != expected).sum() <= 2 * 256  # pixel centres on the polygon edges may go either way
            assert got.mask[1000 // 8, 1000 // 8] and not got.mask[850 // 8, 850 // 8] and got.mask[500 // 8, 500 // 8]

        (tmp_path / "bad.geojson").write_text("{not json")
        (tmp_path / "points.geojson").write_text(json.dumps(features[2:]))
        bad_polygon = {"type": "Polygon", "coordinates": [[[0, 0], [1, "a"]]]}
        (tmp_path / "nan.geojson").write_text(json.dumps(bad_polygon))
        for name, expected_text in [("bad.geojson", "cannot read GeoJSON"), ("points.geojson", "no Polygon"),
                                    ("missing.geojson", "cannot read GeoJSON"), ("nan.geojson", "malformed")]:
            with pytest.raises(MaskError) as err:
                mask_from_geojson(tmp_path / name, slide)
            assert expected_text in one_line(err)


def test_png_mask_of_any_size(synthetic, tmp_path):
    path, truth = synthetic["coarse"]  # 4096 x 3072
    drawn = truth.tissue_mask(4096 / 1000)  # 1000 x 750: not the mask's 1024 x 768
    cv2.imwrite(str(tmp_path / "mask.png"), np.where(drawn, 255, 0).astype(np.uint8))
    colour = np.zeros(drawn.shape + (4,), np.uint8)
    colour[drawn] = (0, 0, 255, 255)  # red tissue on transparent black
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with open_slide(path) as slide:
        expected = truth.tissue_mask(4.0)
        for name in ("mask.png", "colour.png"):
            mask = mask_from_png(tmp_path / name, slide)
            assert mask.mask.shape == (768, 1024) and mask.downsample == 4
            assert iou(mask.mask, expected) >= 0.97
        assert mask_from_png(tmp_path / "mask.png", slide, mask_mpp=16.0).mask.shape == (384, 512)
        cv2.imwrite(str(tmp_path / "square.png"), np.zeros((500, 500), np.uint8))
        (tmp_path / "junk.png").write_bytes(b"not a png")
        for name, expected_text in [("square.png", "aspect ratios differ"), ("junk.png", "cannot read"),
                                    ("missing.png", "cannot read")]:
            with pytest.raises(MaskError) as err:
                mask_from_png(tmp_path / name, slide)
            assert expected_text in one_line(err)


# -- no tissue, all tissue ---------------------------------------------------------------------

def test_blank_slide_raises_no_tissue_naming_slide_and_threshold(tmp_path):
    path = tmp_path / "blank.svs"
    write_array_slide(path, np.full((1024, 1536, 3), GLASS_RGB, np.uint8), mpp=1.0, downsamples=(1,))
    with open_slide(path) as slide:
        mask = tissue_mask(slide)  # an empty mask is still worth a QC image
        assert mask.fraction() == 0 and mask.polygons() == []
        assert qc_image(slide.thumbnail(8.0), mask).shape == (128, 192, 3)
        with pytest.raises(NoTissueError) as err:
            build_cascade(mask, slide.mpp)
    message = one_line(err)
    assert "blank" in message and "Otsu saturation threshold 12" in message and ">= 0.1" in message
    assert isinstance(err.value, ZoompipeError)


def test_all_tissue_slide_gives_full_grid(tmp_path):
    image = np.full((1024, 2048, 3), EOSIN, np.uint8)
    image[::5] = HEMATOXYLIN
    path = tmp_path / "full.svs"
    write_array_slide(path, image, mpp=2.0, downsamples=(1,))
    with open_slide(path) as slide:
        mask = tissue_mask(slide)
        assert mask.mask.all() and mask.fraction() == 1.0
        grid = base_grid(mask, slide.mpp, 2.5, min_tissue=0.99)  # 512 level-0 px per patch
    assert len(grid) == 4 * 2 and (grid.tissue == 1).all()


# -- the real CMU slide ------------------------------------------------------------------------

def test_cmu_tissue_qc_and_geojson(cmu_slide, tmp_path):
    with open_slide(cmu_slide) as slide:
        thumbnail = slide.thumbnail(8.0)
        mask = tissue_mask(slide, thumbnail=thumbnail)
        assert 0.2 < mask.fraction() < 0.6  # one strip of skin across a third of the field
        grids = build_cascade(mask, slide.mpp)
        assert grids[-1].patch_size_level0 == pytest.approx(256 / 0.499)

        png = tmp_path / "qc.png"
        write_png(png, qc_image(thumbnail, mask, grids[:2]))
        again = cv2.imread(str(png))
        assert again.shape == thumbnail.shape
        assert (again[..., ::-1] == (0, 200, 0)).all(axis=-1).any()  # tissue outline drawn
        big = qc_image(slide.thumbnail(2.0), mask, grids[:1], thumbnail_mpp=2.0)
        assert big.shape == slide.thumbnail(2.0).shape

        geojson = tmp_path / "tissue.geojson"
        write_geojson(geojson, tissue_geojson(mask))
        document = json.loads(geojson.read_text())
        assert document["type"] == "FeatureCollection" and document["features"]
        width, height = slide.dimensions
        for feature in document["features"]:
            assert feature["properties"] == {"objectType": "annotation", "classification": {"name": "Tissue"}}
            assert feature["geometry"]["type"] == "Polygon"
            for ring in feature["geometry"]["coordinates"]:
                assert ring[0] == ring[-1] and len(ring) >= 4
                xy = np.array(ring)
                assert (xy >= 0).all() and (xy[:, 0] <= width).all() and (xy[:, 1] <= height).all()
        assert iou(mask_from_geojson(geojson, slide).mask, mask.mask) >= 0.99
