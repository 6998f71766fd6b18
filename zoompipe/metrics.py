"""Slide-level classification metrics."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Accuracy, weighted F1, macro one-vs-rest AUC and confusion matrix.

    Parameters
    ----------
    labels : ndarray
        True class indices, shape (n,).
    probabilities : ndarray
        Predicted class probabilities, shape (n, n_classes); the prediction is the arg-max.

    Returns
    -------
    dict
        ``accuracy``, ``weighted_f1``, ``auc`` (mean over the classes that occur among the
        labels without being all of them, ``None`` if there is no such class: AUC is undefined
        without both positives and negatives) and ``confusion_matrix`` (rows: true class,
        columns: predicted class, as nested lists). Plain Python types, ready for JSON.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    classes = np.arange(probabilities.shape[1])
    predictions = probabilities.argmax(axis=1)
    aucs = [
        roc_auc_score(labels == c, probabilities[:, c])
        for c in classes
        if 0 < np.sum(labels == c) < len(labels)
    ]
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "weighted_f1": float(
            f1_score(labels, predictions, labels=classes, average="weighted", zero_division=0)
        ),
        "auc": float(np.mean(aucs)) if aucs else None,
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
    }
