"""The operating point: threshold rules on validation figures, exact and from DP bins, against
brute force on real margins; the validation split; the config's errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from fedmed.config.schema import FedMedConfig
from fedmed.data import load_site
from fedmed.errors import ConfigError
from fedmed.metrics import EvalStats, margin_histogram, released_counts, stats_from_counts
from fedmed.models import build_loss, build_model
from fedmed.operating_point import (
    Rule,
    ThresholdRule,
    candidate_thresholds,
    choose_threshold,
    parse_threshold,
)
from fedmed.protocol import EvaluateReport
from fedmed.train import TrainSettings, evaluate, make_loader, train_local


@pytest.fixture(scope="module")
def margins() -> tuple[np.ndarray, np.ndarray]:
    """Real margins: a logreg trained on each heart-disease hospital, on its test split,
    shifted as a model biased towards the positive class would be (at 0 it then calls 90% of
    the negatives positive)."""
    from fedmed.runs.compose import compose_config

    cfg = compose_config(["dataset=heart", "model=logreg"])
    scores, labels = [], []
    for index in range(4):
        site = load_site(cfg, index)
        model = build_model(cfg.model.name, site.schema, 0)
        settings = TrainSettings(epochs=5, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0)
        loader = make_loader(site.x_train, site.y_train, 16, 0)
        train_local(model, build_loss(cfg.model.name), loader, settings)
        with torch.no_grad():
            logits = model(torch.from_numpy(site.x_test))
        scores.append((logits[:, 1] - logits[:, 0]).numpy())
        labels.append(site.y_test)
    raw, y = np.concatenate(scores), np.concatenate(labels)
    return raw - float(np.quantile(raw[y == 0], 0.1)), y  # 90% of the negatives now >= 0


def _stats(margins: np.ndarray, labels: np.ndarray) -> EvalStats:
    return EvalStats(
        len(labels),
        0.0,
        int(((margins >= 0) == (labels == 1)).sum()),
        margin_histogram(margins[labels == 1]),
        margin_histogram(margins[labels == 0]),
    )


def test_parse_threshold_forms_and_errors() -> None:
    assert parse_threshold("0") == ThresholdRule(Rule.fixed, 0.0)
    assert parse_threshold("youden") == ThresholdRule(Rule.youden)
    assert parse_threshold("Sensitivity:0.9") == ThresholdRule(Rule.sensitivity, 0.9)
    assert parse_threshold("0.123").value == pytest.approx(0.12)  # the nearest fine edge
    for bad in ("sensitivity:1.5", "sensitivity:x", "best", "40"):
        with pytest.raises(ValueError, match="youden"):
            parse_threshold(bad)


def test_youden_on_exact_histograms_matches_brute_force_on_the_margins(
    margins: tuple[np.ndarray, np.ndarray],
) -> None:
    scores, labels = margins
    stats = _stats(scores, labels)
    assert stats.balanced_accuracy is not None and stats.balanced_accuracy < 0.6  # biased
    threshold = choose_threshold(stats, parse_threshold("youden"))
    fpr, tpr, _ = roc_curve(labels, scores)
    best_j = float(np.max(tpr - fpr))
    read = stats.at_threshold(threshold)
    assert read.sensitivity is not None and read.specificity is not None
    # the threshold is a bin edge (0.01 wide): at most a record or two of the best J lost
    one_record = 1 / min(labels.sum(), (1 - labels).sum())
    assert read.sensitivity + read.specificity - 1 >= best_j - 2 * one_record
    # and read at it, the histogram figures are the margins' own
    called = scores >= threshold
    assert read.sensitivity == pytest.approx(called[labels == 1].mean(), abs=1e-12)
    assert read.specificity == pytest.approx(1 - called[labels == 0].mean(), abs=1e-12)
    assert read.correct == int((called == (labels == 1)).sum())
    assert read.balanced_accuracy is not None and read.balanced_accuracy > 0.75


def test_sensitivity_rule_picks_the_most_specific_threshold_that_keeps_it(
    margins: tuple[np.ndarray, np.ndarray],
) -> None:
    scores, labels = margins
    stats = _stats(scores, labels)
    threshold = choose_threshold(stats, parse_threshold("sensitivity:0.95"))
    positives = scores[labels == 1]
    assert (positives >= threshold).mean() >= 0.95
    step_up = next(t for t in candidate_thresholds(stats) if t > threshold)
    assert (positives >= step_up).mean() < 0.95 or (
        (scores[labels == 0] >= step_up).mean() == (scores[labels == 0] >= threshold).mean()
    )


def test_from_noiseless_dp_bins_the_threshold_is_an_edge_and_the_rates_are_exact(
    margins: tuple[np.ndarray, np.ndarray],
) -> None:
    scores, labels = margins
    edges = [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    counts = released_counts(_stats(scores, labels), edges)
    validation = stats_from_counts(counts, len(labels), edges)
    threshold = choose_threshold(validation, parse_threshold("youden"))
    assert threshold in edges and threshold != 0.0
    test = stats_from_counts(counts, len(labels), edges, threshold)
    called = scores >= threshold
    assert test.sensitivity == pytest.approx(called[labels == 1].mean(), abs=1e-9)
    assert test.specificity == pytest.approx(1 - called[labels == 0].mean(), abs=1e-9)
    assert test.accuracy == pytest.approx((called == (labels == 1)).mean(), abs=1e-9)


def test_a_rule_without_both_classes_keeps_threshold_zero() -> None:
    one_class = EvalStats(3, 0.0, 3, margin_histogram(np.array([1.0, 2.0, 3.0])),
                          margin_histogram(np.zeros(0)))  # fmt: skip
    assert choose_threshold(one_class, parse_threshold("youden")) == 0.0


def test_the_validation_split_is_carved_from_training_stratified_and_seeded_by_site(
    compose: Callable[..., FedMedConfig],
) -> None:
    plain = load_site(compose("dataset=heart"), 2)
    carved = load_site(compose("dataset=heart", "evaluation.threshold=youden"), 2)
    assert plain.x_val is None and carved.x_val is not None and carved.y_val is not None
    assert len(carved.y_train) + len(carved.y_val) == len(plain.y_train)
    assert np.array_equal(carved.x_test, plain.x_test)
    rows = {r.tobytes() for r in plain.x_train}
    assert {r.tobytes() for r in carved.x_val} | {r.tobytes() for r in carved.x_train} <= rows
    assert not {r.tobytes() for r in carved.x_val} & {r.tobytes() for r in carved.x_train}
    assert carved.y_val.mean() == pytest.approx(plain.y_train.mean(), abs=0.05)
    assert len(carved.y_val) == pytest.approx(0.2 * len(plain.y_train), abs=2)
    assert carved.held_out_records == len(carved.y_test) + len(carved.y_val)
    again = load_site(compose("dataset=heart", "evaluation.threshold=sensitivity:0.9"), 2)
    assert again.x_val is not None and np.array_equal(again.x_val, carved.x_val)


def test_config_errors_name_the_key(compose: Callable[..., FedMedConfig]) -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.threshold='best'.*youden"):
        compose("dataset=heart", "evaluation.threshold=best")
    with pytest.raises(ConfigError, match=r"evaluation\.threshold.*evaluation_margin_edges"):
        compose("dataset=heart", "privacy=dp", "evaluation.threshold=0.5")
    with pytest.raises(ConfigError, match=r"evaluation\.validation_fraction"):
        compose("dataset=heart", "evaluation.threshold=youden", "evaluation.validation_fraction=1")
    # heart's raw outcome, 0-4: a multi-class task, which no threshold rule can read
    multiclass = compose("dataset=heart", "evaluation.threshold=youden",
                         "dataset.binarize_above=null", "dataset.classes=[0,1,2,3,4]")  # fmt: skip
    with pytest.raises(ConfigError, match=r"evaluation\.threshold.*binary task"):
        load_site(multiclass, 0)
    fixed = compose("dataset=heart", "evaluation.threshold=0.5", "dataset.binarize_above=null",
                    "dataset.classes=[0,1,2,3,4]")  # fmt: skip
    with pytest.raises(ConfigError, match=r"evaluation\.threshold=.0\.5.*binary task"):
        load_site(fixed, 0)


def test_an_evaluate_report_carries_the_validation_split_both_ways(
    compose: Callable[..., FedMedConfig],
) -> None:
    cfg = compose("dataset=heart", "model=svm", "evaluation.threshold=youden")
    site = load_site(cfg, 0)
    assert site.x_val is not None and site.y_val is not None
    model, loss = build_model(cfg.model.name, site.schema, 0), build_loss(cfg.model.name)
    test = evaluate(model, loss, site.x_test, site.y_test, 2)
    validation = evaluate(model, loss, site.x_val, site.y_val, 2)
    back = EvaluateReport.from_metrics(EvaluateReport(site.name, test, validation=validation)
                                       .to_metrics())  # fmt: skip
    assert back.validation is not None and back.stats is not None
    assert back.validation.num_examples == len(site.y_val)
    assert np.array_equal(back.validation.hist_pos, validation.hist_pos)  # type: ignore[arg-type]
    assert np.array_equal(back.stats.hist_neg, test.hist_neg)  # type: ignore[arg-type]
