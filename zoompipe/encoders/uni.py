"""UNI and UNI2-h (Mahmood Lab): ViT-L/16 and ViT-H/14 with registers, class token features.

Built as the model cards and TRIDENT build them. zoompipe always feeds ``input_size`` pixels, so
the cards' ``dynamic_img_size=True`` (position embeddings resampled for other sizes) is left out:
at 224 px it computes the same.
"""

from ._foundation import FoundationModel, register_foundation, timm_vit
from ._hub import HubFile

_LICENCE = "CC-BY-NC-ND-4.0"

UNI = register_foundation(FoundationModel(
    name="uni",
    hub=HubFile("MahmoodLab/UNI", ("pytorch_model.bin",)),
    licence=_LICENCE, gated=True, params="303M",
    # init_values: the checkpoint has LayerScale weights (ls1.gamma), which timm only creates with it.
    architecture=timm_vit("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5),
    feature_dim=1024,
))

UNI2_H = register_foundation(FoundationModel(
    name="uni2_h",
    hub=HubFile("MahmoodLab/UNI2-h", ("pytorch_model.bin",)),
    licence=_LICENCE, gated=True, params="681M",
    architecture=timm_vit("vit_giant_patch14_224", swiglu=True, img_size=224, patch_size=14, depth=24,
                          num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
                          no_embed_class=True, reg_tokens=8),
    feature_dim=1536,
))
