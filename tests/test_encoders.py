"""Tests of the patch-encoder registry; all offline, on CPU."""

import os

# Must precede the first huggingface_hub import, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from zoompipe.encoders import create_encoder, list_encoders
from zoompipe.encoders.efficientnet import build_lite0_classifier
from zoompipe.encoders.encoder import resolve_precision
from zoompipe.errors import ZoompipeError

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Other test modules may have imported huggingface_hub before the variable was set.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    """Centre square of scikit-image's cat photo, 300 x 300 RGB uint8."""
    image = data.chelsea()
    h, w, _ = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


@pytest.fixture(scope="module")
def patches(cat) -> np.ndarray:
    """Four 256 px patches of real image content (plain noise says little about bf16)."""
    big = np.asarray(Image.fromarray(cat).resize((512, 512), Image.BILINEAR))
    return np.stack([big[y : y + 256, x : x + 256] for y in (0, 256) for x in (0, 256)])


@pytest.fixture(scope="module")
def lite0_fp32():
    return create_encoder("efficientnet_lite0", precision="fp32")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_registry_lists_the_built_in_encoders():
    assert {"efficientnet_lite0", "resnet50_trunc", "timm:<model>"} <= set(list_encoders())


def test_default_weights_are_real_imagenet_weights(lite0_fp32, cat):
    # The encoder's own preprocessing (300 -> 224 resize, scaling) feeds the real head.
    features = lite0_fp32.embed(cat[None])
    head = build_lite0_classifier().get_classifier()
    with torch.inference_mode():
        logits = head(torch.from_numpy(features))
    assert logits.argmax(1).item() in IMAGENET_CATS


def test_features_shape_dtype_and_determinism(lite0_fp32, patches):
    assert lite0_fp32.name == "efficientnet_lite0"
    assert (lite0_fp32.feature_dim, lite0_fp32.input_size) == (1280, 224)
    features = lite0_fp32.embed(patches)
    assert features.shape == (4, 1280) and features.dtype == np.float32
    assert np.isfinite(features).all()
    np.testing.assert_array_equal(features, lite0_fp32.embed(patches))
    assert lite0_fp32.embed(patches[:0]).shape == (0, 1280)


def test_padded_batches_give_the_rows_features(patches):
    # On CUDA batches are padded to a multiple of 16 rows (one cuDNN plan per shape): padding must
    # neither show in the output nor change the real rows' features.
    padded = create_encoder("efficientnet_lite0", precision="fp32")
    assert padded.row_multiple == 1  # CPU: nothing to pad
    plain = padded.embed(patches[:3])
    padded.row_multiple = 16
    features = padded.embed(patches[:3])
    assert features.shape == (3, 1280)
    np.testing.assert_allclose(features, plain, rtol=1e-5, atol=1e-5)


def test_bf16_features_match_fp32(lite0_fp32, patches):
    bf16 = create_encoder("efficientnet_lite0", precision="bf16")
    assert bf16.precision == "bf16"
    features = bf16.embed(patches)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, bf16.embed(patches))
    assert cosine(features, lite0_fp32.embed(patches)).min() > 0.99


def test_256px_patches_resized_like_clam(lite0_fp32, patches):
    # CLAM resizes 256 px PIL patches to 224 before ImageNet encoders.
    resized = np.stack(
        [np.asarray(Image.fromarray(p).resize((224, 224), Image.BILINEAR)) for p in patches]
    )
    ours = lite0_fp32.preprocess(torch.from_numpy(patches).permute(0, 3, 1, 2))
    pil = lite0_fp32.preprocess(torch.from_numpy(resized.copy()).permute(0, 3, 1, 2))
    assert ours.shape == (4, 3, 224, 224)
    # lite0 scales by 1 / 127.5: the two resizes differ by at most one grey level.
    assert (ours - pil).abs().max().item() <= 1 / 127.5 + 1e-6
    assert cosine(lite0_fp32.embed(patches), lite0_fp32.embed(resized)).min() > 0.9995


def test_auto_precision(monkeypatch):
    monkeypatch.setattr("zoompipe.encoders.encoder._cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr("zoompipe.encoders.encoder._cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ZoompipeError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


def test_embed_rejects_non_uint8_rgb(lite0_fp32, patches):
    with pytest.raises(ValueError, match="uint8"):
        lite0_fp32.embed(patches.astype(np.float32))


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A torchvision ResNet-50 state dict (random init) saved as a torch file."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_resnet50_trunc_loads_torchvision_weights(resnet50_file, patches):
    reference, path = resnet50_file
    encoder = create_encoder("resnet50_trunc", weights=path, precision="fp32")
    assert (encoder.name, encoder.feature_dim) == ("resnet50_trunc", 1024)
    features = encoder.embed(patches[:2])
    assert features.shape == (2, 1024) and features.dtype == np.float32
    # The CLAM trunk computed by hand on the same preprocessed input.
    x = encoder.preprocess(torch.from_numpy(patches[:2]).permute(0, 3, 1, 2))
    r = reference
    with torch.inference_mode():
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        expected = r.layer3(r.layer2(r.layer1(x))).mean((2, 3))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_resnet50_trunc_loads_trunk_only_safetensors(resnet50_file, patches, tmp_path):
    reference, full = resnet50_file
    trunk = {
        k: v.contiguous() for k, v in reference.state_dict().items()
        if not k.startswith(("layer4.", "fc."))
    }
    path = tmp_path / "trunk.safetensors"
    save_file(trunk, path)
    a = create_encoder("resnet50_trunc", weights=path, precision="fp32").embed(patches[:1])
    b = create_encoder("resnet50_trunc", weights=full, precision="fp32").embed(patches[:1])
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(model.state_dict(), path)
    return path


def test_timm_model_with_safetensors_weights(resnet18_file, patches):
    encoder = create_encoder("timm:resnet18", weights=resnet18_file)
    assert (encoder.name, encoder.feature_dim) == ("timm:resnet18", 512)
    assert encoder.config.mean == (0.485, 0.456, 0.406)
    features = encoder.embed(patches[:2])
    assert features.shape == (2, 512) and features.dtype == np.float32


def one_line_error(**kwargs) -> str:
    with pytest.raises(ZoompipeError) as info:
        create_encoder(**kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_weights_that_do_not_fit(resnet18_file):
    message = one_line_error(name="resnet50_trunc", weights=resnet18_file)
    assert "does not fit encoder resnet50_trunc" in message and "of another shape" in message
    message = one_line_error(name="timm:resnet34", weights=resnet18_file)
    assert "missing" in message
    assert "does not fit" in one_line_error(name="efficientnet_lite0", weights=resnet18_file)


def test_unknown_names():
    assert "unknown encoder 'resnet51'" in one_line_error(name="resnet51")
    assert "unknown encoder" in one_line_error(name="timm:not_a_model")
    assert "unknown encoder" in one_line_error(name="timm:")


def test_missing_weights_file(tmp_path):
    assert "not found" in one_line_error(name="resnet50_trunc", weights=tmp_path / "no.pth")


def test_offline_without_weights_names_the_flag():
    assert "--weights FILE" in one_line_error(name="resnet50_trunc")


class _Payload:
    """Unpickling this would create a directory: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_objects_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(marker)}, path)
    assert "pickles Python objects" in one_line_error(name="resnet50_trunc", weights=path)
    assert not marker.exists()


def test_file_without_tensors_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    assert "state dict" in one_line_error(name="resnet50_trunc", weights=path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert "cannot read" in one_line_error(name="resnet50_trunc", weights=garbage)
