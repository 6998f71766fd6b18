"""TransMIL: a transformer over the patches of one magnification (Shao et al., NeurIPS 2021).

Patch features are projected, a class token is prepended, and two Nystrom self-attention
layers (Xiong et al., AAAI 2021: attention through m landmarks, linear in the bag size) mix
them, with the PPEG position module in between: the tokens are laid on a square and three
depthwise convolutions (7, 5, 3) add where each one sits. The class token is classified.
For heatmaps, the attention of the class token over the patches in the last layer is computed
exactly (one row of the attention matrix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoompipe.model.bag import BagConfig, BagModel
from zoompipe.model.registry import register_model


@dataclass
class TransMILConfig(BagConfig):
    """:class:`~zoompipe.model.bag.BagConfig` and the transformer's shape.

    Parameters
    ----------
    heads : int
        Attention heads; ``hidden`` must be a multiple.
    landmarks : int, optional
        Nystrom landmarks; by default hidden / 2, as in TransMIL.
    pinv_iterations : int
        Iterations of the Moore-Penrose pseudo-inverse.
    """

    heads: int = 8
    landmarks: int | None = None
    pinv_iterations: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        self.landmarks = self.landmarks or max(1, self.hidden // 2)
        if self.heads < 1 or self.hidden % self.heads or self.landmarks < 1:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}), landmarks >= 1")


def _pinv(x: Tensor, iterations: int) -> Tensor:
    """Iterative Moore-Penrose pseudo-inverse of a batch of square matrices (Razavi et al. 2014)."""
    magnitude = x.abs()
    z = x.transpose(-1, -2) / (magnitude.sum(-1).max() * magnitude.sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated through landmarks, with a convolutional value residual."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, kernel: int = 33) -> None:
        super().__init__()
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.residual = nn.Conv2d(heads, heads, (kernel, 1), padding=(kernel // 2, 0), groups=heads, bias=False)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).permute(1, 2, 0, 3)  # each (heads, n, d)
        return q * self.scale, k, v

    def forward(self, x: Tensor) -> Tensor:
        """(n, dim) tokens -> (n, dim)."""
        n = x.shape[0]
        m = self.landmarks
        # Zero tokens in front make n a multiple of m, so that each landmark averages l tokens.
        padded = nn.functional.pad(x, (0, 0, -n % m, 0))
        q, k, v = self._qkv(padded)
        per = padded.shape[0] // m
        q_land = q.reshape(self.heads, m, per, -1).mean(dim=2)
        k_land = k.reshape(self.heads, m, per, -1).mean(dim=2)
        kernel_1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)
        kernel_2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)
        kernel_3 = (q_land @ k.transpose(-1, -2)).softmax(dim=-1)
        out = (kernel_1 @ _pinv(kernel_2, self.pinv_iterations)) @ (kernel_3 @ v)
        out = out + self.residual(v[None])[0]
        return self.out(out.permute(1, 0, 2).reshape(padded.shape[0], -1)[-n:])

    def row_attention(self, x: Tensor, row: int = 0) -> Tensor:
        """Exact softmax attention of token ``row`` over all tokens, averaged over heads, (n,)."""
        q, k, _ = self._qkv(x)
        return (q[:, row:row + 1] @ k.transpose(-1, -2)).softmax(dim=-1).mean(dim=0)[0]


class TransLayer(nn.Module):
    """Pre-norm Nystrom self-attention with a residual connection."""

    def __init__(self, config: TransMILConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden)
        self.attention = NystromAttention(config.hidden, config.heads, config.landmarks, config.pinv_iterations)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attention(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions over the token square."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:
        cls, tokens = x[:1], x[1:]
        square = tokens.transpose(0, 1).reshape(1, -1, side, side)
        square = square + sum(conv(square) for conv in self.convs)
        return torch.cat([cls, square.flatten(2)[0].transpose(0, 1)])


@register_model("transmil")
class TransMIL(BagModel):
    """TransMIL over the bag of one magnification."""

    config_class = TransMILConfig

    def __init__(self, config: TransMILConfig) -> None:
        super().__init__(config)
        self.cls_token = nn.Parameter(torch.randn(1, config.hidden))
        self.layer1 = TransLayer(config)
        self.position = PPEG(config.hidden)
        self.layer2 = TransLayer(config)
        self.norm = nn.LayerNorm(config.hidden)
        self.classifier = nn.Linear(config.hidden, config.n_classes)

    def classify(self, h: Tensor, label: int | None) -> tuple[Tensor, Tensor, None]:
        n = len(h)
        side = math.ceil(math.sqrt(n))
        # The square is completed with the first patches again, as in TransMIL.
        tokens = torch.cat([self.cls_token, h, h[: side * side - n]])
        x = self.position(self.layer1(tokens), side)
        attention = self.layer2.attention.row_attention(self.layer2.norm(x))[1:n + 1]
        x = self.norm(self.layer2(x))
        return self.classifier(x[0]), attention / attention.sum(), None
