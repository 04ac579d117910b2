"""The DP mechanisms a site runs, and which of its records each one touches.

A site's records fall in two disjoint splits: the training split, which DP-SGD touches, and
the evaluation (test) split, whose statistics the site releases through a Gaussian mechanism
(``fedmed.privacy.evaluation``). Each split composes its own mechanisms; one record is in
exactly one split, so the guarantee for "one record of this site" is the larger of the two
splits' lifetime epsilons (``record_epsilon``), and that is what the site's budget bounds.
"""

from __future__ import annotations

from collections.abc import Mapping

TRAIN = "train"
EVALUATION = "evaluation"
SPLITS = (TRAIN, EVALUATION)

DP_SGD = "dp_sgd_poisson_gaussian"
EVALUATION_COUNTS = "gaussian_evaluation_counts"
SPLIT_OF = {DP_SGD: TRAIN, EVALUATION_COUNTS: EVALUATION}


def record_epsilon(split_epsilons: Mapping[str, float]) -> float:
    """Epsilon for one record of the site: the worse of its splits (0 before any release)."""
    return max(split_epsilons.values(), default=0.0)
