"""Gated attention (Ilse et al., ICML 2018) for attention-based multiple-instance learning."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedAttention(nn.Module):
    """Gated attention scores ``w^T (tanh(V h) * sigmoid(U h))`` of the instances of one bag.

    Parameters
    ----------
    in_dim : int
        Dimension L of the instance embeddings (512 in ZoomMIL).
    hidden : int
        Dimension of the gating layers V and U (256 in ZoomMIL).
    branches : int
        Rows of ``w``: one score per instance for each (CLAM-MB has one branch per class).

    Notes
    -----
    The module returns unnormalised scores; :func:`masked_softmax` turns them into attention
    weights. ZoomMIL uses the same scores both to pool a bag and, in a second head, only to rank
    instances for zooming, so the two steps are kept apart.
    """

    def __init__(self, in_dim: int, hidden: int, branches: int = 1) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.gate_branch = nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid())
        self.score = nn.Linear(hidden, branches)

    def forward(self, h: Tensor) -> Tensor:
        """Score each instance.

        Parameters
        ----------
        h : Tensor
            Instance embeddings, shape (N, L).

        Returns
        -------
        Tensor
            Scores, shape (N,) with one branch, (N, branches) with more.
        """
        scores = self.score(self.tanh_branch(h) * self.gate_branch(h))
        return scores.squeeze(-1) if scores.shape[-1] == 1 else scores


def masked_softmax(scores: Tensor, weights: Tensor | None = None) -> Tensor:
    """Softmax of ``scores + log(weights)`` over a bag.

    Parameters
    ----------
    scores : Tensor
        Attention scores, shape (N,).
    weights : Tensor, optional
        Instance weights in [0, 1], shape (N,). A zero weight marks padding, which gets exactly
        zero attention; fractional weights come from soft selection during training, where a row
        is a mixture of real patches and padding. ``None`` means every row is a real patch.

    Returns
    -------
    Tensor
        Attention weights, shape (N,), summing to one, or all zero when no row has weight.
    """
    if weights is None:
        return torch.softmax(scores, dim=0)
    valid = weights > 0
    if not bool(valid.any()):
        return torch.zeros_like(scores)
    # The shift is taken over real rows only, and padding is set to -inf before exp, so a
    # large score on a padding row can neither overflow nor leak into the result.
    shift = scores[valid].max().detach()
    expo = torch.exp((scores - shift).masked_fill(~valid, float("-inf"))) * weights
    return expo / expo.sum()
