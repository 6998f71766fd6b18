"""A trained single-magnification run as ZoomMIL's teacher: where the zoom heads should look.

ZoomMIL's own zoom target comes from its last head, trained at the same time on the dense
last-magnification bag (:meth:`~zoompipe.model.ZoomMIL.zoom_target_loss`); until that head has
found the evidence, the zoom heads follow noise. A run of ABMIL trained on that magnification
alone has found it already, and its attention is the target from the first step.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from zoompipe.contract import PipelineContract, contract_difference
from zoompipe.errors import ContractError, UsageError
from zoompipe.model.abmil import ABMIL
from zoompipe.model.checkpoint import load_run
from zoompipe.model.evidence import class_evidence
from zoompipe.model.zoommil import ZoomMIL
from zoompipe.train_defaults import TEACHER_TARGETS

#: A mass (N,), summing to one, over a slide's dense last-magnification bag (N, D): what the
#: zoom heads follow (the teacher's attention, or its evidence).
TeacherMass = Callable[[Tensor], Tensor]


def load_teacher(
    run_dir: str | os.PathLike,
    model: ZoomMIL,
    class_names: Sequence[str],
    pipeline: PipelineContract | None,
    device: str | torch.device = "cpu",
) -> ABMIL:
    """Load an ABMIL run that can teach ``model``, frozen and in eval mode.

    The run must read ``model``'s last magnification, with its feature dimension, classes,
    projection and attention widths, from features made as ``pipeline`` says; anything else is
    refused in one line (:class:`~zoompipe.errors.UsageError`, or
    :class:`~zoompipe.errors.ContractError` for features made otherwise).
    """
    # Building the model draws initial weights from the global random stream, which the
    # training's own draws follow: a taught run must draw what an untaught one draws.
    with torch.random.fork_rng(devices=[]):
        teacher, config = load_run(run_dir, device)
    wanted = {"architecture": "abmil", "magnifications": model.config.magnifications[-1:],
              "in_dim": model.config.in_dim, "hidden": model.config.hidden,
              "attn_hidden": model.config.attn_hidden, "classes": list(class_names)}
    found = {"architecture": config.architecture, "magnifications": teacher.config.magnifications,
             "in_dim": teacher.config.in_dim, "hidden": teacher.config.hidden,
             "attn_hidden": getattr(teacher.config, "attn_hidden", None), "classes": config.class_names}
    for name, value in wanted.items():
        if found[name] != value:
            raise UsageError(f"{Path(run_dir)}: a teacher needs {name} {value}, the run has {found[name]}")
    difference = contract_difference(config.pipeline, pipeline)
    if difference:
        raise ContractError(f"{Path(run_dir)}: the teacher was trained on features made otherwise ({difference})")
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def teacher_attention(teacher: ABMIL) -> TeacherMass:
    """The frozen teacher's attention over a dense bag, without gradient."""

    @torch.no_grad()
    def attention(bag: Tensor) -> Tensor:
        return teacher([bag], []).attention[0]

    return attention


def teacher_evidence(teacher: ABMIL) -> TeacherMass:
    """Where the frozen teacher's evidence lies on a dense bag, whatever the slide's class
    (:func:`~zoompipe.model.evidence.class_evidence` of its projected patches).

    On the zoom benchmark's cohort, ABMIL 10x put 96% of its attention inside the lesions of
    normal slides, 60% in atypical ones and 2% in malignant ones (where lesions hold 1.6% of the
    patches), so zoom heads that follow its attention learn to find the lesions of some classes
    only (``benchmarks/lesion_attention.py``); its evidence marks the lesions in every class.
    """

    @torch.no_grad()
    def evidence(bag: Tensor) -> Tensor:
        return class_evidence(teacher.project(bag), teacher.classifier)

    return evidence


def teacher_target(teacher: ABMIL, target: str) -> TeacherMass:
    """The frozen teacher's mass over a dense bag: ``"attention"`` (:func:`teacher_attention`), or
    its evidence (:func:`teacher_evidence`) for ``"evidence"`` and ``"own-evidence"`` (where the
    zoom heads follow the model's own last level instead, :attr:`ZoomMIL.follows_own_evidence`,
    and the teacher's evidence is what the last attention is pulled towards)."""
    if target not in TEACHER_TARGETS:
        raise ValueError(f"teacher target must be one of {', '.join(TEACHER_TARGETS)}, got {target!r}")
    return teacher_attention(teacher) if target == "attention" else teacher_evidence(teacher)


def start_from_teacher(model: ZoomMIL, teacher: ABMIL) -> None:
    """Give ``model``'s last level (projection and attention) and classifier the teacher's weights.

    The zoomed bags are then classified, from the first step, by a head that already knows the
    evidence; the lower levels' vectors join that classifier's input as training goes on.
    """
    last = model.levels[-1]
    last.project.load_state_dict(teacher.project.state_dict())
    last.attention.load_state_dict(teacher.attention.state_dict())
    model.classifier.load_state_dict(teacher.classifier.state_dict())
