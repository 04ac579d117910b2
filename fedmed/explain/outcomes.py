"""Which of a site's test records an explanation shows: chosen by outcome at the operating
point (true/false positives/negatives, the clearest cases first), or the records asked for."""

from __future__ import annotations

import numpy as np

OUTCOMES = ("true positive", "false positive", "true negative", "false negative")


def outcome(score: float, label: int, threshold: float) -> str:
    called = score >= threshold
    if called:
        return OUTCOMES[0] if label == 1 else OUTCOMES[1]
    return OUTCOMES[2] if label == 0 else OUTCOMES[3]


def by_outcome(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    per_outcome: int,
    requested: tuple[int, ...] = (),
) -> dict[str, list[int]]:
    """Records by outcome: the ``requested`` ones (test-record indices, already checked), or
    up to ``per_outcome`` of each outcome, the most confident first (largest distance of the
    margin from the threshold)."""
    if requested:
        return {
            o: [r for r in requested if outcome(scores[r], labels[r], threshold) == o]
            for o in OUTCOMES
        }
    chosen = {}
    for name in OUTCOMES:
        rows = np.array(
            [r for r in range(len(scores)) if outcome(scores[r], labels[r], threshold) == name],
            dtype=np.int64,
        )
        order = rows[np.argsort(-np.abs(scores[rows] - threshold), kind="stable")]
        chosen[name] = [int(r) for r in order[:per_outcome]]
    return chosen
