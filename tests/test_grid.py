"""Nested patch grids: exact tiling of parents by children, explicit parent links, tissue patches found."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from zoompipe.errors import GridError, NoTissueError, ZoompipeError
from zoompipe.grid import (PatchGrid, base_grid, build_cascade, child_grid, children_index,
                           magnification_ratios)
from zoompipe.slide import open_slide
from zoompipe.synthetic import write_synthetic_slide
from zoompipe.tissue import TissueMask, tissue_mask


def random_mask(rng: np.random.Generator, width: int, height: int, slide_mpp: float) -> TissueMask:
    """Random blobs on a mask of 40-160 pixels a side covering a slide."""
    mask_mpp = slide_mpp * max(width, height) / rng.integers(40, 160)
    shape = (math.ceil(height * slide_mpp / mask_mpp), math.ceil(width * slide_mpp / mask_mpp))
    noise = rng.random((shape[0] // 8 + 2, shape[1] // 8 + 2))
    blobs = np.kron(noise, np.ones((8, 8)))[:shape[0], :shape[1]] < rng.uniform(0.2, 0.8)
    return TissueMask(blobs, mask_mpp, (width, height), slide_mpp)


def assert_children_tile_parents(parent: PatchGrid, child: PatchGrid, r: int) -> None:
    """Every parent's r x r children, in raster order, chain edge to edge across its box."""
    index = children_index(parent, child)
    assert index.shape == (len(parent), r * r) and (index >= 0).all()
    assert (child.parent[index] == np.arange(len(parent))[:, None]).all()
    boxes = child.boxes()[index].reshape(len(parent), r, r, 4)  # parent, b (row), a (col), x0 y0 x1 y1
    x0, y0, x1, y1 = np.moveaxis(boxes, -1, 0)
    px0, py0, px1, py1 = (v[:, None, None] for v in parent.boxes().T)
    assert (x1 > x0).all() and (y1 > y0).all()
    # Columns chain from the parent's left edge to its right edge, the same in every child row ...
    assert (x0[:, :, 0:1] == px0).all() and (x1[:, :, -1:] == px1).all() and (x1[:, :, :-1] == x0[:, :, 1:]).all()
    assert (x0 == x0[:, :1]).all() and (x1 == x1[:, :1]).all()
    # ... and rows from its top edge to its bottom edge: together the union with no overlap.
    assert (y0[:, 0:1] == py0).all() and (y1[:, -1:] == py1).all() and (y1[:, :-1] == y0[:, 1:]).all()
    assert (y0 == y0[:, :, :1]).all() and (y1 == y1[:, :, :1]).all()
    np.testing.assert_array_equal(child.coords, child.boxes()[:, :2])


def test_random_cascades_nest_exactly():
    rng = np.random.default_rng(2024)
    cascades = 0
    for _ in range(150):
        slide_mpp = float(rng.uniform(0.1, 2.0))
        width, height = (int(v) for v in rng.integers(200, 20_000, 2) / slide_mpp)  # up to 20 mm
        magnifications = [float(rng.choice([0.625, 1.0, 1.25, 2.5, 1 / 3]))]
        ratios = list(rng.choice([2, 3, 4], size=rng.integers(1, 3)))
        for r in ratios:
            magnifications.append(magnifications[-1] * int(r))
        patch_size = int(rng.choice([224, 256, 300]))
        mask = random_mask(rng, width, height, slide_mpp)
        min_tissue = float(rng.uniform(0, 0.3))
        try:
            grids = build_cascade(mask, slide_mpp, magnifications, patch_size, min_tissue)
        except NoTissueError:
            assert base_grid(mask, slide_mpp, magnifications[0], patch_size, 0.0).tissue.max() < min_tissue
            continue
        cascades += 1

        base = grids[0]
        assert (base.tissue >= min_tissue).all() and (base.parent == -1).all()
        assert (base.coords[:, 0] < width).all() and (base.coords[:, 1] < height).all()
        order = np.lexsort((base.cells[:, 0], base.cells[:, 1]))
        np.testing.assert_array_equal(order, np.arange(len(base)))  # sorted by (row, col)
        for parent, child, r in zip(grids, grids[1:], ratios):
            assert len(child) == len(parent) * r * r
            assert child.patch_size_level0 == pytest.approx(patch_size * child.mpp / slide_mpp, abs=1e-4)
            np.testing.assert_allclose(child.tissue, mask.tissue_fraction(child.coords, child.patch_size_level0))
            assert_children_tile_parents(parent, child, int(r))

            rows = rng.permutation(len(parent))[:rng.integers(0, len(parent) + 1)]
            subset = child_grid(parent, child.magnification, slide_mpp, mask=mask, rows=rows)
            picked = children_index(parent, child)[rows].ravel()
            for field in ("cells", "coords", "tissue"):
                np.testing.assert_array_equal(getattr(subset, field), getattr(child, field)[picked])
            np.testing.assert_array_equal(subset.parent, np.repeat(rows, r * r))
            expected = np.full((len(parent), r * r), -1)
            expected[rows] = np.arange(len(subset)).reshape(-1, r * r)
            np.testing.assert_array_equal(children_index(parent, subset), expected)
    assert cascades > 100


