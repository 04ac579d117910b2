"""A DP site's evaluation release: Gaussian noise on the counts of its test split.

The released vector (``fedmed.metrics.released_counts``) counts every test record exactly
once, so adding or removing one record changes it by at most 1 in L2 norm (the
``SENSITIVITY``); Gaussian noise of standard deviation ``noise_multiplier x SENSITIVITY`` on
every count is the Gaussian mechanism, accounted as one step at sample rate 1 by the same
Opacus accountant as DP-SGD, in the evaluation split's own composition. The noise is
calibrated once per run so that the run's planned evaluations reach the evaluation target.
"""

from __future__ import annotations

import functools
import math
import secrets

import numpy as np

from fedmed.config.schema import FedMedConfig, evaluation_rounds
from fedmed.privacy.accounting import DPSteps, calibrate_noise_multiplier
from fedmed.privacy.budget import SitePolicy, dp_config

SENSITIVITY = 1.0  # L2: one record is one count
# The final evaluation of a personalised run counts each test record twice (under the global
# and under the site's personal model): L2 sensitivity sqrt(2), and the noise scaled with it,
# so the release is accounted exactly as any other evaluation (one step at the same noise
# multiplier) and the planned calibration holds.
PERSONAL_SENSITIVITY = math.sqrt(2.0)
STATISTICS = "test-split counts: margin bins per class (binary) or right/wrong"


def released_statistics(
    num_classes: int, edges: list[float], validation: bool = False, personal: bool = False
) -> str:
    """What one evaluation releases, in words, for its ledger entry."""
    parts = ["test records", *(["validation records"] if validation else [])]
    if personal:
        parts.append("test records under the site's personal model")
    records = ", then ".join(parts) + ("," if len(parts) > 1 else "")
    if num_classes == 2:
        bins = ", ".join(f"{e:g}" for e in edges)
        return f"{records} per class in logit-margin bins with edges {bins}, plus noise"
    return f"{records} predicted right and wrong, plus noise"


def evaluation_steps(noise_multiplier: float) -> DPSteps:
    """One release of the Gaussian mechanism on the whole split, as the accountants compose it."""
    return DPSteps(noise_multiplier, 1.0, 1)


@functools.lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, delta: float, evaluations: int, accountant: str) -> float:
    return calibrate_noise_multiplier(target_epsilon, delta, 1.0, 1, accountant, rounds=evaluations)


def evaluation_noise_multiplier(cfg: FedMedConfig, policy: SitePolicy) -> float:
    """The noise of this run's evaluations: calibrated so that its planned evaluations reach
    ``privacy.evaluation_epsilon`` (null: ``privacy.target_epsilon``, else the site's budget)."""
    dp = dp_config(cfg)
    assert dp is not None, "only used with privacy=dp"
    target = dp.evaluation_epsilon or dp.target_epsilon or policy.budget_epsilon
    evaluations = len(evaluation_rounds(cfg))
    return _calibrated(target, policy.delta, evaluations, policy.accountant)


def add_noise(
    counts: np.ndarray,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
    sensitivity: float = SENSITIVITY,
) -> np.ndarray:
    """The counts plus independent Gaussian noise (std noise_multiplier x sensitivity each);
    ``rng`` None: fresh OS randomness (a seeded one only for simulated experiments)."""
    generator = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    noise = generator.normal(0.0, noise_multiplier * sensitivity, size=counts.shape)
    return counts.astype(np.float64) + noise
