"""The explanation arithmetic on small hand-checked inputs (the real runs are in
test_explain_e2e.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmed.config.schema import ModelName
from fedmed.data.tabular import InputColumn, SitePreprocessor, Table, TabularSpec
from fedmed.data.types import DataSchema
from fedmed.errors import FedMedError
from fedmed.explain.images import randomised, rank_correlation, trained_layers
from fedmed.explain.linear import MarginModel, by_feature, feature_effects, ranked
from fedmed.explain.outcomes import by_outcome
from fedmed.models import build_model

SPEC = TabularSpec(label="y", categorical=(("cp", (1.0, 2.0, 4.0)),))
TABLE = Table(
    features=np.array(
        [[50.0, 1.0, math.nan], [60.0, 2.0, 1.0], [math.nan, 4.0, 0.0], [70.0, 1.0, 1.0]]
    ),
    labels=np.array([0, 1, 0, 1]),
    feature_names=("age", "cp", "sex"),
)


def test_the_columns_name_what_transform_writes_in_its_order() -> None:
    prep = SitePreprocessor.fit(TABLE, SPEC, np.arange(4))
    out = prep.transform(TABLE.features)
    columns = prep.columns()
    assert [c.name for c in columns] == [
        "age",
        "sex",
        "age: missing",
        "cp: missing",
        "sex: missing",
        "cp = 1",
        "cp = 2",
        "cp = 4",
    ]
    assert out.shape[1] == len(columns)
    for j, column in enumerate(columns):
        raw = TABLE.features[:, TABLE.feature_names.index(column.feature)]
        if column.kind == "missing":
            assert out[:, j].tolist() == np.isnan(raw).astype(float).tolist()
        elif column.kind == "category":
            assert out[:, j].tolist() == (raw == column.category).astype(float).tolist()
        else:  # standardised, and back to the record's units (a missing one: the median)
            recorded = [prep.recorded_value(row, j) for row in out]
            expected = np.where(np.isnan(raw), np.nanmedian(raw), raw)
            assert recorded == pytest.approx(expected.tolist(), abs=1e-4)


def test_attributions_are_exact_and_sum_per_feature() -> None:
    columns = (
        InputColumn("age", "age", "value"),
        InputColumn("age: missing", "age", "missing"),
        InputColumn("cp = 1", "cp", "category", 1.0),
        InputColumn("cp = 2", "cp", "category", 2.0),
    )
    margin = MarginModel(np.array([0.5, -1.0, 2.0, -0.25]), bias=0.1)
    x = np.array([[2.0, 0.0, 1.0, 0.0], [-1.0, 1.0, 0.0, 1.0]])
    reference = np.array([0.0, 0.5, 0.5, 0.5])
    attributions = margin.attributions(x, reference)
    assert attributions[0].tolist() == [1.0, 0.5, 1.0, 0.125]
    change = margin.margins(x) - margin.margins(reference[None])
    assert attributions.sum(axis=1) == pytest.approx(change, abs=1e-12)
    assert by_feature(attributions, columns).tolist() == [[1.5, 1.125], [-1.0, -1.125]]
    # effects from the weights: |age's weight| and cp's category spread (2 - (-0.25))
    assert feature_effects(margin.weights, columns).tolist() == [0.5, 2.25]
    assert ranked(["a", "b", "c"], np.array([0.1, -3.0, 2.0])) == [
        (1, "b", -3.0),
        (2, "c", 2.0),
        (3, "a", 0.1),
    ]


def test_margin_model_is_the_difference_of_the_two_logits() -> None:
    model = build_model(ModelName.svm, DataSchema((5,), 2), seed=3)
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    logits = model(torch.from_numpy(x)).detach().double().numpy()
    assert MarginModel.of(model).margins(x) == pytest.approx(logits[:, 1] - logits[:, 0], abs=1e-6)
    with pytest.raises(FedMedError, match="need a binary task; this one has 3 classes"):
        MarginModel.of(build_model(ModelName.svm, DataSchema((5,), 3), seed=3))
    with pytest.raises(FedMedError, match="ScatterNet is not a linear model"):
        MarginModel.of(build_model(ModelName.scatter, DataSchema((1, 28, 28), 2), seed=3))


def test_images_are_picked_by_outcome_most_confident_first() -> None:
    scores = np.array([2.0, 0.5, -1.0, 3.0, -0.2, 0.1, -4.0])
    labels = np.array([1, 0, 0, 1, 1, 1, 0])
    picked = by_outcome(scores, labels, threshold=0.0, per_outcome=2)
    assert picked == {
        "true positive": [3, 0],
        "false positive": [1],
        "true negative": [6, 2],
        "false negative": [4],
    }
    asked = by_outcome(scores, labels, threshold=0.0, per_outcome=2, requested=(5, 2))
    assert asked == {"true positive": [5], "false positive": [], "true negative": [2],
                     "false negative": []}  # fmt: skip


def test_randomising_resets_only_the_named_layers() -> None:
    model = build_model(ModelName.cnn, DataSchema((1, 28, 28), 2), seed=0)
    layers = trained_layers(model)
    assert layers[-1] == "classifier.3"  # the output layer last
    changed = randomised(model, layers[-1:], seed=5)
    before, after = model.state_dict(), changed.state_dict()
    differs = {k for k in before if not torch.equal(before[k], after[k])}
    assert differs == {"classifier.3.weight", "classifier.3.bias"}
    maps = np.random.default_rng(0).normal(size=(3, 1, 4, 4))
    assert rank_correlation(maps, -maps) == pytest.approx([1.0] * 3)  # magnitudes compared
