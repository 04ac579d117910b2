"""The coordinator ServerApp: Flower's legacy workflow around the fedmed strategy wrapper."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import ServerApp

from fedmed.config.schema import FedMedConfig, evaluation_rounds
from fedmed.coordinator import checkpoint
from fedmed.coordinator.federated import FederatedStrategy, FederationStopped
from fedmed.coordinator.grid import (
    DEPLOYMENT_REPLY_POLL_S,
    SIMULATION_REPLY_POLL_S,
    ObservedGrid,
)
from fedmed.coordinator.recorder import RunRecorder
from fedmed.coordinator.secagg import RecordedSecAggPlusWorkflow
from fedmed.coordinator.secure_evaluation import SecureEvaluationWorkflow
from fedmed.coordinator.strategies import build_strategy
from fedmed.data import data_schema, model_columns, num_sites, site_names
from fedmed.models import build_model
from fedmed.models.card import ModelCard, write_card
from fedmed.privacy.budget import dp_config
from fedmed.secure.params import resolve_secagg
from fedmed.train import get_weights, set_weights

log = logging.getLogger(__name__)

GLOBAL_MODEL_FILE = "global_model.pt"


def _reply_poll_interval(grid: Grid) -> float:
    """Simulation answers a poll in-process; deployment's poll is a request to the SuperLink."""
    from flwr.superlink.grid import InMemoryGrid

    return SIMULATION_REPLY_POLL_S if isinstance(grid, InMemoryGrid) else DEPLOYMENT_REPLY_POLL_S


def run_coordinator(
    grid: Grid,
    context: Context,
    cfg: FedMedConfig,
    output_dir: Path,
    receipt_key: Path | None = None,
    registry: dict[int, str] | None = None,
) -> dict:
    """Run all rounds, then write the global model, metrics.csv, summary.json and accuracy.png.

    A checkpoint is saved after every round; ``resume=true`` continues from it. Receipts of
    the sites' ledger entries are signed with ``receipt_key`` (default: one in output_dir).
    In deployment, ``registry`` (node id -> site, coordinator/registry.py) names the sites
    and says which nodes may be sampled; simulation has none.
    """
    random.seed(cfg.seed)  # Flower's client sampling uses the `random` module
    np.random.seed(cfg.seed)
    total_sites = num_sites(cfg)
    recorder = RunRecorder(cfg, output_dir, total_sites, receipt_key=receipt_key)
    model = build_model(cfg.model.name, data_schema(cfg), cfg.seed, cfg.audit.canaries)
    resumed = checkpoint.load(output_dir) if cfg.resume else None
    weights = resumed.global_weights if resumed is not None else get_weights(model)
    inner = build_strategy(cfg, total_sites, ndarrays_to_parameters(weights))
    done = 0
    if resumed is not None:
        checkpoint.restore(resumed, inner, recorder)
        recorder.extra["resumed_after_round"] = done = resumed.round
        log.info(f"resuming after round {done} from {output_dir}")

    def save_checkpoint(server_round: int) -> None:
        assert strategy.global_weights is not None
        state = checkpoint.capture(
            server_round, strategy.global_weights, inner, recorder, strategy.averaged_weights
        )
        checkpoint.save(state, output_dir)

    strategy = FederatedStrategy(
        inner,
        recorder,
        min(cfg.federation.min_sites, total_sites),
        evaluation_rounds(cfg),
        round_offset=done,
        on_round_done=save_checkpoint,
        average_decay=cfg.strategy.average_decay,
    )
    strategy.global_weights = weights
    if resumed is not None:
        strategy.averaged_weights = resumed.averaged_weights
    legacy = LegacyContext(
        context,
        config=ServerConfig(
            num_rounds=max(cfg.federation.rounds - done, 0),
            round_timeout=cfg.federation.round_timeout,
        ),
        strategy=strategy,
    )
    secure = resolve_secagg(cfg, total_sites)
    recorder.secure.params = secure
    fit_workflow = (
        RecordedSecAggPlusWorkflow(secure, strategy, recorder) if secure is not None else None
    )
    # Under DP the sites' noisy counts travel through SecAgg+ too; without DP the exact
    # per-site evaluation stays as it is (privacy=none claims no guarantee).
    evaluate_workflow = (
        SecureEvaluationWorkflow(secure, strategy, recorder)
        if secure is not None and dp_config(cfg) is not None
        else None
    )
    try:
        if done < cfg.federation.rounds:
            observed = ObservedGrid(
                grid,
                recorder,
                round_offset=done,
                round_timeout=cfg.federation.round_timeout,
                reply_poll_s=_reply_poll_interval(grid),
                registry=registry,
                run_sites=site_names(cfg) if registry is not None else None,
            )
            observed.wait_for_sites(total_sites, cfg.federation.connect_timeout)
            workflow = DefaultWorkflow(fit_workflow, evaluate_workflow)
            workflow(observed, legacy)  # type: ignore[arg-type]
    except FederationStopped as stop:
        recorder.stop(str(stop), stop.status)
    finally:
        evaluated = strategy.evaluated_weights
        assert evaluated is not None
        set_weights(model, evaluated)  # the moving average when strategy.average_decay is set
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), output_dir / GLOBAL_MODEL_FILE)
        write_card(model_card(cfg, simulated=registry is None), output_dir / GLOBAL_MODEL_FILE)
        summary = recorder.write()
    return summary


def model_card(cfg: FedMedConfig, simulated: bool) -> ModelCard:
    """What the saved global model is (fedmed explain rebuilds it from this)."""
    schema = data_schema(cfg)
    return ModelCard(
        model=cfg.model.name.value,
        dataset=cfg.dataset.name,
        input_shape=schema.input_shape,
        num_classes=schema.num_classes,
        columns=model_columns(cfg),
        simulated=simulated,
        seed=cfg.seed,
    )


def make_server_app(
    cfg: FedMedConfig, output_dir: Path, on_done: Callable[[], None] | None = None
) -> ServerApp:
    """ServerApp for an in-process simulation whose config is known up front.

    ``on_done`` runs once the coordinator has finished (summary written or not): the
    simulation uses it to end the sites' work that no round waits for any more.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_coordinator(grid, context, cfg, output_dir)
        finally:
            if on_done is not None:
                on_done()

    return app
