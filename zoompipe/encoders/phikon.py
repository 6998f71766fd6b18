"""Phikon and Phikon-v2 (Owkin): Hugging Face transformers checkpoints run as timm ViTs.

Phikon is a transformers ``ViTModel`` (ViT-B/16), Phikon-v2 a ``Dinov2Model`` (ViT-L/16); the
feature is ``last_hidden_state[:, 0]``, the class token after the final LayerNorm. Both are the
plain pre-norm ViT that timm builds, so their tensors are renamed (and query, key and value
stacked into timm's ``qkv``) instead of depending on transformers: one runtime for every encoder,
and the same ONNX export. ``tests/test_foundation.py`` checks the renaming against the layout
transformers saves.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ._foundation import FoundationModel, register_foundation, timm_vit
from ._hub import HubFile

if TYPE_CHECKING:
    import torch
    from torch import nn

_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.(?:layernorm_before|norm1)\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.(?:layernorm_after|norm2)\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc\d)\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layernorm\.", "norm."),
)
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def transformers_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ViT or DINOv2 state dict under timm's ViT names.

    A ``vit.`` / ``dinov2.`` prefix (task models' base model) is dropped, as
    ``from_pretrained`` does. Position embeddings of another grid are resampled (bicubic) to
    the model's, which transformers does at every forward pass.
    """
    from timm.layers import resample_abs_pos_embed

    out: dict[str, torch.Tensor] = {}
    stacked: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = re.sub(r"^(vit|dinov2)\.", "", key)
        match = _QKV.match(key)
        if match:
            block, part, kind = match.groups()
            stacked.setdefault((block, kind), {})[part] = value
            continue
        for pattern, replacement in _RENAMES:
            key, count = re.subn(pattern, replacement, key)
            if count:
                break
        out[key] = value
    for (block, kind), parts in stacked.items():
        out[f"blocks.{block}.attn.qkv.{kind}"] = _cat([parts[p] for p in ("query", "key", "value") if p in parts])
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size, num_prefix_tokens=1,
                                                  interpolation="bicubic", antialias=False, verbose=False)
    return out


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.cat(parts, dim=0)


def _phikon():
    import functools

    from torch import nn

    # transformers' ViT normalises with eps 1e-12, timm's default is 1e-6.
    return timm_vit("vit_base_patch16_224", img_size=224, global_pool="token",
                    norm_layer=functools.partial(nn.LayerNorm, eps=1e-12))()


PHIKON = register_foundation(FoundationModel(
    name="phikon",
    hub=HubFile("owkin/phikon", ("model.safetensors", "pytorch_model.bin")),
    licence="Owkin non-commercial", gated=False, params="86M",
    architecture=_phikon, feature_dim=768, convert=transformers_to_timm, ignore_prefixes=("pooler.",),
))

PHIKON_V2 = register_foundation(FoundationModel(
    name="phikon_v2",
    hub=HubFile("owkin/phikon-v2", ("model.safetensors",)),
    licence="Owkin non-commercial", gated=False, params="303M",
    # DINOv2 always has LayerScale; init_values makes timm create it.
    architecture=timm_vit("vit_large_patch16_224", img_size=224, global_pool="token", init_values=1e-5),
    feature_dim=1024, convert=transformers_to_timm, ignore_prefixes=("embeddings.mask_token",),
))
