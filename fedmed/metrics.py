"""Evaluation statistics that sites can share: counts, loss sums and score histograms.

Sites never send per-record predictions. Without DP, for binary tasks each site sends a
histogram of its decision margins per true class; summed histograms give the AUC of the
union of all test splits, exact up to ties inside one bin (bin width 0.01 in logit space).
Under DP a site releases only ``released_counts``: a few counts in which each test record
is counted exactly once (coarse margin bins per class; for other tasks right and wrong), so
one record changes the vector by 1 in L2 and the Gaussian mechanism's noise stays small
beside the counts. ``stats_from_counts`` turns the sum of the sites' noisy counts into
figures (post-processing: no further privacy cost).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

HIST_RANGE = 16.0
HIST_BINS = 3200
FINE_BIN_WIDTH = 2 * HIST_RANGE / HIST_BINS
# Default edges of the coarse margin bins a DP site releases (privacy.evaluation_margin_edges;
# logit margin, 0 the decision threshold, so accuracy, sensitivity and specificity at it are
# sums of whole bins; every edge is one of the fine histogram's, so coarse counts are sums of
# its bins). Few bins: every count carries the same noise, and accuracy sums half of them.
# Measured on a real heart svm run at epsilon 1, one evaluation (benchmarks/evaluation_bins.py):
# 4 bins per class gave the smallest AUC error (rmse 0.034 with the binormal fit; 0.050 with 6,
# 0.138 with 8, 0.091 with 2) at an accuracy error of 0.032 (0.039, 0.045; 0.022 with 2).
RELEASED_MARGIN_EDGES = (-1.0, 0.0, 1.0)
# Binary tasks, at the decision threshold: what a clinician reads beside accuracy and AUC.
CLINICAL_METRICS = ("balanced_accuracy", "sensitivity", "specificity")


def margin_histogram(margins: np.ndarray) -> np.ndarray:
    """Counts of logit margins in fixed bins over [-16, 16] (values outside go to the end bins)."""
    clipped = np.clip(margins, -HIST_RANGE, HIST_RANGE - 1e-9)
    edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
    return np.histogram(clipped, bins=edges)[0].astype(np.int64)


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """ROC AUC from per-class score histograms (ties within a bin count one half)."""
    total_pos, total_neg = float(pos.sum()), float(neg.sum())
    if total_pos <= 0 or total_neg <= 0:
        return None
    neg_below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    wins = float((pos * neg_below).sum() + 0.5 * (pos * neg).sum())
    return wins / (total_pos * total_neg)


def margin_edges_problem(edges: Sequence[float]) -> str | None:
    """Why ``edges`` cannot be released margin bins; None when they can."""
    values = [float(e) for e in edges]
    if 0.0 not in values:
        return "0 (the decision threshold) must be an edge"
    if any(b <= a for a, b in itertools.pairwise(values)):
        return "edges must increase"
    outside = [e for e in values if not -HIST_RANGE < e < HIST_RANGE]
    off_grid = [e for e in values if abs(e / FINE_BIN_WIDTH - round(e / FINE_BIN_WIDTH)) > 1e-6]
    if outside or off_grid:
        return f"edges must be multiples of {FINE_BIN_WIDTH:g} inside (-16, 16)"
    return None


def _normal_fit(hist: np.ndarray, edges: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sd of the normal whose cdf at ``edges`` best matches the binned counts: the
    probits of the cumulative proportions lie on a line in the edge (least squares)."""
    total = float(hist.sum())
    if total <= 0:
        return None
    cumulative = np.clip(np.cumsum(hist)[:-1] / total, 0.5 / total, 1 - 0.5 / total)
    probits = np.array([NormalDist().inv_cdf(float(c)) for c in cumulative])
    slope, intercept = np.polyfit(np.asarray(edges, dtype=np.float64), probits, 1)
    if not slope > 0:  # no increasing cdf fits these counts
        return None
    return -intercept / slope, 1.0 / slope


def binormal_auc(pos: np.ndarray, neg: np.ndarray, edges: Sequence[float]) -> float | None:
    """The AUC of the binormal ROC fitted to per-class binned counts (Dorfman & Alf, 1969):
    Phi((mu_pos - mu_neg) / sqrt(sd_pos^2 + sd_neg^2)). Counting ties inside a bin as one
    half biases a few bins' AUC low (-0.022 with 4 bins per class on heart, without noise);
    the fit does not. None below two edges or when no normal fits (the caller falls back)."""
    if len(edges) < 2:
        return None
    fit_pos, fit_neg = _normal_fit(pos, edges), _normal_fit(neg, edges)
    if fit_pos is None or fit_neg is None:
        return None
    (mean_pos, sd_pos), (mean_neg, sd_neg) = fit_pos, fit_neg
    return NormalDist().cdf((mean_pos - mean_neg) / math.hypot(sd_pos, sd_neg))


