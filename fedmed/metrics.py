"""Evaluation statistics that sites can share: counts, loss sums and score histograms.

Sites never send per-record predictions. For binary tasks each site sends a histogram of its
decision margins per true class; summed histograms give the AUC of the union of all test
splits, exact up to ties inside one bin (bin width 0.01 in logit space).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIST_RANGE = 16.0
HIST_BINS = 3200


def margin_histogram(margins: np.ndarray) -> np.ndarray:
    """Counts of logit margins in fixed bins over [-16, 16] (values outside go to the end bins)."""
    clipped = np.clip(margins, -HIST_RANGE, HIST_RANGE - 1e-9)
    edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
    return np.histogram(clipped, bins=edges)[0].astype(np.int64)


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """ROC AUC from per-class score histograms (ties within a bin count one half)."""
    total_pos, total_neg = int(pos.sum()), int(neg.sum())
    if total_pos == 0 or total_neg == 0:
        return None
    neg_below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    wins = float((pos * neg_below).sum() + 0.5 * (pos * neg).sum())
    return wins / (total_pos * total_neg)


def _sum_histograms(histograms: list[np.ndarray | None]) -> np.ndarray:
    return np.sum([h for h in histograms if h is not None], axis=0)


@dataclass
class EvalStats:
    """Sufficient statistics of one evaluation; ``merge`` sums them across sites."""

    num_examples: int
    loss_sum: float
    correct: int
    hist_pos: np.ndarray | None = None
    hist_neg: np.ndarray | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.num_examples, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.num_examples, 1)

    @property
    def auc(self) -> float | None:
        if self.hist_pos is None or self.hist_neg is None:
            return None
        return auc_from_histograms(self.hist_pos, self.hist_neg)

    @staticmethod
    def merge(parts: list[EvalStats]) -> EvalStats:
        binary = all(p.hist_pos is not None and p.hist_neg is not None for p in parts)
        return EvalStats(
            num_examples=sum(p.num_examples for p in parts),
            loss_sum=sum(p.loss_sum for p in parts),
            correct=sum(p.correct for p in parts),
            hist_pos=_sum_histograms([p.hist_pos for p in parts]) if binary and parts else None,
            hist_neg=_sum_histograms([p.hist_neg for p in parts]) if binary and parts else None,
        )

    def to_metrics(self) -> dict[str, int | float | bytes]:
        """Flower metrics record: only aggregate counts leave the site."""
        out: dict[str, int | float | bytes] = {
            "num_examples": self.num_examples,
            "loss_sum": float(self.loss_sum),
            "correct": self.correct,
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
