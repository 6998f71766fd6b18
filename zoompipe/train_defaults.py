"""Training defaults that the CLI shows in ``--help``, importable without torch."""

#: Zoom budget: this fraction of each slide's base bag (see ``train_model``'s ``k``), chosen on
#: validation folds (README, "Choosing K").
DEFAULT_K = 0.25

#: Clipping of the global gradient norm of a training step.
DEFAULT_MAX_GRAD_NORM = 5.0
