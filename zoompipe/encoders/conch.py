"""CONCH v1.5 (Mahmood Lab), the image tower: ViT-L/16 trunk, attentional pooler, LayerNorm.

Built as TRIDENT builds it from ``pytorch_model_vision.bin`` (keys ``trunk.*``,
``attn_pool_contrast.*``, ``ln_contrast.*``): 448 px input, 768-d pooled feature. Its trunk is
created at 224 px and its position table, resampled to 14 x 14 (bilinear) on loading, is
interpolated to the 28 x 28 grid of a 448 px input at every forward pass (bicubic, DINO's
``+0.1`` scale factor). zoompipe builds the trunk at 448 px and does both steps once, on loading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._foundation import FoundationModel, register_foundation, timm_vit
from ._hub import HubFile

if TYPE_CHECKING:
    import torch
    from torch import nn

INPUT = 448
_PATCH = 16


def _tower() -> nn.Module:
    from ._layers import ConchVisionTower

    return ConchVisionTower(timm_vit("vit_large_patch16_224", img_size=INPUT, init_values=1.0)())


def conch_position_table(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """CONCH's position table as its trunk uses it on a 448 px input."""
    import math

    import torch.nn.functional as F
    from timm.layers import resample_abs_pos_embed

    import torch

    table = state.get("trunk.pos_embed")
    if table is None:
        return state
    built = 224 // _PATCH
    if table.shape[1] != built * built + 1:
        table = resample_abs_pos_embed(table, new_size=(built, built), num_prefix_tokens=1,
                                       interpolation="bilinear", antialias=False, verbose=False)
    grid = INPUT // _PATCH
    cls, patches = table[:, :1], table[:, 1:]
    side = math.isqrt(patches.shape[1])
    patches = F.interpolate(patches.reshape(1, side, side, -1).permute(0, 3, 1, 2),
                            scale_factor=((grid + 0.1) / side, (grid + 0.1) / side), mode="bicubic")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return {**state, "trunk.pos_embed": torch.cat([cls, patches], dim=1)}


CONCH_V15 = register_foundation(FoundationModel(
    name="conch_v15",
    hub=HubFile("MahmoodLab/conchv1_5", ("pytorch_model_vision.bin",)),
    licence="CC-BY-NC-ND-4.0", gated=True, params="306M",
    architecture=_tower, feature_dim=768, input_size=INPUT, convert=conch_position_table,
))
