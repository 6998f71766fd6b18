"""Perturbed top-K: the Monte-Carlo Jacobian is the full outer product, checked numerically."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoompipe.model.topk import PerturbedTopK, PerturbedTopKFunction, selectable_count, topk_indices

N, K, SIGMA = 6, 2, 0.05


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores within about one sigma of each other, so that the noise changes the selection and
    the smoothed objective has a large gradient, and a random linear functional W of T."""
    gen = torch.Generator().manual_seed(seed)
    scores = 0.5 + 0.6 * SIGMA * torch.randn(N, generator=gen, dtype=torch.float64)
    weight = torch.randn(K, N, generator=gen, dtype=torch.float64)
    return scores, weight


def _finite_difference(scores: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor | None = None,
                       per_group: int = 0) -> torch.Tensor:
    """Central differences of F(a) = E[<W, Y(a + sigma Z)>], all evaluated on the same noise
    (common random numbers), so that only samples whose selection changes contribute."""
    noise = torch.randn(400_000, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def smoothed(a: torch.Tensor) -> torch.Tensor:
        selected = topk_indices(a + SIGMA * noise, K, groups, per_group)  # (S, K)
        return weight[torch.arange(K), selected].sum(dim=-1).mean()

    eps = 0.1 * SIGMA
    steps = torch.eye(N, dtype=torch.float64) * eps
    return torch.stack([(smoothed(scores + e) - smoothed(scores - e)) / (2 * eps) for e in steps])


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def test_backward_matches_finite_differences_and_diagonal_does_not() -> None:
    scores, weight = _problem()
    reference = _finite_difference(scores, weight)

    torch.manual_seed(2)
    a = scores[None].clone().requires_grad_()
    selector = PerturbedTopKFunction.apply(a, K, 200_000, SIGMA)
    (selector[0] * weight).sum().backward()
    assert _relative_error(a.grad[0], reference) < 0.05

    # The diagonal-only Jacobian of the public ZoomMIL code, dT[k,n]/da[m] = 0 for m != n,
    # on as many samples, misses how raising one score pushes the others out.
    noise = torch.randn(200_000, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    onehot = F.one_hot(topk_indices(scores + SIGMA * noise, K), N).to(noise.dtype)
    diagonal = torch.einsum("kn,skn,sn->n", weight, onehot, noise) / (len(noise) * SIGMA)
    assert _relative_error(diagonal, reference) > 0.25
    # Shifting every score alike changes nothing, so the true gradient sums to zero.
    assert abs(float(reference.sum())) < 0.05 * float(reference.abs().sum())


def test_forward_is_mean_of_sorted_hard_selections() -> None:
    torch.manual_seed(0)
    scores = torch.rand(3, 10)
    selector = PerturbedTopKFunction.apply(scores, 4, 50, 0.1)
    assert selector.shape == (3, 4, 10)
    torch.testing.assert_close(selector.sum(dim=-1), torch.ones(3, 4))
    # Row k is the k-th selected patch by position, so its mass sits left of row k + 1's.
    positions = (selector * torch.arange(10.0)).sum(dim=-1)
    assert bool((positions[:, 1:] > positions[:, :-1]).all())


def test_eval_mode_is_hard_topk_sorted_by_position() -> None:
    torch.manual_seed(0)
    scores = torch.randn(4, 20)
    select = PerturbedTopK().eval()
    selector = select(scores, 5)
    expected = torch.topk(scores, 5, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(selector.argmax(dim=-1), expected)
    assert torch.equal(selector.sum(dim=-1), torch.ones(4, 5))


def test_k_is_capped_and_masked_entries_are_never_selected() -> None:
    torch.manual_seed(0)
    scores = torch.randn(1, 8, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False, True, True, True]])
    select = PerturbedTopK(n_samples=64, sigma=0.5).train()
    assert select(scores, 12).shape == (1, 8, 8)  # min(N, K)

    selector = select(scores, 12, mask)
    assert selector.shape == (1, 6, 8)  # min(valid, K): nothing to choose, hard selection
    assert float(selector[..., ~mask[0]].sum()) == 0.0

    selector = select(scores, 3, mask)
    assert float(selector.detach()[..., ~mask[0]].sum()) == 0.0
    (selector * torch.randn(1, 3, 8)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert float(scores.grad[~mask].abs().sum()) == 0.0


def test_top_k_per_group_is_each_groups_best_then_the_best_of_those() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 12, generator=gen)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
    for per_group, k in [(1, 3), (1, 4), (2, 5), (3, 7)]:
        got = topk_indices(scores, k, groups, per_group)
        for row, chosen in zip(scores, got):
            kept = [int(i) for g in range(4) for i in (groups == g).nonzero().flatten()[
                row[groups == g].argsort(descending=True)[:per_group]]]
            expected = sorted(sorted(kept, key=lambda i: -float(row[i]))[:k])
            assert chosen.tolist() == expected
    mask = torch.tensor([[True] * 8 + [True, False, False, False]])
    # Groups 0 and 1 give two each, group 2 one, group 3 none.
    assert selectable_count(mask, groups, 2) == 5 and selectable_count(mask, groups, 0) == 9
    select = PerturbedTopK(n_samples=64, sigma=0.5).train()
    selector = select(scores[:1].requires_grad_(), 8, mask, None, groups, 1)
    assert selector.shape == (1, 3, 12)  # one from each group that has a selectable entry
    taken = selector.detach()[0].sum(dim=0)
    assert float(taken[~mask[0]].sum()) == 0.0
    for g in range(3):  # every noise sample took one entry of each group
        assert float(taken[groups == g].sum()) == pytest.approx(1.0)


def test_backward_with_a_limit_per_group_matches_finite_differences() -> None:
    # Stein's lemma holds for any selection rule of the perturbed scores, this one too.
    scores, weight = _problem(seed=4)
    groups, per_group = torch.tensor([0, 0, 0, 1, 1, 1]), 1
    reference = _finite_difference(scores, weight, groups, per_group)
    torch.manual_seed(5)
    a = scores[None].clone().requires_grad_()
    selector = PerturbedTopKFunction.apply(a, K, 200_000, SIGMA, None, groups, per_group)
    (selector[0] * weight).sum().backward()
    assert _relative_error(a.grad[0], reference) < 0.05
