"""H-optimus-0, H-optimus-1 and H0-mini (Bioptimus): DINOv2 ViTs with 4 registers, class token.

All three use Bioptimus' own normalisation, not ImageNet's. H0-mini is the ViT-B/14 distilled
from H-optimus-0: timm's ``vit_base_patch14_reg4_dinov2`` with the packed SwiGLU MLP its card
passes, as wide as H-optimus-0's (mlp_ratio 2.66667 * 2; the card's 86M parameters need it, timm's
default of 4 gives 72M; a file of other widths is refused with the shapes that differ). Its 768-d
class token is the feature (TRIDENT's default); the card's alternative, class token plus mean
patch token, is not registered.
"""

from ._foundation import HOPTIMUS, FoundationModel, register_foundation, timm_vit
from ._hub import HubFile


def _giant():
    return timm_vit("vit_giant_patch14_reg4_dinov2", img_size=224, global_pool="token", init_values=1e-5)


H_OPTIMUS_0 = register_foundation(FoundationModel(
    name="h_optimus_0",
    hub=HubFile("bioptimus/H-optimus-0", ("model.safetensors", "pytorch_model.bin")),
    licence="Apache-2.0", gated=False, params="1.13B",
    architecture=_giant(), feature_dim=1536, normalisation=HOPTIMUS,
))

H_OPTIMUS_1 = register_foundation(FoundationModel(
    name="h_optimus_1",
    hub=HubFile("bioptimus/H-optimus-1", ("model.safetensors", "pytorch_model.bin")),
    licence="CC-BY-NC-ND-4.0", gated=True, params="1.13B",
    architecture=_giant(), feature_dim=1536, normalisation=HOPTIMUS,
))

H0_MINI = register_foundation(FoundationModel(
    name="h0_mini",
    hub=HubFile("bioptimus/H0-mini", ("model.safetensors", "pytorch_model.bin")),
    licence="CC-BY-NC-ND-4.0", gated=True, params="86M",
    architecture=timm_vit("vit_base_patch14_reg4_dinov2", swiglu=True, img_size=224, global_pool="token",
                          init_values=1e-5, mlp_ratio=2.66667 * 2),
    feature_dim=768, normalisation=HOPTIMUS,
))
