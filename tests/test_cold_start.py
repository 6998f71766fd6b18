"""Cold start: commands that need no model never import torch or timm."""

import json
import subprocess
import sys

import pytest

from zoompipe.synthetic import write_synthetic_slide

HEAVY = ("torch", "timm", "openvino")

# Runs a command in a fresh interpreter and prints which heavy packages it imported.
PROBE = """
import json, sys
from zoompipe.cli.main import cli
try:
    cli(sys.argv[1:], prog_name="zoompipe")
except SystemExit as end:
    code = end.code
print(json.dumps({"code": code, "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(%r))}))
""" % (HEAVY,)


def run_probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [["--help"], ["predict", "--help"], ["preprocess", "--help"]])
def test_help_imports_no_torch(command):
    assert run_probe(*command) == {"code": 0, "loaded": []}


def test_info_imports_no_torch(tmp_path):
    slide = tmp_path / "small.svs"
    write_synthetic_slide(slide, 1024, 768, mpp=0.5)
    assert run_probe("info", str(slide)) == {"code": 0, "loaded": []}


def test_predict_refuses_a_missing_run_before_torch_and_loads_torch_to_predict(tmp_path):
    # The run's config.json is read first, without torch; the model loads beside the tissue.
    result = run_probe("predict", "missing.svs", "--model", "no_such_run")
    assert result == {"code": 1, "loaded": []}
    slide = tmp_path / "small.svs"
    write_synthetic_slide(slide, 4096, 3072, mpp=0.5)
    # The probe sees imports: a command that needs torch shows it.
    result = run_probe("predict", str(slide), "--out", str(tmp_path / "out"), "--precision", "fp32")
    assert result["code"] == 0 and "torch" in result["loaded"]


def test_the_entry_point_ends_without_teardown_but_with_its_output_and_status(tmp_path):
    # main() ends the process with os._exit: what the command printed must still arrive whole.
    slide = tmp_path / "small.svs"
    write_synthetic_slide(slide, 1024, 768, mpp=0.5)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zoompipe.cli.main", *args], capture_output=True, text=True,
                              timeout=120)

    done = run("info", "--json", str(slide))
    assert done.returncode == 0 and json.loads(done.stdout)["dimensions"] == [1024, 768]
    done = run("info", str(tmp_path / "missing.svs"))
    assert done.returncode == 1 and done.stderr.strip().startswith("error: ") and "no such file" in done.stderr
    assert run("info", "--no-such-option").returncode == 2
