"""Remote slides over HTTP (a real aiohttp server on 127.0.0.1, see http_server.py) and S3 (moto's server)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from http_server import SlideServer
from zoompipe.cli.main import cli
from zoompipe.engine import ZoomPredictor
from zoompipe.features import read_feature_file
from zoompipe.model import create_model, load_run, save_run
from zoompipe.predict import demo_run_dir, predict_slides, read_prediction, redraw_heatmaps
from zoompipe.preprocess import PreprocessConfig, preprocess_slides
from zoompipe.slide import open_slide, slide_source
from zoompipe.slide.remote import RemoteFile, RemoteSettings
from zoompipe.synthetic import write_synthetic_slide

TOKEN = "tok-7f3a9c1e55"
CASCADE = [2.5, 5.0, 10.0]
QUICK = RemoteSettings(timeout=0.5, retries=1, backoff=0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A JPEG slide with lesions, a text file named .svs, and a server that wants a token."""
    root = tmp_path_factory.mktemp("remote")
    write_synthetic_slide(root / "lesion.svs", 6000, 5000, mpp=0.5, seed=21, layout=dict(n_lesions=2, grade=2))
    (root / "notes.svs").write_text("not a slide\n" * 100)
    (root / "cut.svs").write_bytes((root / "lesion.svs").read_bytes())  # served by the dropping route
    with SlideServer(root, root / "access.log", token=TOKEN, stall=3.0) as server:
        yield root, server


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A ZoomMIL run with seeded weights and the demo's tissue and encoder settings on a small cascade."""
    _, demo = load_run(demo_run_dir())
    pipeline = demo.pipeline.model_copy(update={
        "grid": demo.pipeline.grid.model_copy(update={"magnifications": tuple(CASCADE), "patch_size": 64})})
    torch.manual_seed(0)
    model = create_model("zoommil", in_dim=1280, n_classes=3, magnifications=CASCADE, hidden=64, k=3, attn_hidden=32)
    return save_run(tmp_path_factory.mktemp("run") / "run", model.eval(), "zoommil", ["a", "b", "c"], pipeline)


def _refused_url() -> str:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/files/gone.svs?token={TOKEN}"


def test_url_identity_and_credentials():
    source = slide_source(f"https://ann:pa55word@host.example/a/b/case%2001.svs?X-Amz-Signature={TOKEN}#f")
    assert (source.remote, source.slide_id, source.name) == (True, "case 01", "https://host.example/a/b/case%2001.svs")
    assert TOKEN not in repr(source) and "pa55word" not in str(source)
    assert source.scrub(f"failed: {source.location} (signature {TOKEN})") == f"failed: {source.name} (signature ***)"
    assert slide_source("s3://bucket/dir/x.tiff").slide_id == "x"
    assert not slide_source("C://slides/x.svs").remote and not slide_source("/data/x.svs").remote


def test_range_cache_merges_neighbours_and_matches_the_file(served):
    root, server = served
    data = (root / "lesion.svs").read_bytes()
    remote = RemoteFile.open(slide_source(server.url("lesion.svs")), QUICK)
    before = len(server.log())
    remote.prefetch([(1000, 2000), (2000, 3000), (3500, 4000), (200_000, 200_100)])  # two spans
    assert len(server.log()) - before == 2
    rng = np.random.default_rng(0)
    for offset in rng.integers(0, len(data) - 5000, 20):
        assert remote.read_at(int(offset), 5000) == data[offset:offset + 5000]
    assert remote.read_at(1000, 3000) == data[1000:4000] and remote.read_at(len(data) - 10, 100) == data[-10:]
    stats = remote.stats()
    log = server.log()
    assert stats.requests == len(log) and stats.bytes_fetched == sum(r["body_bytes"] for r in log)


def test_predict_url_equals_local_and_the_server_log_counts_the_bytes(served, run_dir, tmp_path):
    root, server = served
    predictor = ZoomPredictor(run_dir, runtime="torch", precision="fp32")
    [local] = predict_slides([root / "lesion.svs"], predictor, tmp_path / "local")
    start = len(server.log())
    [remote] = predict_slides([server.url("lesion.svs")], predictor, tmp_path / "remote")
    log = server.log()[start:]
    a, b = local.prediction, remote.prediction
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    for x, y in zip(a.magnifications, b.magnifications):
        np.testing.assert_array_equal(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.attention, y.attention)
    # The server's own log, not only the client, says what crossed the network.
    saved = json.loads((tmp_path / "remote" / "lesion.json").read_text())["transfer"]
    assert saved["requests"] == len(log) and all(r["status"] in (200, 206) for r in log)
    assert saved["bytes_fetched"] == sum(r["body_bytes"] for r in log) < saved["file_size"]
    assert saved["file_size"] == (root / "lesion.svs").stat().st_size and saved["retries"] == 0
    assert json.loads((tmp_path / "local" / "lesion.json").read_text())["transfer"] is None
    # The reader threads share the slide's one connection: its size was asked for once (HEAD), not per thread.
    assert [r["method"] for r in log].count("HEAD") == 1
    heatmaps = redraw_heatmaps(tmp_path / "remote" / "lesion.json", server.url("lesion.svs"), tmp_path / "heat")
    assert heatmaps and all(p.stat().st_size > 0 for p in heatmaps)
    written = "".join(p.read_text() for p in (tmp_path / "remote").rglob("*") if p.suffix in (".json", ".csv"))
    assert TOKEN not in written and "lesion.svs" in written


