"""Training losses, optionally weighted by class for imbalanced cohorts.

Under DP-SGD a class weight must not couple records: PyTorch's own ``weight=`` mean divides
by the batch's summed weights, so one record's label would change every other record's
gradient, which per-sample clipping does not bound. Here each record's loss is scaled by the
fixed weight of its own class and the batch is averaged over its size, so a record's gradient
depends on that record alone; the weights themselves are public (the run's config), or, only
without DP, computed from the site's own training labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.config.schema import CLASS_WEIGHT_BALANCED, CLASS_WEIGHT_NONE, ModelName
from fedmed.errors import ConfigError


class ClassWeightedLoss(nn.Module):
    """``base`` per record times the weight of the record's true class, averaged over the batch
    size. ``reduction`` is read at every call: Opacus' ghost clipping sets it to "none" to get
    the per-sample losses, exactly as it does for PyTorch's own losses."""

    def __init__(
        self, base: nn.CrossEntropyLoss | nn.MultiMarginLoss, weights: Sequence[float]
    ) -> None:
        super().__init__()
        base.reduction = "none"
        self.base = base
        self.weights = torch.tensor(list(weights), dtype=torch.float32)
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_record = self.base(logits, labels) * self.weights[labels]
        if self.reduction == "none":
            return per_record
        if self.reduction == "sum":
            return per_record.sum()
        return per_record.mean()


def build_loss(name: ModelName, class_weights: Sequence[float] | None = None) -> nn.Module:
    """Hinge loss for the SVM (its L2 term is model.weight_decay), cross-entropy otherwise;
    with ``class_weights``, each record's loss scaled by its class's weight."""
    base = nn.MultiMarginLoss() if name is ModelName.svm else nn.CrossEntropyLoss()
    if class_weights is None:
        return base
    return ClassWeightedLoss(base, class_weights)


def class_weights(setting: Any, y_train: np.ndarray, num_classes: int) -> tuple[float, ...] | None:
    """The weights ``model.class_weight`` asks for at one site: None (unweighted), the given
    list (one positive weight per class), or ``balanced``: n / (classes x n_c) from the site's
    own training labels (sklearn's rule; a class the site lacks gets weight 0, it is never
    used). ``validate`` has refused ``balanced`` under DP, where the counts are private."""
    if setting in CLASS_WEIGHT_NONE:
        return None
    if setting == CLASS_WEIGHT_BALANCED:
        counts = np.bincount(y_train, minlength=num_classes).astype(np.float64)
        present = counts > 0
        weights = np.zeros(num_classes)
        weights[present] = len(y_train) / (int(present.sum()) * counts[present])
        return tuple(float(w) for w in weights)
    weights_given = tuple(float(w) for w in setting)
    if len(weights_given) != num_classes:
        raise ConfigError(
            "model.class_weight",
            list(weights_given),
            f"one weight per class: the data has {num_classes} classes",
        )
    return weights_given
