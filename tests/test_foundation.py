"""Pathology foundation-model encoders: architecture, normalisation and hub files, all offline.

Weights are never downloaded: each test writes a state dict with the real key names and shapes
in the hub's file format. Models too large to run here are built on the ``meta`` device, where
nothing is allocated; their files are written sparse (safetensors) or with one shared element
per tensor (torch), so a 4.5 GB checkpoint costs a few kilobytes.
"""

from __future__ import annotations

import json
import os
import re
import struct

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from zoompipe.encoders import check_weights, create_encoder, encoder_info
from zoompipe.encoders._foundation import _FOUNDATION
from zoompipe.errors import ZoompipeError

IMN = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPT = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))

#: REFERENCE.md section 6: feature size, input size, normalisation, parameters (millions), gated.
REFERENCE = {
    "uni": (1024, 224, IMN, 303, True),
    "uni2_h": (1536, 224, IMN, 681, True),
    "conch_v15": (768, 448, IMN, 306, True),
    "virchow": (2560, 224, IMN, 631, True),
    "virchow2": (2560, 224, IMN, 631, True),
    "h_optimus_0": (1536, 224, HOPT, 1130, False),
    "h_optimus_1": (1536, 224, HOPT, 1130, True),
    "h0_mini": (768, 224, HOPT, 86, True),
    "phikon": (768, 224, IMN, 86, False),
    "phikon_v2": (1024, 224, IMN, 303, False),
    "prov_gigapath": (1536, 224, IMN, 1130, True),
    "ctranspath": (768, 224, IMN, 28, True),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def test_every_hub_model_is_registered_with_its_reference_facts():
    assert set(_FOUNDATION) == set(REFERENCE)
    for name, (dim, size, norm, _, gated) in REFERENCE.items():
        info = encoder_info(name)
        assert (info.feature_dim, info.input_size, info.gated) == (dim, size, gated), name
        config = _FOUNDATION[name].config("sha256:x")
        assert (config.mean, config.std) == norm, name


# -- the hub's key layouts, written from the models' own code, not from zoompipe's mapping --------

def _transformers_vit(state: dict, dinov2: bool) -> dict:
    """timm ViT names -> transformers' ViTModel / Dinov2Model names, q, k, v split."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"]}
    renames = {"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
    for key, value in state.items():
        block = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if block is None:
            head, _, kind = key.rpartition(".")
            if head in renames:
                out[f"{renames[head]}.{kind}"] = value
            continue
        i, rest = block.groups()
        layer = f"encoder.layer.{i}"
        if rest.startswith("attn.qkv."):
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{layer}.attention.attention.{part}.{rest.rsplit('.', 1)[1]}"] = chunk
            continue
        names = {"attn.proj": "attention.output.dense",
                 "norm1": "norm1" if dinov2 else "layernorm_before", "norm2": "norm2" if dinov2 else "layernorm_after",
                 "mlp.fc1": "mlp.fc1" if dinov2 else "intermediate.dense",
                 "mlp.fc2": "mlp.fc2" if dinov2 else "output.dense"}
        if rest.startswith("ls"):
            out[f"{layer}.layer_scale{rest[2]}.lambda1"] = value
            continue
        head, _, kind = rest.rpartition(".")
        out[f"{layer}.{names[head]}.{kind}"] = value
    if dinov2:
        out["embeddings.mask_token"] = torch.zeros(1, state["cls_token"].shape[-1], device=state["cls_token"].device)
    else:
        width = state["cls_token"].shape[-1]
        out["pooler.dense.weight"] = torch.zeros(width, width, device=state["cls_token"].device)
        out["pooler.dense.bias"] = torch.zeros(width, device=state["cls_token"].device)
    return out


def _old_swin(state: dict) -> dict:
    """timm 1.x Swin names -> TransPath's timm 0.5.4 layout (CHIEF's file): patch merging at the
    end of a stage, attention masks of the shifted blocks and position indices stored."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            out[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
                49, 49, dtype=torch.int64, device=value.device)
    # TRIDENT's list of the masks the file holds (the shifted blocks whose window is not the stage).
    for block in ("layers.0.blocks.1", "layers.1.blocks.1", "layers.2.blocks.1", "layers.2.blocks.3",
                  "layers.2.blocks.5"):
        out[f"{block}.attn_mask"] = torch.zeros(4, 49, 49, device=next(iter(state.values())).device)
    return {"model": out}


