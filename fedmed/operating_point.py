"""The global model's operating point: the decision threshold on its logit margin.

A model trained on an imbalanced cohort (or under DP-SGD's noise) can rank patients well and
still call every one of them positive at the default threshold 0. ``evaluation.threshold``
names a rule instead: ``youden`` (the threshold of largest sensitivity + specificity) or
``sensitivity:S`` (the largest threshold whose sensitivity is at least S, so the most specific
one that still finds that share of the sick), applied to the sites' validation splits, which
are carved from their training records and never seen by training. The threshold is chosen
from the summed validation histograms (under DP, their noisy released counts: post-
processing), among the histograms' bin edges, and then applied to the test figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from fedmed.metrics import FINE_BIN_WIDTH, HIST_BINS, HIST_RANGE, EvalStats

# Beside global_model.pt: the threshold the reported figures were read at.
OPERATING_POINT_FILE = "operating_point.json"


class Rule(Enum):
    fixed = "fixed"
    youden = "youden"
    sensitivity = "sensitivity"


@dataclass(frozen=True)
class ThresholdRule:
    """How the threshold is set: a fixed margin (``value``), or a rule on validation data."""

    rule: Rule
    value: float = 0.0

    @property
    def needs_validation(self) -> bool:
        return self.rule is not Rule.fixed

    def describe(self) -> str:
        if self.rule is Rule.youden:
            return "youden (largest sensitivity + specificity on the validation splits)"
        if self.rule is Rule.sensitivity:
            return f"sensitivity >= {self.value:g} on the validation splits, most specific"
        return f"fixed at logit margin {self.value:g}"


THRESHOLD_FORMS = "a logit margin (e.g. 0), youden, or sensitivity:S with S in (0, 1)"


def parse_threshold(text: str) -> ThresholdRule:
    """``evaluation.threshold`` as a rule; ValueError saying what is allowed."""
    value = str(text).strip().lower()
    if value == Rule.youden.value:
        return ThresholdRule(Rule.youden)
    if value.startswith(f"{Rule.sensitivity.value}:"):
        try:
            target = float(value.split(":", 1)[1])
        except ValueError:
            raise ValueError(THRESHOLD_FORMS) from None
        if not 0.0 < target < 1.0:
            raise ValueError(THRESHOLD_FORMS)
        return ThresholdRule(Rule.sensitivity, target)
    try:
        margin = float(value)
    except ValueError:
        raise ValueError(THRESHOLD_FORMS) from None
    if not -HIST_RANGE < margin < HIST_RANGE:
        raise ValueError(f"{THRESHOLD_FORMS}; a margin inside (-16, 16)")
    return ThresholdRule(Rule.fixed, fine_edge(margin))


def fine_edge(margin: float) -> float:
    """The fine histogram's bin edge nearest ``margin``."""
    return round(round((margin + HIST_RANGE) / FINE_BIN_WIDTH) * FINE_BIN_WIDTH - HIST_RANGE, 10)


def candidate_thresholds(stats: EvalStats) -> list[float]:
    """The thresholds at which ``stats`` can be read: its histograms' inner bin edges."""
    if stats.edges is not None:
        return list(stats.edges)
    return [fine_edge(-HIST_RANGE + k * FINE_BIN_WIDTH) for k in range(1, HIST_BINS)]


def choose_threshold(validation: EvalStats, rule: ThresholdRule) -> float:
    """The rule's threshold on the (summed) validation figures. Ties go to the threshold
    nearest 0; with no positive or no negative record the rule cannot apply and 0 stays."""
    if not rule.needs_validation:
        return rule.value
    pos, neg = validation.hist_pos, validation.hist_neg
    if pos is None or neg is None or pos.sum() <= 0 or neg.sum() <= 0:
        return 0.0
    thresholds = candidate_thresholds(validation)  # threshold k: bins k+1.. called positive
    sensitivity = np.cumsum(pos[::-1])[::-1][1:] / pos.sum()
    specificity = np.cumsum(neg)[:-1] / neg.sum()
    if rule.rule is Rule.youden:
        score = sensitivity + specificity
    else:  # the most specific threshold that keeps the asked sensitivity
        score = np.where(sensitivity >= rule.value, specificity, -np.inf)
        if not np.isfinite(score).any():
            return thresholds[0]  # none reaches it: call the most records positive
    best = np.flatnonzero(np.isclose(score, score.max(), rtol=0.0, atol=1e-12))
    return thresholds[min(best, key=lambda i: (abs(thresholds[i]), thresholds[i]))]
