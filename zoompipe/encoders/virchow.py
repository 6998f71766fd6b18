"""Virchow and Virchow2 (Paige): ViT-H/14 with SwiGLU; concat(class token, mean patch token).

The feature is the 2560-d concatenation that Paige's cards and TRIDENT return (STAMP returns the
1280-d class token alone). Virchow2's 4 register tokens are left out of the mean.
"""

from ._foundation import FoundationModel, cls_mean_pool, register_foundation, timm_vit
from ._hub import HubFile


def _virchow(**extra: object):
    return timm_vit("vit_huge_patch14_224", swiglu=True, img_size=224, init_values=1e-5, mlp_ratio=5.3375,
                    global_pool="", **extra)


VIRCHOW = register_foundation(FoundationModel(
    name="virchow",
    hub=HubFile("paige-ai/Virchow", ("model.safetensors", "pytorch_model.bin")),
    licence="Apache-2.0", gated=True, params="631M",
    architecture=_virchow(), head=cls_mean_pool, feature_dim=2560, interpolation="bicubic",
))

VIRCHOW2 = register_foundation(FoundationModel(
    name="virchow2",
    hub=HubFile("paige-ai/Virchow2", ("model.safetensors", "pytorch_model.bin")),
    licence="CC-BY-NC-ND-4.0", gated=True, params="631M",
    architecture=_virchow(reg_tokens=4), head=cls_mean_pool, feature_dim=2560, interpolation="bicubic",
))
