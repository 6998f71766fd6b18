"""ZoomMIL: selection, gathering through the children index, eval/infer agreement, learning."""
from __future__ import annotations

import time

import pytest
import torch

from zoompipe.evaluate import predict_logits
from zoompipe.model import ZoomMIL, ZoomMILConfig
from zoompipe.model.attention import masked_softmax
from zoompipe.train import balanced_sampler, train_one_epoch

DIM = 32
MAGS = [1.25, 2.5, 10.0]
RATIOS = (4, 16)  # children per parent: (2.5 / 1.25)^2 and (10 / 2.5)^2


def _shuffled(features: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in random order, and the new row of each old row."""
    order = torch.randperm(len(features), generator=gen)
    new_row = torch.empty_like(order)
    new_row[order] = torch.arange(len(order))
    return features[order], new_row


def make_slide(
    label: int, gen: torch.Generator, n_base: int = 16, n_marked: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """A 3-magnification slide whose class shows only at 10x, under a few marked parents.

    Every slide, whatever its class, has ``n_marked`` base patches marked at 1.25x (feature 0)
    and their children marked at 2.5x (feature 1): suspicious regions visible at low
    magnification. Only in class 1 do half of the 10x grandchildren of those regions carry the
    signal (feature 2). Rows are shuffled at every magnification, so only the children index
    links them.
    """
    c1, c2 = RATIOS
    bags = [torch.randn(n_base * n, DIM, generator=gen) for n in (1, c1, c1 * c2)]
    for parent in torch.randperm(n_base, generator=gen)[:n_marked].tolist():
        bags[0][parent, 0] += 4.0
        for child in range(parent * c1, (parent + 1) * c1):
            bags[1][child, 1] += 4.0
            if label:
                grandchildren = child * c2 + torch.randperm(c2, generator=gen)[: c2 // 2]
                bags[2][grandchildren, 2] += 3.0
    shuffled = [_shuffled(b, gen) for b in bags]
    children = [
        # Parent p's children were rows p*C .. p*C+C-1 before shuffling.
        torch.empty(len(bags[i]), c, dtype=torch.long).index_copy_(
            0, shuffled[i][1], shuffled[i + 1][1][torch.arange(len(bags[i + 1])).view(-1, c)]
        )
        for i, c in enumerate(RATIOS)
    ]
    return [b for b, _ in shuffled], children, label


def make_slides(n: int, seed: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor], int]]:
    gen = torch.Generator().manual_seed(seed)
    return [make_slide(i % 2, gen) for i in range(n)]


def _model(mags: list[float] = MAGS, seed: int = 0, **kwargs) -> ZoomMIL:
    torch.manual_seed(seed)
    settings = {"k": 4, "hidden": 64, "attn_hidden": 32, "n_samples": 100, **kwargs}
    return ZoomMIL(ZoomMILConfig(in_dim=DIM, n_classes=2, magnifications=mags, **settings))


def _hand_fetch(bags, children, calls):
    """A fetch written the slow, obvious way, as a predictor would: loop over parents."""

    def fetch(step: int, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((step, parents.clone()))
        rows = [int(r) for p in parents.tolist() for r in children[step][p] if r >= 0]
        rows = torch.tensor(rows, dtype=torch.long)
        return bags[step + 1][rows], rows

    return fetch


def test_eval_selection_is_topk_of_zoom_scores_and_children_are_gathered_by_index() -> None:
    bags, children, _ = make_slides(1, seed=0)[0]
    model = _model().eval()
    out = model(bags, children)
    for step in range(2):
        scores, rows = out.selection_scores[step], out.rows[step]
        expected = rows[torch.topk(scores, 4).indices].sort().values
        assert torch.equal(out.selected[step], expected)
        by_hand = [int(r) for p in expected.tolist() for r in children[step][p]]
        assert out.rows[step + 1].tolist() == by_hand
    # The attention at 10x is that of the level run on exactly those rows.
    level = model.levels[2]
    attention = masked_softmax(level.attention(level.project(bags[2][out.rows[2]])))
    torch.testing.assert_close(out.attention[2], attention)
    assert [len(r) for r in out.rows] == [16, 16, 64]


def test_eval_forward_equals_infer_with_a_fetch_that_embeds_only_the_selection() -> None:
    bags, children, _ = make_slides(1, seed=1)[0]
    model = _model().eval()
    dense = model(bags, children)
    calls: list = []
    lazy = model.infer(bags[0], _hand_fetch(bags, children, calls))
    torch.testing.assert_close(lazy.logits, dense.logits, rtol=0, atol=0)
    for name in ("rows", "attention", "selected", "selection_scores"):
        for a, b in zip(getattr(lazy, name), getattr(dense, name)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [step for step, _ in calls] == [0, 1]
    for _, parents in calls:
        assert len(parents) == 4 and torch.equal(parents, parents.sort().values)


def test_padding_children_are_masked_in_eval_and_training() -> None:
    bags, children, _ = make_slides(1, seed=2)[0]
    # Drop some 2.5x children: mark them -1 in the index and remove nothing else.
    padded = [children[0].clone(), children[1]]
    padded[0][::3, 1:3] = -1
    model = _model(dropout=0.0).eval()
    out = model(bags, padded)
    assert bool((out.rows[1] >= 0).all())
    assert len(out.rows[1]) < 16
    # Training with vanishing noise makes the same hard choice, through the soft code path,
    # where the padding rows exist as zero-weight rows and must get no attention.
    model.train()
    model.select.sigma = 1e-7
    torch.testing.assert_close(model(bags, padded).logits, out.logits)


def test_soft_path_tends_to_the_hard_path_and_trains_the_zoom_heads() -> None:
    bags, children, label = make_slides(1, seed=3)[0]
    model = _model(dropout=0.0).eval()
    hard = model(bags, children).logits
    model.train()
    model.select.sigma = 1e-7
    torch.testing.assert_close(model(bags, children).logits, hard)

    model.select.sigma = 0.1
    logits = model(bags, children).logits
    torch.nn.functional.cross_entropy(logits[None], torch.tensor([label])).backward()
    for level in model.levels[:2]:
        assert level.zoom.score.weight.grad.abs().sum() > 0


def test_one_magnification_is_abmil() -> None:
    bags, _, _ = make_slides(1, seed=4)[0]
    model = _model(mags=[1.25]).eval()
    assert len(model.levels) == 1 and model.levels[0].zoom is None
    assert not any("zoom" in name for name, _ in model.named_parameters())
    out = model([bags[0]], [])
    level = model.levels[0]
    z = level.project(bags[0])
    attention = torch.softmax(level.attention(z), dim=0)
    torch.testing.assert_close(out.logits, model.classifier(attention @ z))
    assert out.selected == [] and len(out.rows) == 1


def _accuracy(model: ZoomMIL, slides) -> float:
    labels = torch.tensor([label for *_, label in slides])
    return float((predict_logits(model, slides, "cpu").argmax(dim=1) == labels).float().mean())


def _train(mags: list[float], train, epochs: int) -> ZoomMIL:
    n = len(mags)
    model = _model(mags, sigma=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Annealing the learning rate settles the classifier once the zoom heads have found the
    # marked regions (a few epochs), instead of stopping at a random point of its noise.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    sampler = balanced_sampler([label for *_, label in train], seed=0)
    for _ in range(epochs):
        train_one_epoch(model, [(b[:n], c[: n - 1], y) for b, c, y in train],
                        list(sampler), optimizer, "cpu")
        schedule.step()
    return model


@pytest.fixture(scope="module")
def synthetic() -> tuple[list, list]:
    return make_slides(300, seed=10), make_slides(200, seed=11)


def test_zoommil_finds_high_magnification_evidence(synthetic) -> None:
    train, test = synthetic
    start = time.perf_counter()
    model = _train(MAGS, train, epochs=10)
    elapsed = time.perf_counter() - start
    accuracy = _accuracy(model, test)
    print(f"ZoomMIL 1.25x->2.5x->10x: test accuracy {accuracy:.3f}, trained in {elapsed:.1f} s")
    assert accuracy >= 0.95


def test_low_magnification_abmil_stays_at_chance(synthetic) -> None:
    train, test = synthetic
    model = _train([1.25], train, epochs=10)
    accuracy = _accuracy(model, [([b[0]], [], y) for b, _, y in test])
    print(f"ABMIL 1.25x: test accuracy {accuracy:.3f}")
    assert 0.35 <= accuracy <= 0.65