def hub_layout(name: str, state: dict) -> dict:
    if name == "phikon":
        return _transformers_vit(state, dinov2=False)
    if name == "phikon_v2":
        return _transformers_vit(state, dinov2=True)
    if name == "ctranspath":
        return _old_swin(state)
    if name == "conch_v15":  # TRIDENT resizes the table to the 224 px trunk's 14 x 14 grid on loading
        table = state["trunk.pos_embed"]
        return {**state, "trunk.pos_embed": torch.zeros(1, 197, table.shape[-1], device=table.device)}
    return state  # timm checkpoints: the module's own names


def architecture_state(name: str, device: str) -> dict:
    with torch.device(device):
        module = _FOUNDATION[name].architecture()
    return {k: v for k, v in module.state_dict().items() if not k.endswith(("attn_mask", "relative_position_index"))}


_ST_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def write_sparse_safetensors(path, state: dict) -> None:
    """A valid .safetensors file whose data region is a hole: real header, no disk used."""
    header, offset = {}, 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)


def write_shared_torch(path, state) -> None:
    """A torch file whose tensors all view one element (stride 0): real names and shapes, tiny."""
    one = torch.zeros(1)

    def shrink(value):
        if isinstance(value, dict):
            return {k: shrink(v) for k, v in value.items()}
        return one.to(value.dtype).expand(value.shape) if value.dim() else one.to(value.dtype)[0]

    torch.save(shrink(state), path)


def write_hub_file(name: str, folder, device: str = "meta"):
    """The model's weights file as its hub publishes it, under the hub's file name."""
    model = _FOUNDATION[name]
    state = hub_layout(name, architecture_state(name, device))
    path = folder / model.hub.filenames[0]
    if device == "meta":
        # Laid out as the Hugging Face cache (a link to a blob named by its SHA-256), so the
        # identity of a sparse multi-GB file is read from its name, not by hashing the hole.
        blob = folder / "blobs" / f"{abs(hash(name)):064x}"[-64:]
        blob.parent.mkdir(exist_ok=True)
        (write_sparse_safetensors if path.suffix == ".safetensors" else write_shared_torch)(blob, state)
        path.symlink_to(blob)
    elif path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_architecture_features_and_hub_file_on_meta(name, tmp_path):
    dim, size, _, params, _ = REFERENCE[name]
    path = write_hub_file(name, tmp_path)
    assert path.stat().st_blocks * 512 < 10 << 20  # the test never writes gigabytes
    model = _FOUNDATION[name].build(path, device="meta")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - params) / params < 0.05, f"{name}: {count:.1f}M parameters, the card says {params}M"
    features = model(torch.empty(2, 3, size, size, device="meta"))
    assert tuple(features.shape) == (2, dim)
    # The user's check finds the same file in a folder, and reports its identity.
    found, identity = check_weights(name, tmp_path)
    assert found == path and identity == f"sha256:{path.resolve().name}"


def test_a_file_that_does_not_fit_names_the_difference(tmp_path):
    state = hub_layout("uni", architecture_state("uni", "meta"))
    del state["blocks.0.ls1.gamma"]  # a UNI file loaded without LayerScale: TRIDENT's pitfall
    state["blocks.3.mlp.fc1.weight"] = torch.empty(10, 1024, device="meta")
    write_shared_torch(tmp_path / "pytorch_model.bin", state)
    with pytest.raises(ZoompipeError) as info:
        check_weights("uni", tmp_path / "pytorch_model.bin")
    message = str(info.value)
    assert "\n" not in message and "1 missing (e.g. 'blocks.0.ls1.gamma')" in message
    assert "'blocks.3.mlp.fc1.weight': file (10, 1024), model (4096, 1024)" in message


