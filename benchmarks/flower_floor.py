"""Flower's own floor (issue 7): the same federation, with sites that do no work.

overhead.py runs this beside each `fedmed simulate` case: the same number of sites and model
arrays, Flower's legacy DefaultWorkflow with FedAvg (training then evaluation every round), the
same Ray backend settings and the same reply poll as the coordinator, but a ClientApp that
returns the global weights unchanged and evaluates nothing. Its round time is what Flower and
Ray cost for one round's messages, whatever the sites do: the part of a `fedmed simulate`
round that no change to fedmed can remove.

Usage: .venv/bin/python benchmarks/flower_floor.py OVERRIDES...
Prints one JSON line: the seconds of each round (configure_fit to aggregate_evaluate, the
coordinator's own round clock).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from fedmed.coordinator.grid import SIMULATION_REPLY_POLL_S
from fedmed.data import data_schema, num_sites
from fedmed.models import build_model
from fedmed.runs.compose import compose_config
from fedmed.runs.ray_engine import backend_config, cluster_address, prepare_engine
from fedmed.train import get_weights


class EchoSite(NumPyClient):
    """A site that trains nothing: it sends the global weights back."""

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return parameters, 1, {}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        return 0.0, 1, {}


class TimedFedAvg(FedAvg):
    """FedAvg that times each round as fedmed's recorder does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_seconds: list[float] = []
        self._started = 0.0

    def configure_fit(self, *args: Any, **kwargs: Any) -> Any:
        self._started = time.perf_counter()
        return super().configure_fit(*args, **kwargs)

    def aggregate_evaluate(self, *args: Any, **kwargs: Any) -> Any:
        aggregated = super().aggregate_evaluate(*args, **kwargs)
        self.round_seconds.append(time.perf_counter() - self._started)
        return aggregated


def echo_site(context: Context) -> Client:
    return EchoSite().to_client()


def main() -> None:
    cfg = compose_config(sys.argv[1:])
    sites = num_sites(cfg)
    weights = get_weights(build_model(cfg.model.name, data_schema(cfg), cfg.seed))
    strategy = TimedFedAvg(
        min_available_clients=sites,  # waits for every node before round 1
        min_fit_clients=sites,
        min_evaluate_clients=sites,
        initial_parameters=ndarrays_to_parameters(weights),
    )
    server_app = ServerApp()

    @server_app.main()
    def coordinator(grid: Grid, context: Context) -> None:
        grid.pull_interval = SIMULATION_REPLY_POLL_S  # type: ignore[attr-defined]
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=cfg.federation.rounds), strategy=strategy
        )
        DefaultWorkflow()(grid, legacy)

    prepare_engine()
    run_simulation(
        server_app=server_app,
        client_app=ClientApp(client_fn=echo_site),
        num_supernodes=sites,
        backend_config=backend_config(cfg.engine, cluster_address(cfg.engine)),
    )
    if len(strategy.round_seconds) != cfg.federation.rounds:
        raise SystemExit(f"only {len(strategy.round_seconds)} rounds completed")
    print(json.dumps(strategy.round_seconds), flush=True)


if __name__ == "__main__":
    main()