def _coarse(fine: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """The fine histogram's counts summed into the released bins."""
    cuts = [round((edge + HIST_RANGE) / FINE_BIN_WIDTH) for edge in edges]
    return np.add.reduceat(fine.astype(np.float64), [0, *cuts])


def _sum_histograms(histograms: list[np.ndarray | None]) -> np.ndarray:
    return np.sum([h for h in histograms if h is not None], axis=0)


def _share_at_or_above(hist: np.ndarray | None, first_bin: int) -> float | None:
    """The share of a class's (possibly noisy, clipped) counts in the bins of margins >= 0."""
    if hist is None:
        return None
    total = float(hist.sum())
    return float(hist[first_bin:].sum()) / total if total > 0 else None


@dataclass
class EvalStats:
    """Sufficient statistics of one evaluation; ``merge`` sums them across sites.

    From a DP release (``stats_from_counts``) the counts are noisy floats, the histograms
    are the coarse released bins and there is no loss (``loss_sum`` None: not released).
    """

    num_examples: int
    loss_sum: float | None
    correct: float
    hist_pos: np.ndarray | None = None
    hist_neg: np.ndarray | None = None
    fitted_auc: float | None = None  # a DP release's AUC, from the binormal fit to its bins
    # The decision threshold on the logit margin (the operating point: a record with margin
    # >= threshold is called positive), and the bin edges of the histograms: None, the fine
    # histogram's; a DP release's coarse edges otherwise. The threshold is one of the edges.
    threshold: float = 0.0
    edges: tuple[float, ...] | None = None

    @property
    def first_positive_bin(self) -> int:
        """The first histogram bin of margins >= the threshold."""
        if self.edges is None:
            return round((self.threshold + HIST_RANGE) / FINE_BIN_WIDTH)
        return self.edges.index(self.threshold) + 1

    def at_threshold(self, threshold: float) -> EvalStats:
        """The same evaluation read at another decision threshold (binary tasks; an edge of
        the histograms): sensitivity, specificity and the count of right answers move, AUC
        and loss do not. Post-processing of the same counts."""
        if self.hist_pos is None or self.hist_neg is None:
            raise ValueError("a decision threshold needs a binary task's margin histograms")
        moved = dataclasses.replace(self, threshold=float(threshold))
        first = moved.first_positive_bin
        right = float(self.hist_pos[first:].sum() + self.hist_neg[:first].sum())
        moved.correct = min(max(right, 0.0), self.num_examples)
        if self.edges is None:
            moved.correct = round(moved.correct)
        return moved

    @property
    def loss(self) -> float | None:
        if self.loss_sum is None:
            return None
        return self.loss_sum / max(self.num_examples, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.num_examples, 1)

    @property
    def auc(self) -> float | None:
        if self.fitted_auc is not None:
            return self.fitted_auc
        if self.hist_pos is None or self.hist_neg is None:
            return None
        return auc_from_histograms(self.hist_pos, self.hist_neg)

    @property
    def sensitivity(self) -> float | None:
        """Share of the positive records the model calls positive (binary tasks)."""
        return _share_at_or_above(self.hist_pos, self.first_positive_bin)

    @property
    def specificity(self) -> float | None:
        """Share of the negative records the model calls negative (binary tasks)."""
        called_positive = _share_at_or_above(self.hist_neg, self.first_positive_bin)
        return None if called_positive is None else 1.0 - called_positive

    @property
    def balanced_accuracy(self) -> float | None:
        """Mean of sensitivity and specificity: 0.5 for a constant classifier, whatever the
        prevalence (accuracy on a 90% positive cohort would say 0.9)."""
        sensitivity, specificity = self.sensitivity, self.specificity
        if sensitivity is None or specificity is None:
            return None
        return (sensitivity + specificity) / 2

    @staticmethod
    def merge(parts: list[EvalStats]) -> EvalStats:
        binary = all(p.hist_pos is not None and p.hist_neg is not None for p in parts)
        losses = [p.loss_sum for p in parts]
        return EvalStats(
            num_examples=sum(p.num_examples for p in parts),
            loss_sum=None if None in losses else sum(x for x in losses if x is not None),
            correct=sum(p.correct for p in parts),
            hist_pos=_sum_histograms([p.hist_pos for p in parts]) if binary and parts else None,
            hist_neg=_sum_histograms([p.hist_neg for p in parts]) if binary and parts else None,
        )

    def to_metrics(self) -> dict[str, int | float | bytes]:
        """Flower metrics record: only aggregate counts leave the site."""
        assert self.loss_sum is not None, "a DP release is sent as released counts"
        out: dict[str, int | float | bytes] = {
            "num_examples": self.num_examples,
            "loss_sum": float(self.loss_sum),
            "correct": int(self.correct),
        }
        if self.hist_pos is not None and self.hist_neg is not None:
            out["hist_pos"] = self.hist_pos.astype(np.int64).tobytes()
            out["hist_neg"] = self.hist_neg.astype(np.int64).tobytes()
        return out

    @classmethod
    def from_metrics(cls, metrics: dict[str, object]) -> EvalStats:
        pos, neg = metrics.get("hist_pos"), metrics.get("hist_neg")
        return cls(
            num_examples=int(metrics["num_examples"]),  # type: ignore[call-overload]
            loss_sum=float(metrics["loss_sum"]),  # type: ignore[arg-type]
            correct=int(metrics["correct"]),  # type: ignore[call-overload]
            hist_pos=np.frombuffer(pos, dtype=np.int64) if isinstance(pos, bytes) else None,
            hist_neg=np.frombuffer(neg, dtype=np.int64) if isinstance(neg, bytes) else None,
        )


def released_counts(stats: EvalStats, edges: Sequence[float]) -> np.ndarray:
    """The counts a DP site releases about its test split, each record in exactly one:
    binary tasks, the margin bins at ``edges`` of the positives then of the negatives;
    other tasks, [right, wrong]."""
    if stats.hist_pos is not None and stats.hist_neg is not None:
        return np.concatenate([_coarse(stats.hist_pos, edges), _coarse(stats.hist_neg, edges)])
    return np.array([stats.correct, stats.num_examples - stats.correct], dtype=np.float64)


def held_out_counts(
    test: EvalStats,
    validation: EvalStats | None,
    edges: Sequence[float],
    personal: EvalStats | None = None,
) -> np.ndarray:
    """One release over a site's held-out records: the test split's released counts, then
    the validation split's (when there is one), then the test split's counts under the site's
    personal model (at the final evaluation of a personalised run). The splits are disjoint:
    without the personal part each record is counted once (L2 sensitivity 1); with it a test
    record is counted twice, once per model (``fedmed.privacy.evaluation`` scales the noise)."""
    parts = [released_counts(test, edges)]
    if validation is not None:
        parts.append(released_counts(validation, edges))
    if personal is not None:
        parts.append(released_counts(personal, edges))
    return np.concatenate(parts)


def split_held_out(
    counts: np.ndarray, with_validation: bool, with_personal: bool = False
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(test, validation or None, personal-model test or None) counts of a (summed)
    ``held_out_counts`` vector: its parts are of equal length."""
    parts = np.split(counts, 1 + int(with_validation) + int(with_personal))
    test, rest = parts[0], parts[1:]
    validation = rest.pop(0) if with_validation else None
    personal = rest.pop(0) if with_personal else None
    return test, validation, personal


def released_size(num_classes: int, edges: Sequence[float]) -> int:
    """How many counts ``released_counts`` gives for a task."""
    return 2 * (len(edges) + 1) if num_classes == 2 else 2


def stats_from_counts(
    counts: np.ndarray, num_examples: int, edges: Sequence[float], threshold: float = 0.0
) -> EvalStats:
    """Figures from (summed, noisy) released counts and the public number of test records.

    Post-processing only. The counts are first moved, all by the same amount, so that they
    add up to the public number of records (the least-squares estimate under that known
    total): accuracy, a sum of half the counts, then carries half the noise variance
    (measured on heart at epsilon 1: error 0.031 instead of 0.044). Negative bins count as
    empty, the AUC is the binormal fit's (ties inside few bins would understate it; the
    bins' own AUC when no normal fits), and the count of right answers is kept within
    [0, num_examples].
    """
    counts = counts - (counts.sum() - num_examples) / len(counts)
    bins = len(edges) + 1
    if len(counts) == 2 * bins:
        pos, neg = counts[:bins], counts[bins:]
        first_positive = list(edges).index(threshold) + 1  # the first bin of margins >= it
        above = np.arange(bins) >= first_positive
        right = float(pos[above].sum() + neg[~above].sum())
        hists = np.clip(pos, 0.0, None), np.clip(neg, 0.0, None)
        fitted = binormal_auc(*hists, edges)
        right = min(max(right, 0.0), num_examples)
        return EvalStats(
            num_examples, None, right, *hists, fitted, float(threshold), tuple(map(float, edges))
        )
    if len(counts) != 2:
        raise ValueError(f"{len(counts)} released counts: expected 2 or {2 * bins}")
    return EvalStats(num_examples, None, min(max(float(counts[0]), 0.0), num_examples))


def clinical_metrics(figures: object) -> dict[str, float | None]:
    """Balanced accuracy, sensitivity and specificity of one evaluation (an ``EvalStats`` or
    a record of its figures; None: not a binary task)."""
    return {name: getattr(figures, name) for name in CLINICAL_METRICS}


def clinical_text(clinical: dict[str, float | None]) -> str:
    """The progress line's clinical figures: a constant classifier shows as sens 1.00, spec
    0.00 (or the reverse) and balanced accuracy 0.50, whatever its accuracy."""
    if clinical["balanced_accuracy"] is None:
        return ""
    return (
        f" | balanced {clinical['balanced_accuracy']:.4f} "
        f"(sens {clinical['sensitivity']:.2f}, spec {clinical['specificity']:.2f})"
    )
