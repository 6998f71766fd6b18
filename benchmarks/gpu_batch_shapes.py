"""Encoder batches of changing size on a GPU: every batch shape as it comes, and padded to 16 rows.

cuDNN builds its execution plans once per input shape. Tiling gives batches of the full size
and then a remainder whose size changes from slide to slide (and, in sparse training, from step
to step), so without padding nearly every slide pays for new plans. ``Encoder.row_multiple``
(16 on CUDA) pads each batch to a multiple of 16 rows. This script embeds the same sequence of
batch sizes both ways, each in a fresh process (plans are cached per process), and prints the
seconds per batch and their sum after the first batch.

Usage::

    python benchmarks/gpu_batch_shapes.py --device cuda --precision fp16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = [32, 15, 32, 8, 19, 32, 27, 3, 32, 11, 32, 21, 5, 32]


def time_batches(device: str, precision: str, row_multiple: int | None) -> list[float]:
    """Seconds of each batch of :data:`SIZES`, synchronised; ``row_multiple`` None keeps the encoder's."""
    import numpy as np
    import torch

    from zoompipe.encoders import create_encoder

    encoder = create_encoder("efficientnet_lite0", device=device, precision=precision)
    if row_multiple is not None:
        encoder.row_multiple = row_multiple
    rng = np.random.default_rng(0)
    seconds = []
    for n in SIZES:
        patches = rng.integers(0, 255, (n, 256, 256, 3), dtype=np.uint8)
        torch.cuda.synchronize()
        start = time.perf_counter()
        encoder.embed(patches)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--row-multiple", type=int, default=None, help=argparse.SUPPRESS)  # one child's setting
    args = parser.parse_args()
    if args.row_multiple is not None:
        print(json.dumps(time_batches(args.device, args.precision, args.row_multiple)))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_batch_shapes.py: needs a CUDA device")
    rows = {}
    for name, multiple in (("every shape as it comes", 1), ("padded to 16 rows", 16)):
        child = subprocess.run([sys.executable, __file__, "--device", args.device, "--precision", args.precision,
                                "--row-multiple", str(multiple)], capture_output=True, text=True, check=True)
        rows[name] = json.loads(child.stdout.splitlines()[-1])
    print(f"{torch.cuda.get_device_name(args.device)}, {args.precision}, batch sizes {SIZES}")
    for name, seconds in rows.items():
        print(f"{name:24s} {sum(seconds[1:]):6.2f} s after the first batch: "
              + " ".join(f"{n}:{s:.3f}" for n, s in zip(SIZES, seconds)))


if __name__ == "__main__":
    main()