def test_weights_found_in_a_hugging_face_cache_folder(tmp_path):
    # $HF_HOME/hub/models--owkin--phikon/snapshots/<commit>/model.safetensors, blob by SHA-256.
    repo = tmp_path / "hub" / "models--bioptimus--H0-mini"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("c0ffee" * 6 + "abcd")
    snapshot.mkdir(parents=True)
    digest = "ab" * 32  # the cache names a blob by its SHA-256; zoompipe takes the name as it is
    write_sparse_safetensors(repo / "blobs" / digest, hub_layout("h0_mini", architecture_state("h0_mini", "meta")))
    (snapshot / "model.safetensors").symlink_to(repo / "blobs" / digest)
    for given in (tmp_path, tmp_path / "hub", repo, snapshot):
        path, identity = check_weights("h0_mini", given)
        assert path == snapshot / "model.safetensors" and identity == f"sha256:{digest}"


def test_offline_without_the_weights_cached_is_one_line():
    with pytest.raises(ZoompipeError) as info:
        create_encoder("uni")
    message = str(info.value)
    assert "\n" not in message and "MahmoodLab/UNI/pytorch_model.bin" in message
    assert "HF_HUB_OFFLINE" in message and "--weights" in message


class _Hub(__import__("http.server").server.BaseHTTPRequestHandler):
    """The hub's answers for a gated model: 401 without a token, 403 with one not granted."""

    def _refuse(self):
        code = 403 if self.headers.get("authorization") else 401
        self.send_response(code)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model MahmoodLab/UNI is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture()
def gated_hub(monkeypatch):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_port}")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.shutdown()


def point_hub_at(monkeypatch, endpoint: str) -> None:
    """What HF_ENDPOINT does when set before huggingface_hub is imported."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)


def _one_line(name: str) -> str:
    with pytest.raises(ZoompipeError) as info:
        create_encoder(name)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_gated_model_without_token_names_the_page_and_the_variable(gated_hub, monkeypatch):
    message = _one_line("uni")
    assert "(401, no token was sent)" in message and "HF_TOKEN" in message
    assert f"accept its terms at http://127.0.0.1:{gated_hub.server_port}/MahmoodLab/UNI" in message
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", "/nonexistent")
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    message = _one_line("uni")
    assert "account of HF_TOKEN has no access yet" in message and "MahmoodLab/UNI" in message


def test_unreachable_hub_fails_in_one_line_at_once(monkeypatch):
    import socket
    import time

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    message = _one_line("virchow2")
    assert time.perf_counter() - start < 5
    assert f"cannot reach http://127.0.0.1:{port}" in message and "--weights" in message


@pytest.mark.parametrize("name", ["ctranspath", "h0_mini"])
def test_preprocess_train_predict_with_local_weights_and_refuse_others(name, tmp_path):
    from zoompipe.engine import ZoomPredictor
    from zoompipe.errors import UsageError
    from zoompipe.preprocess import PreprocessConfig, preprocess_slides
    from zoompipe.synthetic import write_synthetic_slide
    from zoompipe.train import train_model

    torch.manual_seed(0)
    weights = write_hub_file(name, tmp_path, device="cpu")  # random weights, the hub's names and format
    slides = []
    for i, grade in enumerate((0, 2, 0, 2)):
        slides.append(tmp_path / f"s{i}.svs")
        write_synthetic_slide(slides[-1], 1280, 1024, mpp=0.5, seed=i, layout=dict(n_lesions=1, grade=grade))
    config = PreprocessConfig(magnifications=[2.5, 5.0], patch_size=64, encoder=name, weights=str(weights),
                              precision="fp32", runtime="torch")
    assert {r.status for r in preprocess_slides(slides, tmp_path / "pre", config, progress=False)} == {"ok"}
    (tmp_path / "labels.csv").write_text("slide_id,label\ns0,a\ns1,b\ns2,a\ns3,b\n")
    (tmp_path / "splits.csv").write_text("slide_id,split\ns0,train\ns1,train\ns2,val\ns3,val\n")
    train_model(tmp_path / "pre" / "features", tmp_path / "labels.csv", tmp_path / "run",
                splits_csv=tmp_path / "splits.csv", epochs=1, k=1, hidden=16, attn_hidden=8)
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["pipeline"]["encoder"]["weights"] == check_weights(name, weights)[1]
    prediction = ZoomPredictor(tmp_path / "run", runtime="torch", encoder_weights=str(weights)).predict(slides[0])
    assert len(prediction.probabilities) == 2
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(1)
    with pytest.raises(UsageError, match="the features were made with weights sha256:"):
        ZoomPredictor(tmp_path / "run", runtime="torch", encoder_weights=str(write_hub_file(name, other, "cpu")))
