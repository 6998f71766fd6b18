"""The frozen patch encoder: preprocessing, precision and device around a feature model."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZoompipeError
from .config import PRECISIONS, EncoderConfig
from .export import graph_path
from .quantize import quantized_graph
from .runtime import ExportError, OpenVinoForward, compile_openvino, known_faster, measure_faster, resolve_runtime

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_has(*probes: str) -> bool:
    # torch.cpu's feature probes are private API, hence the getattr guard.
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _cpu_has_fast_bf16() -> bool:
    # Without AVX512-BF16 or AMX, oneDNN emulates bf16 and autocast is slower than fp32.
    return _cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def _cpu_has_int8_dot_product() -> bool:
    # Without AVX512-VNNI or AMX, OpenVINO's int8 kernels stray from the quantised graph's own
    # arithmetic: on an AVX2 AMD EPYC the features' lowest cosine to fp32 on tissue was 0.93,
    # against 0.99 for the same graph with its low-precision kernels turned off.
    return _cpu_has("_is_vnni_supported", "_is_amx_tile_supported")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete precision for ``device`` and validate the rest.

    ``"auto"`` is fp16 on CUDA, bf16 on CPUs with native bf16 instructions (2.5x the fp32
    throughput of EfficientNet-Lite0 on an AVX512-BF16 Xeon) and fp32 elsewhere; never int8,
    which changes the features (:mod:`zoompipe.encoders.quantize`) and is only ever asked for.
    """
    if precision not in PRECISIONS:
        raise ZoompipeError(
            f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and _cpu_has_fast_bf16() else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise ZoompipeError(f"precision int8 runs on CPU (OpenVINO) only, not on {device}; use fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        raise ZoompipeError(f"precision fp16 needs a CUDA device, not {device}; use bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_fast_bf16():
        _warn_once("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated, slower than "
                   "fp32 on torch and 4x slower than fp32 on OpenVINO; --precision auto picks fp32 here")
    if precision == "int8" and not _cpu_has_int8_dot_product():
        _warn_once("this CPU has no int8 dot product (AVX512-VNNI or AMX): OpenVINO's int8 kernels here take "
                   "the features further from fp32 (lowest cosine on tissue 0.93, against 0.99 for the "
                   "quantised graph's own arithmetic); do not mix them with int8 features of another CPU")
    return precision


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that this machine has it."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ZoompipeError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ZoompipeError(f"device {device!r} requested but CUDA is not available here")
    return resolved


class Encoder:
    """A frozen feature model with the preprocessing and precision it runs under.

    Build one with :func:`zoompipe.encoders.create_encoder`.

    Parameters
    ----------
    model : torch.nn.Module or None
        Maps normalised ``(B, 3, input_size, input_size)`` float tensors to
        ``(B, feature_dim)`` features. None with ``graph``.
    config : EncoderConfig
        Name, feature size and preprocessing of ``model``.
    device : str or torch.device
        Where the model runs.
    precision : {"auto", "fp32", "bf16", "fp16", "int8"}
        Autocast dtype, or int8 on OpenVINO; see :func:`resolve_precision` for ``"auto"``.
    runtime : {"auto", "torch", "openvino"}
        What runs the model; see :func:`~zoompipe.encoders.runtime.resolve_runtime`. Under
        ``"auto"``, a model whose graph does not export or differs from torch runs on torch,
        with a warning.
    graph : Path, optional
        A cached fp32 graph of the model, checked when it was exported, to run on OpenVINO (or
        quantise, under int8) without the torch model.

    Attributes
    ----------
    precision, runtime : str
        What this machine runs, ``"auto"`` resolved.
    exported : bool
        Whether building this encoder exported its graph (False: none needed, or cached).
    graph : OpenVinoForward or None
        The OpenVINO forward pass, when that is the runtime.
    onnx : Path or None
        The checked fp32 ONNX graph behind it (under int8, the graph it was quantised from).
    row_multiple : int
        Batches run padded to a multiple of this many rows (the padding's features are
        dropped): 16 on CUDA, where cuDNN builds its plans once per batch shape and each new
        remainder batch cost up to seconds; 1 elsewhere.
    """

    def __init__(
        self,
        model: nn.Module | None,
        config: EncoderConfig,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        runtime: str = "auto",
        graph: Path | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.runtime = resolve_runtime(runtime, self.device, self.precision)
        # channels_last lets oneDNN/cuDNN pick NHWC kernels: 1.6x faster in fp32 on CPU.
        self.model = None if model is None else (
            model.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        )
        self.row_multiple = 16 if self.device.type == "cuda" else 1
        self.exported = False
        self.graph: OpenVinoForward | None = None
        self.onnx: Path | None = graph
        threads = torch.get_num_threads()
        if self.precision == "int8":
            # Quantised from the checked fp32 graph, which is kept to index the int8 one.
            self.onnx = graph or graph_path(self.model, config)
            if not self.onnx.exists():
                _, self.exported = compile_openvino(self.model, config, self.onnx)
            self.graph = OpenVinoForward(quantized_graph(self.onnx, config), threads)
        elif self.runtime == "openvino" and graph is not None:
            self.graph = OpenVinoForward(graph, threads)
        elif self.runtime == "openvino":
            path = graph_path(self.model, config)
            known = known_faster(path) if runtime == "auto" else None
            if known == "torch":
                self.runtime = "torch"  # measured slower here before: not compiled again
            else:
                try:
                    self.graph, self.exported = compile_openvino(self.model, config, path)
                    self.onnx = path
                except ExportError as err:
                    if runtime != "auto":
                        raise
                    _warn_once(f"{err}; it runs on torch")
                    self.runtime = "torch"
                if (self.graph is not None and runtime == "auto" and known is None
                        and measure_faster(self.model, self.graph, config) == "torch"):
                    self.graph, self.runtime, self.onnx = None, "torch", None
        # (x - mean) / std as x * scale + shift in 0-255 units: one fused pass, no /255.
        mean = torch.tensor(config.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(config.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._scale = 1.0 / std
        self._shift = -mean / std

    @property
    def name(self) -> str:
        """Stable encoder identifier for feature files."""
        return self.config.name

    @property
    def feature_dim(self) -> int:
        """Length of one feature vector."""
        return self.config.feature_dim

    @property
    def input_size(self) -> int:
        """Side in pixels the model sees."""
        return self.config.input_size

    def __repr__(self) -> str:
        return (
            f"Encoder(name={self.name!r}, feature_dim={self.feature_dim}, "
            f"input_size={self.input_size}, device={str(self.device)!r}, "
            f"precision={self.precision!r}, runtime={self.runtime!r})"
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and normalise RGB images for the model.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, 3, H, W)`` pixels in 0-255, uint8 or float, square.

        Returns
        -------
        torch.Tensor
            ``(B, 3, input_size, input_size)`` float32 on the encoder's device, resized to
            ``resize_to`` and centre-cropped where the config says; channels_last for torch,
            whose CPU and GPU kernels are fastest on it, plain NCHW for OpenVINO, which reads
            that memory (converting a channels_last batch cost it 0.6-1.1 ms a patch, 10-20% of
            EfficientNet-Lite0's forward pass).
        """
        side = self.config.resize_to or self.input_size
        size = (side, side)
        layout = torch.contiguous_format if self.graph is not None else torch.channels_last
        x = images
        if x.shape[-2:] != size and x.dtype == torch.uint8 and x.device.type == "cpu":
            # torch's uint8 antialiased kernel is 15x faster than the float one on CPU and
            # rounds to whole pixel values, as PIL does for CLAM's patches.
            x = self._resize(x.contiguous(memory_format=torch.channels_last), side)
        # Moved before converting: uint8 is a quarter of the bytes to send to a GPU.
        x = x.to(self.device, non_blocking=True)
        if x.shape[-2:] != size:
            x = self._resize(x.float(), side)
        if side != self.input_size:
            top = (side - self.input_size) // 2
            x = x[..., top:top + self.input_size, top:top + self.input_size]
        if layout is torch.contiguous_format:
            x = x.contiguous()  # reordered as uint8: a quarter of the bytes of the float result
        # addcmul promotes uint8 to float32 itself; .float() only narrows float64 input.
        x = torch.addcmul(self._shift, x, self._scale).float()
        return x.contiguous(memory_format=layout)

    def _resize(self, x: torch.Tensor, side: int) -> torch.Tensor:
        return F.interpolate(
            x, size=(side, side), mode=self.config.interpolation, align_corners=False, antialias=True
        )

    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch of ``(B, 3, H, W)`` 0-255 images, float32 on the device."""
        with torch.inference_mode():
            rows = len(images)
            if rows % self.row_multiple:
                images = torch.cat([images, images[-1:].expand(-rows % self.row_multiple, -1, -1, -1)])
            x = self.preprocess(images)
            if self.graph is not None:
                return self.graph(x)[:rows]
            dtype = _AUTOCAST_DTYPES.get(self.precision)
            # fp32 means fp32: cuDNN runs fp32 convolutions in TF32 by default (Ampere and later),
            # which moved EfficientNet-Lite0's features by up to 0.05 from the CPU's on an H200.
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None), torch.backends.cudnn.flags(
                    enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                    deterministic=torch.backends.cudnn.deterministic, allow_tf32=self.precision != "fp32"):
                features = self.model(x)
            return features[:rows].float()

    def embed(self, patches: np.ndarray) -> np.ndarray:
        """Features of a batch of RGB patches.

        Parameters
        ----------
        patches : numpy.ndarray
            ``(B, H, W, 3)`` uint8 RGB, square; resized to ``input_size`` when ``H`` differs.

        Returns
        -------
        numpy.ndarray
            ``(B, feature_dim)`` float32. The same input gives the same output.
        """
        if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(
                f"patches must be uint8 (B, H, W, 3) RGB, got {patches.dtype} {patches.shape}"
            )
        if patches.shape[1] != patches.shape[2]:
            raise ValueError(f"patches must be square, got {patches.shape[1:3]}")
        if len(patches) == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        # torch warns on read-only arrays (np.asarray of a PIL image is one): copy those.
        patches = np.require(patches, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        images = torch.from_numpy(patches).permute(0, 3, 1, 2)
        return self.embed_tensor(images).cpu().numpy()
