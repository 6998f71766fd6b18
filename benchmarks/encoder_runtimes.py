"""CPU runtimes for an encoder, side by side: torch, torch.compile, ONNX Runtime, OpenVINO (fp32, int8).

Every runtime embeds the same batches of real tissue patches (a synthetic slide read at 1 mpp,
resized and normalised by the encoder) in fp32, in one process, in alternating rounds so that
other load on the machine falls on all of them alike. torch bf16 autocast is shown too: fast
where the CPU has native bf16, emulated and slow elsewhere.

Usage: python benchmarks/encoder_runtimes.py [--encoder efficientnet_lite0] [--batch-size 32]
       [--batches 4] [--rounds 3] [--threads N]     (needs: pip install onnxruntime)

Prints, per runtime, patches/s (median of the rounds), the speed-up over torch fp32, the
largest feature difference from torch fp32 (exact: at most 1e-4) and the lowest cosine
similarity of a patch's features to torch fp32's. OpenVINO int8 (``--precision int8``, needs
nncf) is shown beside the exact runtimes: faster, and not exact.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the zoompipe CLI does (cli/main.py)

import argparse  # noqa: E402
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from zoompipe.encoders import DEFAULT_ENCODER, EncoderConfig, create_encoder
from zoompipe.encoders.export import export_onnx
from zoompipe.encoders.quantize import quantized_graph
from zoompipe.encoders.runtime import TOLERANCE, OpenVinoForward
from zoompipe.patches import read_patches
from zoompipe.slide import open_slide
from zoompipe.synthetic import write_synthetic_slide

Forward = Callable[[torch.Tensor], torch.Tensor]


def tissue_batch(count: int) -> np.ndarray:
    """``count`` 256 px patches at 1 mpp from a synthetic slide with lesions, uint8 RGB."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.svs"
        write_synthetic_slide(path, 8192, 8192, mpp=0.5, seed=7, layout=dict(n_lesions=3, grade=2))
        with open_slide(path) as slide:
            side = int(np.ceil(np.sqrt(count)))
            grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:count]
            return read_patches(slide, grid * (8192 // side), 1.0, 256)


def candidates(model: torch.nn.Module, graph: Path, config: EncoderConfig, threads: int) -> dict[str, Forward]:
    """Forward passes to compare, each taking a normalised channels_last float32 batch."""
    import onnxruntime

    def torch_fp32(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def torch_bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def onnx_runtime(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"pixels": np.ascontiguousarray(x.numpy())})[0])

    return {
        "torch fp32 (channels_last)": torch_fp32,
        "torch.compile fp32": torch.compile(model),
        "ONNX Runtime fp32": onnx_runtime,
        "OpenVINO fp32": OpenVinoForward(graph, threads),
        "OpenVINO int8 (opt-in)": OpenVinoForward(quantized_graph(graph, config), threads),
        "torch bf16 autocast": torch_bf16,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="batches per round and runtime")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    encoder = create_encoder(args.encoder, precision="fp32", runtime="torch")
    patches = tissue_batch(args.batch_size * args.batches)
    batches = [encoder.preprocess(torch.from_numpy(patches[i:i + args.batch_size]).permute(0, 3, 1, 2))
               for i in range(0, len(patches), args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "encoder.onnx"
        export_onnx(encoder.model, encoder.config, graph)
        runs = candidates(encoder.model, graph, encoder.config, args.threads)
        with torch.inference_mode():
            reference = torch.cat([encoder.model(x) for x in batches])
            errors, cosines, seconds = {}, {}, {name: [] for name in runs}
            for name, forward in runs.items():
                try:
                    features = torch.cat([forward(x) for x in batches])  # also the warm-up / compile
                    errors[name] = (features - reference).abs().max().item()
                    cosines[name] = torch.nn.functional.cosine_similarity(features, reference).min().item()
                except Exception as err:  # torch.compile needs a C++ compiler, for one
                    warnings.warn(f"{name} failed: {str(err).splitlines()[0] if str(err) else err!r}")
            for _ in range(args.rounds):
                for name in errors:
                    start = time.perf_counter()
                    for x in batches:
                        runs[name](x)
                    seconds[name].append(time.perf_counter() - start)

    print(f"encoder {encoder.name}, {len(patches)} patches of 256 px -> {encoder.input_size} px, batch "
          f"{args.batch_size}, {args.threads} threads, median of {args.rounds} alternating rounds")
    print(f"{'runtime':28s} {'patches/s':>10s} {'vs torch':>9s} {'max |diff|':>11s} {'min cos':>8s}  "
          f"exact (<= {TOLERANCE:g})")
    base = len(patches) / statistics.median(seconds["torch fp32 (channels_last)"])
    for name, error in errors.items():
        rate = len(patches) / statistics.median(seconds[name])
        print(f"{name:28s} {rate:10.1f} {rate / base:8.2f}x {error:11.2e} {cosines[name]:8.4f}  "
              f"{'yes' if error <= TOLERANCE else 'no'}")
    print(f"(largest feature magnitude {reference.abs().max().item():.2f})")


if __name__ == "__main__":
    main()
