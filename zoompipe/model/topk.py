"""Differentiable top-K selection by perturbed maximum (Cordonnier et al., CVPR 2021).

The hard top-K indicator of a score vector is piecewise constant, so it has no useful gradient.
Its expectation under Gaussian noise,

    T(a) = E_Z[ Y(a + sigma Z) ],   Z ~ N(0, I),

where ``Y(s)`` is the (K x N) one-hot matrix of the K largest entries of ``s`` sorted by
position, is smooth, and (Stein's lemma) its Jacobian is

    dT[k, n] / da[m] = E_Z[ Y(a + sigma Z)[k, n] Z[m] ] / sigma.

Both are estimated with the same Monte-Carlo samples. The Jacobian is the full outer product over
the patch axis: raising one score pushes *other* patches out of the selection, and those
off-diagonal terms carry most of the signal (the public ZoomMIL code kept only the diagonal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable


def topk_indices(scores: Tensor, k: int, groups: Tensor | None = None, per_group: int = 0) -> Tensor:
    """Indices of the ``k`` largest scores along the last axis, sorted by position.

    Parameters
    ----------
    scores : Tensor
        Scores, shape (..., N).
    k : int
        Number of indices, at most N (at most :func:`selectable_count` with ``groups``).
    groups : Tensor, optional
        LongTensor (N,): the group of each entry (ZoomMIL: the parent a child descends from).
    per_group : int
        With ``groups``, at most this many indices from one group, its largest scores; 0 or
        None ``groups``: no limit.

    Returns
    -------
    Tensor
        LongTensor of shape (..., k), ascending along the last axis.
    """
    if groups is not None and per_group > 0:
        scores = scores.masked_fill(_rank_in_group(scores, groups) >= per_group, float("-inf"))
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def _rank_in_group(scores: Tensor, groups: Tensor) -> Tensor:
    """Each entry's rank (0 = largest) among the scores of its group, shape of ``scores``."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    in_order = groups.expand_as(scores).gather(-1, order)
    by_group = in_order.argsort(dim=-1, stable=True)  # ties keep the score order
    grouped = in_order.gather(-1, by_group)
    position = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    starts = torch.ones_like(grouped, dtype=torch.bool)
    starts[..., 1:] = grouped[..., 1:] != grouped[..., :-1]
    rank = position - torch.where(starts, position, 0).cummax(dim=-1).values
    rank = torch.empty_like(rank).scatter_(-1, by_group, rank)
    return torch.empty_like(rank).scatter_(-1, order, rank)


def selectable_count(mask: Tensor, groups: Tensor | None = None, per_group: int = 0) -> int:
    """How many entries the fewest-choice bag can give :func:`topk_indices`.

    Parameters
    ----------
    mask : Tensor
        Bool (B, N); False marks entries that may not be selected.
    groups, per_group
        As in :func:`topk_indices`: a group gives at most ``per_group`` of its selectable entries.
    """
    if groups is None or per_group <= 0:
        return int(mask.sum(dim=-1).min())
    per = torch.zeros(len(mask), int(groups.max()) + 1, dtype=torch.long, device=mask.device)
    per.index_add_(1, groups.to(mask.device), mask.long())
    return int(per.clamp_max(per_group).sum(dim=-1).min())


