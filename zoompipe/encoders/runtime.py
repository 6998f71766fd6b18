"""Which engine runs an encoder's forward pass: torch, or OpenVINO on CPU.

On CPU in fp32, OpenVINO runs EfficientNet-Lite0's ONNX graph 2.7-5.8x faster than torch with
features equal to 3e-5 (``benchmarks/encoder_runtimes.py`` compares it with ONNX Runtime and
``torch.compile``, both exact too but slower), but a ViT-L runs slower on it than on torch.
``auto`` picks it for an encoder whose graph exports, passes the exactness check and was measured
faster than torch on this machine (:func:`measure_faster`, once per graph and machine), and
torch everywhere else: on GPUs, under bf16 or fp16, when OpenVINO is not installed. The choice is
made at run time and never stored with features or models. ``--precision int8``, an opt-in,
always runs on OpenVINO, from a graph quantised from the checked fp32 one
(:mod:`zoompipe.encoders.quantize`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import write_bytes, write_text
from ..errors import ZoompipeError
from .config import EncoderConfig
from .export import cached_graph

if TYPE_CHECKING:
    import torch
    from torch import nn

RUNTIMES = ("auto", "torch", "openvino")

#: Largest feature difference from torch fp32 that a graph may have to be used.
TOLERANCE = 1e-4

# OpenVINO keeps the activations of the largest batch it has run: 220 MB for 32 lite0 patches,
# 80 MB for 16, which run 4% slower (measured side by side); predict stays under 1.5 GiB.
# Chunks of one batch run on several streams at once (OpenVinoForward).
CHUNK = 16


class ExportError(ZoompipeError):
    """An encoder's graph could not be exported, or its features differ from torch's."""


def resolve_runtime(runtime: str, device: torch.device, precision: str) -> str:
    """Turn ``"auto"`` into ``"openvino"`` or ``"torch"`` and check an explicit choice.

    Parameters
    ----------
    runtime : {"auto", "torch", "openvino"}
    device : torch.device
    precision : str
        Resolved precision (``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``, which needs OpenVINO).
    """
    if runtime not in RUNTIMES:
        raise ZoompipeError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    usable = device.type == "cpu" and precision in ("fp32", "int8")
    installed = importlib.util.find_spec("openvino") is not None
    if precision == "int8" and runtime == "torch":
        raise ZoompipeError("precision int8 runs on OpenVINO only; use --runtime auto or openvino")
    if runtime == "torch":
        return runtime
    if runtime == "auto" and precision != "int8":
        return "openvino" if usable and installed else "torch"
    if not usable:
        raise ZoompipeError(
            f"runtime openvino runs fp32 or int8 on CPU only, not {precision} on {device}; "
            "use --runtime torch"
        )
    if not installed:
        raise ZoompipeError("runtime openvino needs the package openvino: pip install openvino")
    return "openvino"


class OpenVinoForward:
    """An ONNX graph compiled by OpenVINO for this CPU, called like the torch model.

    Parameters
    ----------
    graph : Path
        ONNX file of :func:`zoompipe.encoders.export.export_onnx`, or the OpenVINO IR of
        :func:`zoompipe.encoders.quantize.quantized_graph`.
    threads : int
        Inference threads; torch's count, so ``torch.set_num_threads`` and
        ``OMP_NUM_THREADS`` hold for both runtimes. They run as as many one-thread streams,
        each on its own chunks of a batch: one multi-threaded inference waits at every layer
        for its slowest thread, and the patch readers preempt them all the time (on 2 cores,
        lite0 ran at 96 patches/s beside one reader thread with 2 threads in one stream,
        132 patches/s with 2 streams; 162-166 patches/s either way alone).
    keep : bool
        Keep the compiled model beside the graph for the next process (False for a graph that
        is still being checked under a temporary name).
    """

    def __init__(self, graph: Path, threads: int, keep: bool = True) -> None:
        import openvino

        self.graph = graph
        # f32 inference: OpenVINO would otherwise pick bf16 on CPUs that have it.
        settings = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": threads}
        core = openvino.Core()
        # Compiling takes 0.3 s for EfficientNet-Lite0, importing the compiled model 0.06 s: a
        # cold `predict` waits for it. The compiled model is specific to this CPU and thread
        # count (machine_key), OpenVINO version and settings, and is written atomically beside
        # the graph.
        version = hashlib.sha256(f"{openvino.__version__}|{sorted(settings.items())}".encode()).hexdigest()[:8]
        blob = graph.with_name(f"{graph.name}.{version}.{machine_key()}.blob")
        try:
            self._compiled = core.import_model(blob.read_bytes(), "CPU", settings)
        except (OSError, RuntimeError):  # not compiled here yet, or unreadable: compile again
            self._compiled = core.compile_model(str(graph), "CPU", settings)
            if keep:
                try:
                    write_bytes(blob, self._compiled.export_model().getvalue())
                except OSError:
                    pass  # a read-only cache only costs the next run a compilation
        self._streams = threads
        self._queue = openvino.AsyncInferQueue(self._compiled, threads)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        # OpenVINO reads plain NCHW memory; the channels_last input would be misread.
        x = np.ascontiguousarray(pixels.numpy())
        # Every stream gets a share of a small batch too.
        chunk = min(CHUNK, -(-len(x) // self._streams))
        starts = range(0, len(x), chunk)
        parts: list[np.ndarray] = [np.empty(0)] * len(starts)

        def done(request: Any, index: int) -> None:
            parts[index] = request.get_output_tensor(0).data.copy()

        self._queue.set_callback(done)
        for index, start in enumerate(starts):
            self._queue.start_async(x[start:start + chunk], index)
        self._queue.wait_all()
        return torch.from_numpy(np.concatenate(parts))


def compile_openvino(model: nn.Module, config: EncoderConfig,
                     path: Path | None = None) -> tuple[OpenVinoForward, bool]:
    """OpenVINO forward pass of ``model``, from the cached graph or a fresh, checked export.

    ``path`` is the graph's cache path when the caller has it (see :func:`cached_graph`).

    Returns
    -------
    forward : OpenVinoForward
    exported : bool
        Whether the graph was exported by this call rather than read from the cache.

    Raises
    ------
    ExportError
        The model does not export, or its graph gives features further than
        :data:`TOLERANCE` from torch fp32 on a probe batch.
    """
    import torch

    threads = torch.get_num_threads()
    checked: dict[str, OpenVinoForward] = {}

    def check(path: Path) -> None:
        forward = OpenVinoForward(path, threads, keep=False)
        probe = torch.randn(2, 3, config.input_size, config.input_size,
                            generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = model(probe).float()
        error = (forward(probe) - expected).abs().max().item()
        if not error <= TOLERANCE:
            raise ExportError(f"encoder {config.name}: OpenVINO features differ from torch by {error:.2g}")
        checked["forward"] = forward

    try:
        path, exported = cached_graph(model, config, check, path)
    except ExportError:
        raise
    except Exception as err:  # the exporter raises anything from RuntimeError to onnx errors
        reason = str(err).split("\n", 1)[0] or type(err).__name__
        raise ExportError(f"encoder {config.name} does not export to ONNX: {reason}") from err
    forward = checked.get("forward")
    if forward is None:
        return OpenVinoForward(path, threads), exported
    forward.graph = path  # it was compiled from the file before the file's rename
    return forward, exported


def machine_key() -> str:
    """This CPU model, its vector instructions and the thread count: what a runtime's speed depends on."""
    import platform

    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    text = f"{model}|{torch.backends.cpu.get_cpu_capability()}|{torch.get_num_threads()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record(graph: Path) -> Path:
    """Where the runtime measured faster for ``graph`` on this machine is kept."""
    return graph.with_name(f"{graph.stem}.{machine_key()}.runtime")


