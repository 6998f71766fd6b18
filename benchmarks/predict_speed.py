"""`zoompipe predict` on the standard slide, from the shell: wall time, patches, encoder rate, peak RSS.

The standard slide is 65536 x 49152 px at 0.5 mpp (32 x 24 mm at 20x, JPEG tiles as scanners
write them), written once into the cache folder. Each method is a separate `zoompipe predict`
process (imports, model and encoder loading included), run in alternating rounds:

- ZoomMIL 1.25x -> 2.5x -> 10x, K = 12;
- ABMIL at 10x over the children of the slide's 1.25x tissue patches (slow: tens of thousands
  of patches; leave it out with ``--methods zoommil``).

Both models are the demo model's architecture with seeded, untrained weights: speed does not
depend on what the weights learned, and the patches embedded depend only on K.

Usage: python benchmarks/predict_speed.py [--methods zoommil,abmil] [--rounds 2] [--runtime auto]

Prints, per method, the median wall seconds, patches embedded, encoder patches/s (seconds spent
reading and embedding, from the prediction's timings) and that rate as a share of the CPU's peak
fp32 FLOP rate (cores x clock x FLOPs per cycle from its vector width, assuming two FMA units per
core), and the largest peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from zoompipe.encoders import create_encoder
from zoompipe.encoders.export import cache_dir
from zoompipe.model import create_model, load_run, save_run
from zoompipe.predict import demo_run_dir
from zoompipe.slide import slide_source
from zoompipe.synthetic import write_synthetic_slide

WIDTH, HEIGHT, MPP = 65536, 49152, 0.5
ZOOMPIPE = str(Path(sys.executable).with_name("zoompipe"))


def standard_slide() -> Path:
    """The standard slide, written on first use into the cache folder."""
    path = cache_dir() / "benchmarks" / f"standard_{WIDTH}x{HEIGHT}.svs"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the standard slide to {path} (once) ...", flush=True)
        write_synthetic_slide(path, WIDTH, HEIGHT, mpp=MPP, seed=0)
    return path


def make_run(folder: Path, magnifications: list[float], k: int) -> Path:
    """A run folder with the demo model's pipeline (grid cascade 1.25x, 2.5x, 10x) and seeded weights.

    Both read under ``children="tissue"``: at 10x only patches with the base tissue rule, as a
    CLAM-style pipeline tiles. One magnification gives ABMIL there, over the 10x tissue patches
    under the base tissue patches; several give ZoomMIL.
    """
    demo_model, demo = load_run(demo_run_dir())
    grid = demo.pipeline.grid.model_copy(update={"children": "tissue"})
    torch.manual_seed(0)
    settings = dict(in_dim=demo_model.config.in_dim, n_classes=len(demo.class_names), magnifications=magnifications,
                    hidden=demo_model.config.hidden)
    if len(magnifications) > 1:
        architecture, model = "zoommil", create_model("zoommil", **settings, k=k, attn_hidden=demo_model.config.attn_hidden)
    else:
        architecture, model = "abmil", create_model("abmil", **settings)
    return save_run(folder, model.eval(), architecture, demo.class_names, demo.pipeline.model_copy(update={"grid": grid}))


def peak_flops() -> float:
    """fp32 FLOP/s of this CPU: cores x clock x vector lanes x 2 (FMA) x 2 FMA units."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M).group(1))
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    return len(os.sched_getaffinity(0)) * mhz * 1e6 * lanes * 2 * 2


def encoder_flops() -> float:
    """FLOPs of one patch through the default encoder."""
    encoder = create_encoder(runtime="torch", precision="fp32")
    size = encoder.input_size
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder.model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def run_predict(slide: str | Path, run: Path, out: Path, runtime: str,
                precision: str = "auto") -> tuple[float, float, dict]:
    """Wall seconds, peak RSS in GiB and the prediction JSON of one `zoompipe predict` process (file or URL)."""
    start = time.perf_counter()
    process = subprocess.Popen([ZOOMPIPE, "predict", str(slide), "--model", str(run), "--out", str(out),
                                "--runtime", runtime, "--precision", precision], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"zoompipe predict failed for {run.name}")
    return seconds, usage.ru_maxrss / 2**20, json.loads((out / f"{slide_source(slide).slide_id}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="zoommil,abmil")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--precision", default="auto", help="encoder precision of every method (int8: the opt-in)")
    args = parser.parse_args()
    slide = standard_slide()
    specs = {"zoommil": ("ZoomMIL 1.25x->2.5x->10x, K=12", [1.25, 2.5, 10.0]), "abmil": ("ABMIL 10x", [10.0])}
    methods = args.methods.split(",")
    flops, peak = encoder_flops(), peak_flops()
    results: dict[str, list] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {m: make_run(Path(tmp) / m, specs[m][1], k=12) for m in methods}
        for _ in range(args.rounds):
            for method in methods:
                results[method].append(run_predict(slide, runs[method], Path(tmp) / f"out_{method}", args.runtime,
                                                   args.precision))
    print(f"standard slide {WIDTH} x {HEIGHT} px at {MPP} mpp; {len(os.sched_getaffinity(0))} cores, "
          f"peak {peak / 1e9:.0f} GFLOP/s fp32 (estimated); encoder {flops / 1e9:.2f} GFLOPs/patch; "
          f"median of {args.rounds} alternating rounds")
    print(f"{'method':32s} {'wall s':>7s} {'patches':>8s} {'enc p/s':>8s} {'% peak':>7s} {'RSS GiB':>8s}  runtime")
    for method, rows in results.items():
        prediction = rows[-1][2]
        embed_s = sum(v for k, v in prediction["timings"].items() if k.startswith("embed_"))
        rate = prediction["patches_embedded"] / embed_s
        print(f"{specs[method][0]:32s} {statistics.median(r[0] for r in rows):7.2f} "
              f"{prediction['patches_embedded']:8d} {rate:8.1f} {rate * flops / peak:7.1%} "
              f"{max(r[1] for r in rows):8.2f}  {prediction['encoder'].get('runtime', '?')} "
              f"{prediction['encoder'].get('precision', '?')}")


if __name__ == "__main__":
    main()
