"""Exact attributions of a linear model, by clinical feature name.

For a linear model the attribution needs no approximation: the logit margin
``m(x) = w . x + b`` (``w`` = class 1's weights minus class 0's) splits into one term per
input column, ``w_j (x_j - r_j)``, which sum to ``m(x) - m(r)``. The reference ``r`` is the
site's own mean record (its training split), so an attribution reads "how much this value
moves this patient's score away from the site's average patient". Columns come from the
site's preprocessing (standardised value, missing-value indicator, one-hot categories) and
are summed back to the CSV column they came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmed.data.tabular import InputColumn
from fedmed.errors import FedMedError
from fedmed.models.linear import LinearClassifier


@dataclass(frozen=True)
class MarginModel:
    """A binary linear model as its margin: ``weights . x + bias`` (float64)."""

    weights: np.ndarray
    bias: float

    @classmethod
    def of(cls, model: torch.nn.Module) -> MarginModel:
        if not isinstance(model, LinearClassifier):
            raise FedMedError(f"{type(model).__name__} is not a linear model (svm, logreg)")
        weight = model.linear.weight.detach().double().numpy()
        bias = model.linear.bias.detach().double().numpy()
        if weight.shape[0] != 2:
            raise FedMedError(
                f"explanations of a linear model need a binary task; this one has "
                f"{weight.shape[0]} classes"
            )
        return cls(weight[1] - weight[0], float(bias[1] - bias[0]))

    def margins(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weights + self.bias

    def attributions(self, x: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Per record and input column ``w_j (x_j - r_j)``; each row sums to
        ``margins(x) - margins(reference)``."""
        return (np.asarray(x, np.float64) - np.asarray(reference, np.float64)) * self.weights


def features_of(columns: tuple[InputColumn, ...]) -> list[str]:
    """The CSV columns behind the input columns, in first-appearance order."""
    return list(dict.fromkeys(c.feature for c in columns))


def by_feature(values: np.ndarray, columns: tuple[InputColumn, ...]) -> np.ndarray:
    """Sum ``values`` (..., input column) over each feature's columns: (..., feature)."""
    if values.shape[-1] != len(columns):
        raise ValueError(f"{values.shape[-1]} values for {len(columns)} columns")
    names = features_of(columns)
    index = {name: i for i, name in enumerate(names)}
    membership = np.zeros((len(columns), len(names)))
    for j, column in enumerate(columns):
        membership[j, index[column.feature]] = 1.0
    return values @ membership


def feature_effects(weights: np.ndarray, columns: tuple[InputColumn, ...]) -> np.ndarray:
    """How far each feature can move the margin, from the weights alone (no data): a
    standardised value's weight (per site standard deviation), or the spread of a categorical
    feature's category weights (largest minus smallest). Missing-value indicators are left
    out: the weight of an indicator no site's records set is its initial value, not
    evidence. Comparable across models with the same preprocessing (pooled vs federated)."""
    names = features_of(columns)
    effects = np.zeros(len(names))
    for i, name in enumerate(names):
        own = [(c, w) for c, w in zip(columns, weights, strict=True) if c.feature == name]
        values = [abs(w) for c, w in own if c.kind == "value"]
        categories = [w for c, w in own if c.kind == "category"]
        spread = max(categories) - min(categories) if categories else 0.0
        effects[i] = sum(values) + spread
    return effects


def ranked(names: list[str], scores: np.ndarray) -> list[tuple[int, str, float]]:
    """(rank from 1, name, score) by decreasing |score|; ties keep the names' order."""
    order = sorted(range(len(names)), key=lambda i: -abs(float(scores[i])))
    return [(rank, names[i], float(scores[i])) for rank, i in enumerate(order, start=1)]