def test_preprocess_takes_urls_from_a_csv_list(served, tmp_path):
    root, server = served
    listing = tmp_path / "slides.csv"
    listing.write_text(f"slide_path\n{server.url('lesion.svs')}\n{server.url('missing.svs')}\n")
    config = PreprocessConfig(magnifications=[2.5], patch_size=64, runtime="torch", precision="fp32")
    rows = preprocess_slides([listing], tmp_path / "pre", config, progress=False)
    assert [(r.slide_id, r.status) for r in rows] == [("lesion", "ok"), ("missing", "failed")]
    assert rows[1].error == f"{server.url('missing.svs').split('?')[0]}: not found (HTTP 404)"
    saved = read_feature_file(tmp_path / "pre" / "features" / "lesion.h5")
    assert saved.attrs["slide_path"] == server.url("lesion.svs").split("?")[0]
    assert TOKEN not in (tmp_path / "pre" / "status.csv").read_text()


def test_transient_faults_are_retried(served):
    root, server = served
    with open_slide(server.url("lesion.svs", "flaky"), remote=RemoteSettings(retries=2, backoff=0.01)) as slide, \
            open_slide(root / "lesion.svs") as local:
        np.testing.assert_array_equal(slide.read_region(1000, 1000, 300, 200, 1.0),
                                      local.read_region(1000, 1000, 300, 200, 1.0))
        stats = slide.transfer_stats()
    assert stats.retries > 0 and stats.requests == stats.retries * 2 + 1  # each range dropped once, then served


def test_network_faults_give_one_line_each_and_the_batch_goes_on(served, run_dir, tmp_path, monkeypatch):
    root, server = served
    monkeypatch.setenv("ZOOMPIPE_REMOTE_TIMEOUT", "0.5")
    monkeypatch.setenv("ZOOMPIPE_REMOTE_RETRIES", "1")
    bad = {
        "missing": (server.url("missing.svs"), "not found (HTTP 404)"),
        "refused": (_refused_url(), "connection refused (2 attempts)"),
        "dropped": (server.url("cut.svs", "drop"), "connection dropped mid-read (2 attempts)"),
        "notes": (server.url("notes.svs"), "not a whole-slide image"),
        "denied": (server.url("lesion.svs").replace(TOKEN, "wrong-token-123"), "HTTP 403"),
        "whole": (server.url("lesion.svs", "norange"), "the server ignores HTTP Range requests"),
    }
    opened = CliRunner().invoke(cli, ["info", server.url("lesion.svs")])
    assert opened.exit_code == 0 and "MiB fetched in" in opened.output and TOKEN not in opened.output
    for url, expected in bad.values():
        result = CliRunner().invoke(cli, ["info", url])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("error: ") and expected in result.output
        assert TOKEN not in result.output and "Traceback" not in result.output
    slow = CliRunner().invoke(cli, ["info", server.url("lesion.svs", "slow")])
    assert slow.exit_code == 1 and "timed out after 0.5 s (2 attempts)" in slow.output
    good = server.url("lesion.svs")
    out = tmp_path / "pred"
    result = CliRunner().invoke(cli, ["predict", bad["missing"][0], good, bad["dropped"][0], bad["notes"][0],
                                      "--model", str(run_dir), "--out", str(out), "--runtime", "torch", "--profile"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and "Traceback" not in result.output and TOKEN not in result.output
    assert "lesion: " in result.output and "remote slide: fetched" in result.output
    assert read_prediction(out / "lesion.json").transfer.requests > 0
    table = (out / "predictions.csv").read_text()
    assert table.count("failed") == 3 and TOKEN not in table


def test_openslide_is_refused_for_urls(served):
    _, server = served
    result = CliRunner().invoke(cli, ["info", "--backend", "openslide", server.url("lesion.svs")])
    assert result.exit_code == 1 and "OpenSlide reads local files only" in result.output and TOKEN not in result.output


def test_s3_slide_through_a_real_s3_server(served, monkeypatch):
    """moto's server speaks the S3 protocol on 127.0.0.1; s3fs finds it through AWS_ENDPOINT_URL_S3."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    root, _ = served
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{host}:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "zoompipe-test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-key-not-to-print")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="archive")
        s3.upload_file(str(root / "lesion.svs"), "archive", "cohort/lesion.svs")
        with open_slide("s3://archive/cohort/lesion.svs") as slide, open_slide(root / "lesion.svs") as local:
            assert (slide.slide_id, slide.backend, slide.mpp) == ("lesion", "tiffslide", local.mpp)
            np.testing.assert_array_equal(slide.thumbnail(8.0), local.thumbnail(8.0))
            np.testing.assert_array_equal(slide.read_region(2000, 1500, 256, 256, 0.5),
                                          local.read_region(2000, 1500, 256, 256, 0.5))
            assert slide.transfer_stats().bytes_fetched < slide.transfer_stats().file_size
        missing = CliRunner().invoke(cli, ["info", "s3://archive/cohort/other.svs"])
        assert missing.exit_code == 1 and "s3://archive/cohort/other.svs: not found" in missing.output
        assert "secret-key" not in missing.output
    finally:
        server.stop()
