"""Opacus-compatible models, shareable evaluation statistics, local training on real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score
from torch import nn

from fedmed.config.schema import ModelName
from fedmed.data import load_site
from fedmed.data.types import DataSchema
from fedmed.errors import ConfigError
from fedmed.metrics import EvalStats, auc_from_histograms, margin_histogram
from fedmed.models import DiagnosisNet, build_loss, build_model
from fedmed.train import TrainSettings, evaluate, get_weights, make_loader, train_local

IMAGE = DataSchema((1, 28, 28), 2)
TABULAR = DataSchema((30,), 2)


# ----------------------------------------------------------------------------- models
def test_diagnosisnet_has_no_batchnorm():
    model = build_model(ModelName.cnn, IMAGE, 0)
    assert isinstance(model, DiagnosisNet)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms == []
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "schema"),
    [
        (ModelName.cnn, IMAGE),
        (ModelName.cnn, DataSchema((3, 28, 28), 5)),
        (ModelName.dpcnn, IMAGE),
        (ModelName.dpcnn, DataSchema((3, 28, 28), 5)),
        (ModelName.scatter, IMAGE),
        (ModelName.scatter, DataSchema((3, 28, 28), 5)),
        (ModelName.svm, TABULAR),
        (ModelName.logreg, TABULAR),
    ],
)
def test_models_pass_opacus_validation(name, schema):
    model = build_model(name, schema, 0)
    assert ModuleValidator.validate(model, strict=False) == []
    out = model(torch.zeros(3, *schema.input_shape))
    assert out.shape == (3, schema.num_classes)


def test_cnn_parameter_count():
    model = build_model(ModelName.cnn, IMAGE, 0)
    count = sum(p.numel() for p in model.parameters())
    assert 400_000 <= count <= 440_000


def test_the_dp_first_cnn_is_small_bounded_and_pooled():
    """DP-SGD's noise grows with the weight count: under 5% of DiagnosisNet's; tanh
    activations, GroupNorm, and a head on globally pooled features."""
    model = build_model(ModelName.dpcnn, IMAGE, 0)
    assert sum(p.numel() for p in model.parameters()) < 20_000
    kinds = {type(m) for m in model.modules()}
    assert {nn.Tanh, nn.GroupNorm, nn.AdaptiveAvgPool2d} <= kinds
    assert nn.ReLU not in kinds and not any(issubclass(k, nn.modules.batchnorm._BatchNorm)
                                            for k in kinds)  # fmt: skip
    with pytest.raises(ConfigError):
        build_model(ModelName.dpcnn, TABULAR, 0)


def test_scatternet_trains_only_its_classifier_and_ships_no_filters():
    """The scattering is fixed and rebuilt by every party: its filters are neither trained
    (no gradients, nothing to clip or noise) nor in the state_dict that Flower sends."""
    model = build_model(ModelName.scatter, IMAGE, 0)
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"norm", "classifier"}
    assert list(model.state_dict()) == [
        "norm.weight", "norm.bias", "classifier.weight", "classifier.bias"
    ]  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) < 10_000
    assert any(True for _ in model.scattering.buffers())  # the filters are there, unsent
    with pytest.raises(ConfigError):
        build_model(ModelName.scatter, TABULAR, 0)


def test_same_seed_same_initial_weights():
    a = get_weights(build_model(ModelName.cnn, IMAGE, 3))
    b = get_weights(build_model(ModelName.cnn, IMAGE, 3))
    c = get_weights(build_model(ModelName.cnn, IMAGE, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_cnn_refuses_tabular_input():
    with pytest.raises(ConfigError) as info:
        build_model(ModelName.cnn, TABULAR, 0)
    assert info.value.key == "model"


def test_loss_per_model():
    assert isinstance(build_loss(ModelName.svm), nn.MultiMarginLoss)
    assert isinstance(build_loss(ModelName.logreg), nn.CrossEntropyLoss)


# ----------------------------------------------------------------------------- AUC
def test_histogram_auc_matches_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + 0.8 * y
    scores[:50] = np.round(scores[:50])  # exact ties across classes
    scores[50:55] = [40.0, -40.0, 17.0, -16.5, 16.0]  # beyond the histogram range
    pos, neg = margin_histogram(scores[y == 1]), margin_histogram(scores[y == 0])
    assert pos.sum() == (y == 1).sum() and neg.sum() == (y == 0).sum()
    assert auc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(y, scores), abs=1e-3)


def test_histogram_auc_edge_cases():
    empty = margin_histogram(np.zeros(0))
    assert auc_from_histograms(margin_histogram(np.array([1.0])), empty) is None
    low, high = margin_histogram(np.array([-1.0])), margin_histogram(np.array([1.0, 2.0]))
    assert auc_from_histograms(high, low) == 1.0
    assert auc_from_histograms(low, high) == 0.0
    tie = margin_histogram(np.array([0.5]))
    assert auc_from_histograms(tie, tie) == 0.5


def site_config(compose, model: str, epochs: int):
    return compose("dataset=breast_cancer", f"model={model}", f"federation.local_epochs={epochs}")


def train_on_site(cfg, index: int) -> tuple[nn.Module, nn.Module]:
    site = load_site(cfg, index)
    model = build_model(cfg.model.name, site.schema, cfg.seed)
    loss_fn = build_loss(cfg.model.name)
    loader = make_loader(site.x_train, site.y_train, cfg.model.batch_size, cfg.seed)
    train_local(model, loss_fn, loader, TrainSettings.from_config(cfg))
    return model, loss_fn


def test_histogram_auc_matches_sklearn_on_trained_logreg(compose):
    cfg = site_config(compose, "logreg", epochs=1)
    model, loss_fn = train_on_site(cfg, 0)
    sites = [load_site(cfg, i) for i in range(4)]
    # Score every record of every site (train and test) so the AUC is not trivially 1.
    x = np.concatenate([a for s in sites for a in (s.x_train, s.x_test)])
    y = np.concatenate([a for s in sites for a in (s.y_train, s.y_test)])
    stats = evaluate(model, loss_fn, x, y, 2)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    expected = roc_auc_score(y, logits[:, 1] - logits[:, 0])
    assert 0.5 < expected < 1.0
    assert stats.auc == pytest.approx(expected, abs=1e-3)
    # per-site histograms merged give the AUC of the union
    parts = [evaluate(model, loss_fn, s.x_test, s.y_test, 2) for s in sites]
    union_x = np.concatenate([s.x_test for s in sites])
    union_y = np.concatenate([s.y_test for s in sites])
    with torch.no_grad():
        union_logits = model(torch.from_numpy(union_x)).numpy()
    merged = EvalStats.merge(parts)
    assert merged.auc == pytest.approx(
        roc_auc_score(union_y, union_logits[:, 1] - union_logits[:, 0]), abs=1e-3
    )
    assert merged.num_examples == len(union_y)


def test_sensitivity_specificity_and_balanced_accuracy_match_sklearn_on_real_records(compose):
    cfg = site_config(compose, "logreg", epochs=1)
    model, loss_fn = train_on_site(cfg, 0)
    sites = [load_site(cfg, i) for i in range(4)]
    merged = EvalStats.merge([evaluate(model, loss_fn, s.x_test, s.y_test, 2) for s in sites])
    y = np.concatenate([s.y_test for s in sites])
    with torch.no_grad():
        predicted = model(torch.from_numpy(np.concatenate([s.x_test for s in sites])))
    predicted = predicted.argmax(dim=1).numpy()
    assert merged.sensitivity == pytest.approx(recall_score(y, predicted), abs=1e-12)
    assert merged.specificity == pytest.approx(recall_score(y, predicted, pos_label=0), abs=1e-12)
    assert merged.balanced_accuracy == pytest.approx(
        balanced_accuracy_score(y, predicted), abs=1e-12
    )
    assert 0.85 < merged.balanced_accuracy < 1.0


def test_a_constant_classifier_shows_at_a_glance_whatever_its_accuracy(compose):
    """The model that says "positive" for every patient: on a 9:1 cohort accuracy is 0.9, but
    sensitivity 1, specificity 0 and balanced accuracy 0.5."""
    cfg = site_config(compose, "logreg", epochs=1)
    site = load_site(cfg, 0)
    model = build_model(cfg.model.name, site.schema, cfg.seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.linear.bias.copy_(torch.tensor([-5.0, 5.0]))
    y = np.array([1] * 90 + [0] * 10, dtype=np.int64)
    x = site.x_test[np.arange(100) % len(site.x_test)]
    stats = evaluate(model, build_loss(cfg.model.name), x, y, 2)
    assert stats.accuracy == pytest.approx(0.9)
    assert (stats.sensitivity, stats.specificity, stats.balanced_accuracy) == (1.0, 0.0, 0.5)
    assert EvalStats(5, 1.0, 3).balanced_accuracy is None  # not a binary task


# ----------------------------------------------------------------------------- EvalStats
def stats(n: int, loss: float, correct: int, seed: int, binary: bool = True) -> EvalStats:
    if not binary:
        return EvalStats(n, loss, correct)
    rng = np.random.default_rng(seed)
    return EvalStats(
        n,
        loss,
        correct,
        margin_histogram(rng.normal(size=n // 2)),
        margin_histogram(rng.normal(size=n - n // 2)),
    )


def test_merge_sums_counts_exactly():
    parts = [stats(10, 2.5, 7, 0), stats(31, 4.25, 20, 1), stats(7, 0.5, 7, 2)]
    merged = EvalStats.merge(parts)
    assert merged.num_examples == 48
    assert merged.correct == 34
    assert merged.loss_sum == pytest.approx(7.25)
    assert merged.accuracy == pytest.approx(34 / 48)
    assert merged.loss == pytest.approx(7.25 / 48)
    np.testing.assert_array_equal(merged.hist_pos, sum(p.hist_pos for p in parts))
    np.testing.assert_array_equal(merged.hist_neg, sum(p.hist_neg for p in parts))
    assert int(merged.hist_pos.sum() + merged.hist_neg.sum()) == 48


def test_merge_with_a_multiclass_part_drops_auc():
    merged = EvalStats.merge([stats(10, 1.0, 5, 0), stats(6, 1.0, 3, 1, binary=False)])
    assert merged.hist_pos is None and merged.auc is None
    assert merged.num_examples == 16


def test_empty_stats_are_safe():
    empty = EvalStats(0, 0.0, 0)
    assert empty.accuracy == 0.0 and empty.loss == 0.0 and empty.auc is None
    assert EvalStats.merge([]).num_examples == 0


@pytest.mark.parametrize("binary", [True, False])
def test_metrics_round_trip(binary):
    original = stats(25, 3.75, 19, 4, binary=binary)
    metrics = original.to_metrics()
    assert set(metrics) >= {"num_examples", "loss_sum", "correct"}
    for value in metrics.values():
        assert isinstance(value, int | float | bytes)  # Flower-serialisable scalars only
    back = EvalStats.from_metrics(dict(metrics))
    assert (back.num_examples, back.loss_sum, back.correct) == (25, 3.75, 19)
    if binary:
        np.testing.assert_array_equal(back.hist_pos, original.hist_pos)
        np.testing.assert_array_equal(back.hist_neg, original.hist_neg)
        assert back.auc == original.auc
    else:
        assert back.hist_pos is None and back.hist_neg is None


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("model_name", ["svm", "logreg"])
def test_local_training_on_breast_cancer_reaches_90_percent(compose, model_name):
    cfg = site_config(compose, model_name, epochs=5)
    for index in (0, 2):
        site = load_site(cfg, index)
        untrained = build_model(cfg.model.name, site.schema, cfg.seed)
        model, loss_fn = train_on_site(cfg, index)
        result = evaluate(model, loss_fn, site.x_test, site.y_test, site.num_classes)
        before = evaluate(untrained, loss_fn, site.x_test, site.y_test, site.num_classes)
        assert result.num_examples == len(site.y_test)
        assert result.accuracy >= 0.9, (index, result.accuracy)
        assert result.loss < before.loss


def test_train_local_returns_finite_decreasing_loss(compose):
    cfg = site_config(compose, "logreg", epochs=1)
    site = load_site(cfg, 1)
    model = build_model(cfg.model.name, site.schema, 0)
    loss_fn = build_loss(cfg.model.name)
    settings = TrainSettings.from_config(cfg)
    first = train_local(model, loss_fn, make_loader(site.x_train, site.y_train, 16, 0), settings)
    later = train_local(model, loss_fn, make_loader(site.x_train, site.y_train, 16, 0), settings)
    assert first.steps == later.steps == -(-len(site.y_train) // 16)
    first, later = first.loss, later.loss
    assert np.isfinite(first) and np.isfinite(later)
    assert later < first
