"""Prov-GigaPath's tile encoder: timm's DINOv2 ViT-g built with 16 px patches, class token.

Its card resizes tiles to 256 px (bicubic) and centre-crops 224.
"""

from ._foundation import FoundationModel, register_foundation, timm_vit
from ._hub import HubFile

GIGAPATH = register_foundation(FoundationModel(
    name="prov_gigapath",
    hub=HubFile("prov-gigapath/prov-gigapath", ("pytorch_model.bin",)),
    licence="Apache-2.0 + research-only terms", gated=True, params="1.13B",
    # "patch14" in the name, 16 px patches in the model: the published config says so.
    architecture=timm_vit("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                          depth=40, num_heads=24, mlp_ratio=5.33334),
    feature_dim=1536, interpolation="bicubic", resize_to=256,
))
