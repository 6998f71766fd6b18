"""The planted-regions training of ``tests/test_zoommil.py`` over many initialisations.

The test trains ZoomMIL once (model seed 0) on 200 synthetic slides whose class shows only at 10x,
under 2 marked base patches among 12 decoys as visible at low magnification, and asserts that the
zoom reaches the marked regions and classifies 100 test slides (accuracy and regions >= 0.95). One
seed passing says little about how often the training finds the regions; this script trains the
same thing with other model seeds, in parallel processes of one thread each, and counts the seeds
that meet the test's bars. ``--targets`` and ``--warmups`` compare what the zoom heads follow (untaught, the
model's own last level): its attention (the default) or its class evidence
(``ZoomMIL.follows_own_evidence``), and with or without a warm-up on the zoom target
alone (``train_model``'s default is half of the epochs; the test trains without one); ``--sigmas`` the
perturbed top-K's noise, constant (``0.1``, the test's until 2026-11-28) or decaying linearly over the
epochs as ``train_model`` decays it (``0.5:0.005``).

Usage::

    python benchmarks/planted_seeds.py --seeds 0-15 --targets attention,own-evidence --warmups 0,0.5 \
        --sigmas 0.1,0.5:0.005 --jobs 16 --out planted.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_zoommil as planted  # noqa: E402  (the test's cohort, training loop and measures)


def train_one(seed: int, target: str, warmup: float, sigma: str) -> dict:
    """Train the test's model with ``seed``, zoom target ``target``, ``warmup`` (a fraction of its 12 epochs
    that train the zoom target alone) and noise ``sigma`` (``"start"`` or ``"start:end"``); its test accuracy
    and regions reached."""
    start_sigma, _, end_sigma = sigma.partition(":")
    torch.set_num_threads(1)
    train = planted.make_slides(200, seed=10, **planted.PLANTED)
    regions: list = []
    test = planted.make_slides(100, seed=11, regions=regions, **planted.PLANTED)
    start = time.perf_counter()
    model = planted._train(planted.MAGS, train, epochs=12, k=0.1, seed=seed, warmup=int(warmup * 12),
                           own_evidence=target == "own-evidence", sigma=float(start_sigma),
                           sigma_end=float(end_sigma) if end_sigma else None).eval()
    accuracy, shares = planted._accuracy(model, test), planted.regions_reached(model, test, regions)
    return {"seed": seed, "target": target, "warmup": warmup, "sigma": sigma, "accuracy": accuracy, "regions_1.25x": shares[0],
            "regions_2.5x": shares[1], "passes_test_bars": accuracy >= 0.95 and min(shares) >= 0.95,
            "seconds": round(time.perf_counter() - start, 1)}


def seed_range(text: str) -> list[int]:
    """``"0-7"`` or ``"0,3,5"`` -> seeds."""
    if "-" in text:
        first, last = (int(t) for t in text.split("-"))
        return list(range(first, last + 1))
    return [int(t) for t in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_range, default=seed_range("0-7"))
    parser.add_argument("--targets", default="attention,own-evidence")
    parser.add_argument("--warmups", default="0", help="fractions of the 12 epochs trained on the zoom target alone")
    parser.add_argument("--sigmas", default="0.1",
                        help="noise of the perturbed top-K: a constant, or start:end decaying linearly over the epochs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    targets, warmups = args.targets.split(","), [float(w) for w in args.warmups.split(",")]
    settings = [(t, w, s) for s in args.sigmas.split(",") for w in warmups for t in targets]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(train_one, *zip(*[(seed, *setting) for setting in settings for seed in args.seeds])))
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    print("| zoom target | warm-up | noise | seeds meeting the test's bars | accuracy per seed | regions at 1.25x / 2.5x per seed |")
    print("|---|---|---|---|---|---|")
    for target, warmup, sigma in settings:
        mine = [r for r in runs if (r["target"], r["warmup"], r["sigma"]) == (target, warmup, sigma)]
        print(f"| {target} | {warmup:g} | {sigma} | {sum(r['passes_test_bars'] for r in mine)} of {len(mine)} | "
              + " ".join(f"{r['accuracy']:.2f}" for r in mine) + " | "
              + " ".join(f"{r['regions_1.25x']:.2f}/{r['regions_2.5x']:.2f}" for r in mine) + " |")
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                                        "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
