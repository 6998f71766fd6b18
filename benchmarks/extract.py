"""Feature extraction throughput: the encoder alone vs the whole read + embed path.

Both runs embed the same patches of one synthetic slide, side by side in one process:

1. encoder alone: patches already decoded in memory, batches straight into the encoder;
2. whole path: ``embed_patches`` reading the patches from the slide with reader threads.

Usage: python benchmarks/extract.py [--patches 512] [--mpp 1.0] [--precision auto] [--runtime auto]
       [--workers 2]
Prints patches/s of both and their ratio (target: the whole path at >= 85% of the encoder alone).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the zoompipe CLI does (cli/main.py)

import argparse  # noqa: E402
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zoompipe.embed import embed_patches
from zoompipe.encoders import DEFAULT_ENCODER, create_encoder
from zoompipe.patches import read_patches
from zoompipe.slide import open_slide
from zoompipe.synthetic import write_synthetic_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--mpp", type=float, default=1.0, help="patch resolution (1.0 = 10x)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    encoder = create_encoder(args.encoder, precision=args.precision, runtime=args.runtime)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.svs"
        write_synthetic_slide(path, 24576, 24576, mpp=0.25, seed=7)
        with open_slide(path) as slide:
            step = int(256 * args.mpp / slide.mpp)
            side = int(np.ceil(np.sqrt(args.patches)))
            origin = slide.dimensions[0] // 2 - side * step // 2
            grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[: args.patches]
            coords = origin + grid * step
            patches = read_patches(slide, coords, args.mpp, 256)
            encoder.embed(patches[: args.batch_size])  # warm-up: oneDNN picks its kernels

            start = time.perf_counter()
            alone = np.concatenate([encoder.embed(patches[i:i + args.batch_size])
                                    for i in range(0, len(patches), args.batch_size)])
            t_alone = time.perf_counter() - start

            start = time.perf_counter()
            full = embed_patches(slide, coords, args.mpp, 256, encoder, batch_size=args.batch_size,
                                 workers=args.workers)
            t_full = time.perf_counter() - start
    assert np.allclose(alone, full, atol=1e-4), "the two paths must embed the same pixels"
    rate_alone, rate_full = len(coords) / t_alone, len(coords) / t_full
    print(f"encoder {encoder.name} ({encoder.precision}, {encoder.runtime}), {len(coords)} patches of 256 px at {args.mpp:g} mpp, "
          f"batch {args.batch_size}, {args.workers} reader threads, torch threads {torch.get_num_threads()}")
    print(f"encoder alone : {rate_alone:7.1f} patches/s")
    print(f"whole path    : {rate_full:7.1f} patches/s")
    print(f"ratio         : {rate_full / rate_alone:7.1%}")


if __name__ == "__main__":
    main()
