"""Strategy registry: ``strategy.name`` -> a configured Flower legacy strategy.

Flower's legacy strategies are the ones SecAgg+ (``SecAggPlusWorkflow``) can drive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.common import Parameters
from flwr.server.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from fedmed.config.schema import FedMedConfig, StrategyName, sites_per_round


def _fit_config(server_round: int) -> dict[str, Any]:
    return {"server_round": server_round}


def _no_metrics(_results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per-site metrics are recorded by FederatedStrategy; nothing to merge here."""
    return {}


def sampling_fraction(per_round: int, num_sites: int) -> float:
    """The fraction for Flower's sampler, which takes int(available x fraction) sites.

    With every site connected this gives exactly ``per_round``; with some sites down (a
    crashed hospital) it samples proportionally fewer, never more than are connected, instead
    of waiting for the missing ones (Flower's sampler waits for ``min_available_clients``).
    """
    return (per_round + 0.5) / num_sites


def build_strategy(cfg: FedMedConfig, num_sites: int, initial: Parameters) -> Strategy:
    """The inner aggregation rule, sampling ``federation.fraction`` of the sites per round;
    a round goes ahead with at least ``federation.min_sites`` connected sites."""
    fed = cfg.federation
    needed = min(fed.min_sites, num_sites)
    common: dict[str, Any] = {
        "fraction_fit": sampling_fraction(sites_per_round(fed, num_sites), num_sites),
        "fraction_evaluate": fed.evaluate_fraction,
        "min_fit_clients": needed,
        "min_evaluate_clients": needed,
        "min_available_clients": needed,
        "initial_parameters": initial,
        "on_fit_config_fn": _fit_config,
        "on_evaluate_config_fn": _fit_config,
        "accept_failures": True,
        "fit_metrics_aggregation_fn": _no_metrics,
        "evaluate_metrics_aggregation_fn": _no_metrics,
    }
    s = cfg.strategy
    builders: dict[StrategyName, Callable[[], Strategy]] = {
        StrategyName.fedavg: lambda: FedAvg(**common),
        StrategyName.fedprox: lambda: FedProx(proximal_mu=s.proximal_mu, **common),
        StrategyName.fedadam: lambda: FedAdam(
            eta=s.server_lr, beta_1=s.beta1, beta_2=s.beta2, tau=s.tau, **common
        ),
        StrategyName.fedyogi: lambda: FedYogi(
            eta=s.server_lr, beta_1=s.beta1, beta_2=s.beta2, tau=s.tau, **common
        ),
    }
    return builders[s.name]()
