"""Slide classifiers (ZoomMIL, ABMIL, CLAM-SB and -MB, TransMIL) by name, their building blocks, run folders."""
from zoompipe.model.attention import GatedAttention, masked_softmax
from zoompipe.model.output import ModelOutput
from zoompipe.model.registry import config_fields, create_model, list_models, model_class, register_model
from zoompipe.model.topk import PerturbedTopK, PerturbedTopKFunction, topk_indices
from zoompipe.model.zoommil import DenseRows, FetchChildren, RowSource, ZoomMIL, ZoomMILConfig, ZoomOutput

from zoompipe.model import abmil, clam, transmil  # noqa: F401,E402  (their decorators register them)
from zoompipe.model.checkpoint import Run, load_run, save_run  # noqa: E402

__all__ = [
    "DenseRows",
    "FetchChildren",
    "GatedAttention",
    "ModelOutput",
    "PerturbedTopK",
    "PerturbedTopKFunction",
    "RowSource",
    "Run",
    "ZoomMIL",
    "ZoomMILConfig",
    "ZoomOutput",
    "config_fields",
    "create_model",
    "list_models",
    "load_run",
    "masked_softmax",
    "model_class",
    "register_model",
    "save_run",
    "topk_indices",
]
