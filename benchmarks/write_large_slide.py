"""Write a 40x synthetic slide of 100,000 x 80,000 px and report time, file size and peak RSS.

Usage: python benchmarks/write_large_slide.py [OUT.svs] [--width 100000 --height 80000]
The writer renders tile by tile, so peak RSS stays far below the 24 GB the raw pixels would take.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from zoompipe.slide import open_slide
from zoompipe.synthetic import write_synthetic_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=None, help="output .svs (default: a temporary file, deleted)")
    parser.add_argument("--width", type=int, default=100_000)
    parser.add_argument("--height", type=int, default=80_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "large.svs")
        start = time.perf_counter()
        write_synthetic_slide(out, args.width, args.height, mpp=0.25, seed=args.seed)
        seconds = time.perf_counter() - start
        with open_slide(out) as slide:
            levels = slide.level_dimensions
            thumb = slide.thumbnail(8.0).shape
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"wrote {args.width} x {args.height} px in {seconds:.0f} s, {out.stat().st_size / 2**30:.2f} GiB, "
              f"levels {levels}, thumbnail at 8 mpp {thumb}; peak RSS {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
