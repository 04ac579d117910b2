"""SecAgg+ parameters resolved for the sites actually sampled per round, and their checks.

Flower's ``SecAggPlusWorkflow`` accepts settings that fail later (too few sites, shares above
the sampled count) or overflow silently (sum of quantized values above the 2^32 modulus);
they are refused here, before any training, with the offending key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmed.config.schema import MODULUS_RANGE, FedMedConfig, SecAggPlusConfig, sites_per_round
from fedmed.errors import ConfigError


@dataclass(frozen=True)
class SecAggParams:
    """The protocol settings of every round of one run."""

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout: float | None
    # num_shares was left to default (one share per sampled site): it then follows the sites
    # actually sampled, fewer when some are down, and the threshold keeps its proportion.
    shares_follow_sampled: bool = False

    def max_quantization_error(self, weights: list[int]) -> float:
        """Bound on |aggregate - exact weighted mean| per value, for these site weights.

        Each site's weighted value is stochastically rounded to a grid of step
        2 * clipping_range / quantization_range; the sum of k such errors is divided by the
        sum of the weights' ratios (num_examples / max_weight).
        """
        total = sum(weights)
        if total <= 0:
            return math.inf
        step = 2.0 * self.clipping_range / self.quantization_range
        return len(weights) * step * self.max_weight / total


def secagg_config(cfg: FedMedConfig) -> SecAggPlusConfig | None:
    """The run's SecAgg+ settings, or None for ``secagg=off``."""
    return cfg.secagg if isinstance(cfg.secagg, SecAggPlusConfig) else None


def resolve_secagg(cfg: FedMedConfig, total_sites: int) -> SecAggParams | None:
    """Shares and threshold for the sampled sites; refuses settings that cannot work."""
    sa = secagg_config(cfg)
    if sa is None:
        return None
    sampled = sites_per_round(cfg.federation, total_sites)
    if sampled < 3:
        raise ConfigError(
            "federation.min_sites",
            cfg.federation.min_sites,
            f"SecAgg+ needs at least 3 sites per round; this federation samples {sampled} of "
            f"{total_sites} (raise federation.fraction / federation.min_sites)",
        )
    shares = sa.num_shares if sa.num_shares is not None else sampled
    if shares > sampled:
        raise ConfigError(
            "secagg.num_shares", shares, f"at most the {sampled} sites sampled per round"
        )
    threshold = (
        sa.reconstruction_threshold
        if sa.reconstruction_threshold is not None
        else max(2, math.ceil(2 * shares / 3))
    )
    if threshold > shares:
        raise ConfigError(
            "secagg.reconstruction_threshold", threshold, f"at most secagg.num_shares={shares}"
        )
    if sampled * sa.quantization_range >= MODULUS_RANGE:
        raise ConfigError(
            "secagg.quantization_range",
            sa.quantization_range,
            f"< 2^32 / {sampled} sampled sites = {MODULUS_RANGE // sampled}: the masked sum "
            "would overflow the 2^32 modulus",
        )
    return SecAggParams(
        shares,
        threshold,
        sa.clipping_range,
        sa.quantization_range,
        sa.max_weight,
        sa.timeout if sa.timeout is not None else cfg.federation.round_timeout,
        shares_follow_sampled=sa.num_shares is None,
    )