def known_faster(graph: Path) -> str | None:
    """The runtime measured faster for ``graph`` on this machine, or None if not measured yet."""
    try:
        choice = _record(graph).read_text().strip()
    except OSError:
        return None
    return choice if choice in ("torch", "openvino") else None


def measure_faster(model: nn.Module, graph: OpenVinoForward, config: EncoderConfig, rounds: int = 3) -> str:
    """Time torch and OpenVINO on one batch, in alternation, and remember the faster for this machine.

    OpenVINO is 3x faster than torch for EfficientNet-Lite0 here but slower for a ViT-L
    (``benchmarks/large_encoder.py``), and the ratio depends on the CPU: measured once per graph
    and machine (:func:`machine_key`), kept beside the graph in the cache.
    """
    import time

    import torch

    # Four patches: enough to time a small CNN, and under a minute in all for a ViT-L.
    x = torch.randn(4, 3, config.input_size, config.input_size,
                    generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    runs = {"torch": model, "openvino": graph}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for forward in runs.values():
            forward(x)  # warm-up: first calls allocate
        for _ in range(rounds):
            for name, forward in runs.items():
                start = time.perf_counter()
                forward(x)
                seconds[name].append(time.perf_counter() - start)
    choice = min(seconds, key=lambda name: float(np.median(seconds[name])))
    try:
        write_text(_record(graph.graph), choice + "\n")
    except OSError:
        pass  # a read-only cache only costs the next run another measurement
    return choice
