"""Non-federated references on the same site splits: pooled (upper bound) and local-only.

Both train for ``federation.rounds x federation.local_epochs`` epochs with the same model and
optimiser settings as the federation, and evaluate after every round-equivalent on the same
per-site test splits, so ``summary.json`` is directly comparable with ``fedmed simulate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config.schema import BaselineConfig, BaselineMode, FedMedConfig
from fedmed.coordinator.recorder import RunRecorder
from fedmed.data import SiteData, load_site, num_sites
from fedmed.errors import ConfigError
from fedmed.metrics import EvalStats
from fedmed.models import build_loss, build_model, class_weights
from fedmed.privacy.budget import dp_config
from fedmed.protocol import EvaluateReport, FitReport
from fedmed.train import TrainSettings, evaluate, make_loader, round_seed, train_local


def _train_rounds(
    cfg: FedMedConfig,
    x: np.ndarray,
    y: np.ndarray,
    eval_sites: list[SiteData],
    on_round: Any,
) -> None:
    """Train one model on (x, y); after each round-equivalent call ``on_round(round, stats)``."""
    model = build_model(cfg.model.name, eval_sites[0].schema, cfg.seed)
    loss_fn = build_loss(cfg.model.name)
    num_classes = eval_sites[0].num_classes
    train_loss_fn = build_loss(
        cfg.model.name, class_weights(cfg.model.class_weight, y, num_classes)
    )
    settings = TrainSettings.from_config(cfg)
    for server_round in range(1, cfg.federation.rounds + 1):
        loader = make_loader(x, y, cfg.model.batch_size, round_seed(cfg.seed, server_round))
        train_loss = train_local(model, train_loss_fn, loader, settings).loss
        stats = {
            site.name: evaluate(model, loss_fn, site.x_test, site.y_test, site.num_classes)
            for site in eval_sites
        }
        on_round(server_round, train_loss, stats)


def _fit(site: SiteData, loss: float) -> FitReport:
    return FitReport(site.name, len(site.y_train), loss)


def run_baseline(cfg: BaselineConfig, output_dir: Path) -> dict[str, Any]:
    """Train the baseline named by ``cfg.mode`` and write the same outputs as a federated run."""
    if dp_config(cfg) is not None:
        raise ConfigError("privacy", "dp", "none: baselines are the non-private references")
    sites = [load_site(cfg, i) for i in range(num_sites(cfg))]
    recorder = RunRecorder(cfg, output_dir, len(sites))
    recorder.extra.update({"mode": cfg.mode.value, "strategy": f"baseline-{cfg.mode.value}"})
    if cfg.mode is BaselineMode.pooled:
        x = np.concatenate([s.x_train for s in sites])
        y = np.concatenate([s.y_train for s in sites])

        def pooled_round(server_round: int, loss: float, stats: dict[str, EvalStats]) -> None:
            for site in sites:
                recorder.record_fit(server_round, len(site.y_train), _fit(site, loss))
            recorder.record_evaluation(server_round, _reports(stats))
            recorder.start_round()

        recorder.start_round()
        _train_rounds(cfg, x, y, sites, pooled_round)
    else:
        per_round: dict[int, dict[str, EvalStats]] = {}
        for site in sites:

            def local_round(
                server_round: int, loss: float, stats: dict[str, EvalStats], site: SiteData = site
            ) -> None:
                recorder.record_fit(server_round, len(site.y_train), _fit(site, loss))
                per_round.setdefault(server_round, {}).update(stats)

            _train_rounds(cfg, site.x_train, site.y_train, [site], local_round)
        recorder.start_round()
        for server_round in sorted(per_round):
            recorder.record_evaluation(server_round, _reports(per_round[server_round]))
    return recorder.write()


def _reports(stats: dict[str, EvalStats]) -> list[EvaluateReport]:
    """The baselines' exact evaluations, as a non-private site reports them."""
    return [EvaluateReport(site, site_stats) for site, site_stats in stats.items()]
