"""What a large pathology foundation model costs on this CPU: patches/s and peak memory.

The model is built exactly as zoompipe builds it (``create_encoder``), with random weights saved
by this script in the model's own key layout (real weights are gated and not needed for speed:
the same architecture does the same arithmetic whatever the values). Every runtime embeds the
same batch of 224 px inputs in fp32, in one process.

Usage: python benchmarks/large_encoder.py [--encoder uni] [--batch-size 8] [--batches 3]
       [--runtimes torch,openvino]

Prints, per runtime, patches/s (median over batches run in alternation, so that other load
falls on every runtime alike), seconds to build the encoder (for OpenVINO: export and compile,
paid once per weights file; a cached graph only compiles) and the process's peak RSS.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the zoompipe CLI does (cli/main.py)

import argparse  # noqa: E402
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from zoompipe.encoders import create_encoder
from zoompipe.encoders._foundation import _FOUNDATION


def random_weights(name: str, folder: Path) -> Path:
    """A safetensors file of random weights with the model's own key names and shapes."""
    model = _FOUNDATION[name]
    if model.convert is not None:
        raise SystemExit(f"{name} stores its weights in another layout; pick a model loaded as built (e.g. uni)")
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in model.architecture().state_dict().items()}
    path = folder / f"{name}.safetensors"
    save_file(state, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="uni", choices=sorted(_FOUNDATION))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--runtimes", default="torch,openvino")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_weights(args.encoder, Path(tmp))
        print(f"{args.encoder}: {_FOUNDATION[args.encoder].params} parameters, {os.cpu_count()} cores, "
              f"torch {torch.__version__} with {torch.get_num_threads()} threads, fp32, batch {args.batch_size}")
        encoders, built = [], {}
        for runtime in args.runtimes.split(","):
            t0 = time.perf_counter()
            encoders.append(create_encoder(args.encoder, weights=str(weights), precision="fp32", runtime=runtime))
            built[encoders[-1].runtime] = time.perf_counter() - t0
        side = encoders[0].config.resize_to or encoders[0].input_size
        batch = rng.integers(0, 256, (args.batch_size, side, side, 3), dtype=np.uint8)
        seconds = {e.runtime: [] for e in encoders}
        for e in encoders:
            e.embed(batch)  # warm-up
        # Alternating batches, so that other load on the machine falls on every runtime alike.
        for _ in range(args.batches):
            for e in encoders:
                t0 = time.perf_counter()
                e.embed(batch)
                seconds[e.runtime].append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for runtime, times in seconds.items():
            rate = args.batch_size / float(np.median(times))
            print(f"{runtime:9s} {rate:7.2f} patches/s (median of {len(times)} batches)   build {built[runtime]:6.1f} s")
        print(f"peak RSS of the process, all runtimes loaded: {peak:.2f} GiB")

if __name__ == "__main__":
    main()
