"""ZoomMIL model: gated attention, differentiable top-K, the zooming classifier, run folders."""
from zoompipe.model.attention import GatedAttention, masked_softmax
from zoompipe.model.checkpoint import load_run, save_run
from zoompipe.model.topk import PerturbedTopK, PerturbedTopKFunction, topk_indices
from zoompipe.model.zoommil import FetchChildren, ZoomMIL, ZoomMILConfig, ZoomOutput

__all__ = [
    "FetchChildren",
    "GatedAttention",
    "PerturbedTopK",
    "PerturbedTopKFunction",
    "ZoomMIL",
    "ZoomMILConfig",
    "ZoomOutput",
    "load_run",
    "masked_softmax",
    "save_run",
    "topk_indices",
]
