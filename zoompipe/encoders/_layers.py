"""Modules the foundation models need beyond timm's: imported when one is built (torch loads then)."""

from __future__ import annotations

import torch
from torch import nn


class ClsMeanPool(nn.Module):
    """A timm ViT's class token concatenated with the mean of its patch tokens.

    Patch tokens start after ``num_prefix_tokens`` (class token and registers), as Virchow's
    and H0-mini's cards slice them.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.vit.num_prefix_tokens:].mean(1)], dim=-1)


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 convolutions (BatchNorm, ReLU), a 1x1
    projection, then the norm; outputs channels-last tokens as timm's Swin expects.

    Accepts (and ignores) the keyword arguments timm passes to a patch embedding.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 4,
                 in_chans: int = 3, embed_dim: int = 96, norm_layer: type[nn.Module] | None = None,
                 **ignored: object) -> None:
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as CONCH v1.5 uses it: learned queries attend over the tokens.

    Parameter names follow CONCH's (``query``, ``ln_q``, ``ln_k``, ``to_q``, ``to_kv``,
    ``to_out``) so its checkpoint loads by name.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.scale = (d_model // n_head) ** -0.5
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, tokens, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, context_dim)`` tokens -> ``(B, n_queries, d_model)``."""
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q = self.to_q(self.ln_q(self.query)).expand(x.shape[0], -1, -1)
        attention = ((self._split(q) * self.scale) @ self._split(k).transpose(-1, -2)).softmax(-1)
        return self.to_out((attention @ self._split(v)).transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """CONCH v1.5's image side: ViT-L/16 trunk, attentional pooler, LayerNorm -> 768-d."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])
