"""The empirical audit's canaries: which exist, which were included, and their records.

Everything follows from ``audit.seed``, so the audited site (which inserts the included
canaries into its training data) and the auditor (who scores them afterwards) agree without
exchanging anything. Each canary is included independently with probability 1/2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fedmed.config.schema import AuditConfig, FedMedConfig
from fedmed.data.types import SiteData

SENTINEL = -1.0e4  # no standardised feature or pixel takes this value


@dataclass(frozen=True)
class CanaryDraw:
    """Each canary's label and whether it was put into the audited site's training data."""

    labels: np.ndarray
    included: np.ndarray


def draw_canaries(audit: AuditConfig, num_classes: int) -> CanaryDraw:
    rng = np.random.default_rng([audit.seed, 0xCA9A])
    labels = rng.integers(0, num_classes, size=audit.canaries)
    included = rng.random(audit.canaries) < 0.5
    return CanaryDraw(labels, included)


def canary_inputs(shape: tuple[int, ...], indices: np.ndarray) -> np.ndarray:
    """Canary records: the sentinel in every feature, the canary's row number in the second."""
    x = np.full((len(indices), int(np.prod(shape))), SENTINEL, dtype=np.float32)
    x[:, 1] = indices + 1
    return x.reshape(len(indices), *shape)


def with_canaries(data: SiteData, cfg: FedMedConfig) -> SiteData:
    """The site's data with the included canaries appended to its training split."""
    draw = draw_canaries(cfg.audit, data.num_classes)
    chosen = np.flatnonzero(draw.included)
    x = canary_inputs(tuple(data.x_train.shape[1:]), chosen).astype(data.x_train.dtype)
    return dataclasses.replace(
        data,
        x_train=np.concatenate([data.x_train, x]),
        y_train=np.concatenate([data.y_train, draw.labels[chosen].astype(data.y_train.dtype)]),
    )