def test_children_index_follows_parent_links_not_row_order():
    rng = np.random.default_rng(1)
    mask = random_mask(rng, 9000, 7000, 0.5)
    base, child = build_cascade(mask, 0.5, (1.25, 5.0), min_tissue=0.0)
    shuffle = rng.permutation(len(child))
    shuffled = dataclasses.replace(child, cells=child.cells[shuffle], coords=child.coords[shuffle],
                                   tissue=child.tissue[shuffle], parent=child.parent[shuffle])
    index = children_index(base, shuffled)
    np.testing.assert_array_equal(shuffled.cells[index], child.cells[children_index(base, child)])
    assert_children_tile_parents(base, shuffled, 4)

    broken = dataclasses.replace(child, parent=np.roll(child.parent, 1))
    with pytest.raises(GridError, match="outside the parents"):
        children_index(base, broken)
    doubled = dataclasses.replace(child, cells=np.concatenate([child.cells, child.cells[:1]]),
                                  parent=np.concatenate([child.parent, child.parent[:1]]))
    with pytest.raises(GridError, match="same cell"):
        children_index(base, doubled)


def test_cmu_lattice_at_10x():
    # 256 px at 1 mpp on a 0.499 mpp slide: 513.026... level-0 px, rounded per cell, not per step.
    mask = TissueMask(np.ones((186, 139), bool), 8.0, (2220, 2967), 0.499)
    grid = base_grid(mask, 0.499, 10.0, min_tissue=0.0)
    step = 256 / 0.499
    assert grid.patch_size_level0 == pytest.approx(step, abs=1e-4)
    assert len(grid) == 5 * 6  # corners 0, 513, 1026, 1539, 2052 < 2220 and up to 2565 < 2967
    np.testing.assert_array_equal(np.unique(grid.coords[:, 0]), [round(c * step) for c in range(5)])
    widths = np.diff(grid.boxes()[:, [0, 2]], axis=1)
    assert set(widths.ravel()) <= {513, 514}
    # Edge patches run past the slide and count the outside as glass.
    assert grid.tissue[-1] == pytest.approx((2220 - 2052) * (2967 - 2565) / step**2, rel=1e-4)


def test_child_grid_keeps_every_child_and_fills_tissue_only_from_a_mask():
    mask = TissueMask(np.eye(64, dtype=bool), 8.0, (1024, 1024), 0.5)
    base = base_grid(mask, 0.5, 2.5, patch_size=256, min_tissue=0.0)  # 2048 level-0 px: 1 patch
    assert len(base) == 1
    children = child_grid(base, 10.0, mask=mask)
    assert len(children) == 16 and (children.parent == 0).all()
    assert (children.tissue == 0).sum() >= 8  # glass and outside patches are kept
    assert np.isnan(child_grid(base, 10.0).tissue).all()
    assert child_grid(base, 10.0, rows=[]).cells.shape == (0, 2)
    with pytest.raises(IndexError):
        child_grid(base, 10.0, rows=[1])


@pytest.mark.parametrize("magnifications, expected", [
    ((1.25, 3.0), "1.25x -> 3x is a ratio of 2.4"),
    ((2.5, 1.25), "ratio of 0.5"),
    ((2.5, 2.5), "ratio of 1"),
    ((0.0, 2.5), "must be positive"),
    ((math.pi,), "not a simple fraction"),
    ((), "at least one"),
])
def test_invalid_magnifications(magnifications, expected):
    mask = TissueMask(np.ones((10, 10), bool), 8.0, (160, 160), 0.5)
    for call in (lambda: magnification_ratios(magnifications), lambda: build_cascade(mask, 0.5, magnifications)):
        with pytest.raises(GridError) as err:
            call()
        assert expected in str(err.value) and "\n" not in str(err.value)
        assert isinstance(err.value, ZoompipeError) and isinstance(err.value, ValueError)


def test_magnification_ratios():
    assert magnification_ratios((1.25, 2.5, 10)) == [2, 4]
    assert magnification_ratios((0.625, 1.875, 5.625)) == [3, 3]
    assert magnification_ratios([5]) == []
    assert magnification_ratios((1 / 3, 1.0, 3.0)) == [3, 3]


def test_inconsistent_arguments():
    mask = TissueMask(np.ones((10, 10), bool), 8.0, (160, 160), 0.5)
    with pytest.raises(GridError, match="slide_mpp 0.25 differs"):
        base_grid(mask, 0.25, 1.25)
    base = base_grid(mask, 0.5, 1.25, min_tissue=0.0)
    with pytest.raises(GridError, match="slide_mpp 0.25 does not match"):
        child_grid(base, 2.5, 0.25)
    with pytest.raises(GridError, match="min_tissue"):
        base_grid(mask, 0.5, 1.25, min_tissue=2)
    with pytest.raises(GridError, match="patch_size"):
        base_grid(mask, 0.5, 1.25, patch_size=0)


def test_grid_finds_every_tissue_patch_of_a_synthetic_slide(tmp_path):
    """Against tissue fractions from the ground truth, up to one mask pixel of outline error."""
    for seed in range(3):
        path = tmp_path / f"slide{seed}.svs"
        truth = write_synthetic_slide(path, 4096, 4096, mpp=2.0, seed=seed, downsamples=(1, 4))
        with open_slide(path) as slide:
            mask = tissue_mask(slide)
        exact = TissueMask(truth.tissue_mask(1), 2.0, (4096, 4096), 2.0)
        for magnification, tolerance in ((1.25, 0.01), (2.5, 0.02)):
            all_cells = base_grid(exact, 2.0, magnification, min_tissue=0.0)
            estimate = base_grid(mask, 2.0, magnification, min_tissue=0.0)
            np.testing.assert_array_equal(estimate.cells, all_cells.cells)
            np.testing.assert_allclose(estimate.tissue, all_cells.tissue, atol=tolerance)
            grid = base_grid(mask, 2.0, magnification, min_tissue=0.1)
            found = {tuple(cell) for cell in grid.cells.tolist()}
            needed = all_cells.cells[all_cells.tissue >= 0.1 + tolerance]
            assert len(needed) > 3
            assert {tuple(cell) for cell in needed.tolist()} <= found