class PerturbedTopKFunction(torch.autograd.Function):
    """Soft top-K selector and its Monte-Carlo Jacobian (see the module docstring).

    ``PerturbedTopKFunction.apply(scores, k, n_samples, sigma, generator, groups, per_group)``
    takes scores of shape (B, N) and returns the soft selector T of shape (B, K, N); each row of
    T sums to one. Entries set to ``-inf`` are never selected, provided every bag has at least K
    finite entries. The noise is drawn from ``generator`` (None: torch's global generator). With
    ``groups``, each sample's top-K takes at most ``per_group`` entries of a group
    (:func:`topk_indices`); Stein's lemma holds for any selection rule of the perturbed scores,
    so the Jacobian estimate below is unchanged.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, scores: Tensor, k: int, n_samples: int, sigma: float,
        generator: torch.Generator | None = None, groups: Tensor | None = None, per_group: int = 0,
    ) -> Tensor:
        batch, n = scores.shape
        noise = torch.randn(batch, n_samples, n, dtype=scores.dtype, device=scores.device, generator=generator)
        indices = topk_indices(scores.unsqueeze(1) + sigma * noise, k, groups, per_group)  # (B, S, K)
        selector = scores.new_zeros(batch, k, n)
        selector.scatter_add_(
            -1,
            indices.transpose(1, 2),
            scores.new_full((batch, k, n_samples), 1.0 / n_samples),
        )
        ctx.save_for_backward(indices, noise)
        ctx.sigma = sigma
        return selector

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_selector: Tensor
    ) -> tuple[Tensor, None, None, None, None, None, None]:
        indices, noise = ctx.saved_tensors
        n_samples = noise.shape[1]
        # <grad, Y_s> for each sample s; Y_s has one 1 per row k, at column indices[b, s, k].
        inner = grad_selector.gather(-1, indices.transpose(1, 2)).sum(dim=1)  # (B, S)
        # sum_{k,n} grad[k,n] E[Y_kn Z_m] / sigma = E[<grad, Y> Z_m] / sigma, for every m.
        # Each sample's baseline is the mean of the *other* samples' inner products: it is
        # independent of that sample's noise, so E[baseline * Z] = 0 and the estimate stays
        # unbiased, while the large common part of <grad, Y> (most of the K choices agree
        # across samples) no longer multiplies the noise. Leave-one-out centring is
        # S / (S - 1) times centring on the mean of all samples.
        if n_samples > 1:
            centred = (inner - inner.mean(dim=1, keepdim=True)) * (n_samples / (n_samples - 1))
        else:
            centred = inner
        grad_scores = torch.einsum("bs,bsm->bm", centred, noise) / (n_samples * ctx.sigma)
        return grad_scores, None, None, None, None, None, None


#: Smallest score range that :func:`normalise_scores` divides by, in the units of the raw scores.
MIN_SCORE_SPAN = 1e-2


def normalise_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Min-max normalise each bag's scores to [0, 1]; masked entries become ``-inf``.

    The noise scale ``sigma`` is then a fraction of the score range whatever the number of
    patches or the scale of the scores (ZoomMIL's softmax scores shrink like 1/N, which made its
    fixed sigma mean something different on every slide). A bag whose range is below
    :data:`MIN_SCORE_SPAN` is scaled by that floor instead, so it spans less than [0, 1] and
    the noise, not the head, decides its selection until the scores spread out.

    Parameters
    ----------
    scores : Tensor
        Scores, shape (B, N).
    mask : Tensor
        Bool, shape (B, N); False marks entries that may not be selected.

    Returns
    -------
    Tensor
        Normalised scores, shape (B, N).
    """
    inf = torch.finfo(scores.dtype).max
    low = scores.masked_fill(~mask, inf).amin(dim=-1, keepdim=True)
    high = scores.masked_fill(~mask, -inf).amax(dim=-1, keepdim=True)
    # The gradient through this scaling grows like 1 / span; a floor keeps a bag whose scores
    # have collapsed (all patches alike to the head) from producing huge steps.
    span = (high - low).clamp_min(MIN_SCORE_SPAN)
    return ((scores - low) / span).masked_fill(~mask, float("-inf"))


class PerturbedTopK(nn.Module):
    """Top-K selector: perturbed-maximum soft selection in training, hard top-K in eval.

    Parameters
    ----------
    n_samples : int
        Monte-Carlo noise samples per forward pass.
    sigma : float
        Standard deviation of the noise, relative to the [0, 1] range of the min-max normalised
        scores (see :func:`normalise_scores`). Training schedules may change it between steps.
    """

    def __init__(self, n_samples: int = 500, sigma: float = 0.05) -> None:
        super().__init__()
        self.n_samples = n_samples
        self.sigma = sigma

    def forward(self, scores: Tensor, k: int, mask: Tensor | None = None,
                generator: torch.Generator | None = None, groups: Tensor | None = None,
                per_group: int = 0) -> Tensor:
        """Select the top-K entries of each bag.

        Parameters
        ----------
        scores : Tensor
            Scores, shape (B, N).
        k : int
            Number of entries to select; capped at the number of selectable entries of a bag.
        mask : Tensor, optional
            Bool, shape (B, N); False marks entries that may not be selected (padding).
        generator : torch.Generator, optional
            Where the noise is drawn from; torch's global generator by default.
        groups, per_group
            At most ``per_group`` entries of a group (LongTensor (N,)) selected, in every noise
            sample and in eval (:func:`topk_indices`); None or 0: no limit.

        Returns
        -------
        Tensor
            Selector T, shape (B, K, N), with K = min(k, fewest selectable entries in a bag,
            :func:`selectable_count`).
            Row k of T is the (expected) one-hot vector of the k-th selected entry, counting by
            position. In eval mode, or when a bag has exactly K selectable entries and so no
            choice to make, T is the hard selector and carries no gradient to the scores.
        """
        if mask is None:
            mask = torch.ones_like(scores, dtype=torch.bool)
        n_valid = mask.sum(dim=-1)
        k = min(k, selectable_count(mask, groups, per_group))
        if not self.training or bool((n_valid == k).all()):
            hard = topk_indices(scores.detach().masked_fill(~mask, float("-inf")), k, groups, per_group)
            return F.one_hot(hard, scores.shape[-1]).to(scores.dtype)
        return PerturbedTopKFunction.apply(
            normalise_scores(scores, mask), k, self.n_samples, self.sigma, generator, groups, per_group
        )

    def extra_repr(self) -> str:
        return f"n_samples={self.n_samples}, sigma={self.sigma}"
