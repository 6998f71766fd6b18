"""A test encoder that crashes its process (a real SIGSEGV) on a poison slide.

Cluster workers are separate processes: :class:`RegisterCrashEncoder`, a Dask worker plugin,
registers the encoder in every worker, including those the nanny starts after a crash. The
encoder is the mean colour of each patch, except that a patch of pure magenta makes it read
address 0, as a C slide library does on a malformed file.
"""

from __future__ import annotations

import ctypes

import torch
from distributed.diagnostics.plugin import WorkerPlugin
from torch import nn

from zoompipe.encoders import register_encoder
from zoompipe.encoders._registry import _BUILDERS
from zoompipe.encoders.config import EncoderConfig

NAME = "test_crash_on_magenta"
MAGENTA = (255, 0, 255)


class MeanColour(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs are (pixel / 255 - 0.5) / 0.5: magenta is (1, -1, 1).
        magenta = (x[:, 0] > 0.99) & (x[:, 1] < -0.99) & (x[:, 2] > 0.99)
        if bool((magenta.float().mean(dim=(1, 2)) > 0.5).any()):
            ctypes.string_at(0)
        return x.mean(dim=(2, 3))


def build(weights, variant):
    return MeanColour(), EncoderConfig(name=NAME, feature_dim=3, weights="none", input_size=32,
                                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def register() -> None:
    if NAME not in _BUILDERS:
        register_encoder(NAME)(build)


class RegisterCrashEncoder(WorkerPlugin):
    name = "zoompipe-test-crash-encoder"

    def setup(self, worker) -> None:
        register()


def dies_on_first_tries(source, wait: bool, counts: str, tries: int) -> str:
    """A cluster task that SIGKILLs its worker on the first ``tries`` calls for its slide, then succeeds."""
    import os
    import signal
    from pathlib import Path

    counter = Path(counts) / source.slide_id
    calls = len(counter.read_text()) if counter.exists() else 0
    counter.write_text("x" * (calls + 1))
    if calls < tries:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"{source.slide_id} after {calls} deaths"
