"""The exact evaluation of a simulated run's global model, for the researcher who holds the data.

Under DP the federation itself never learns exact figures: each site releases only noisy
counts (``fedmed.privacy.evaluation``). In a simulation the researcher holds every site's data,
so the saved global model can be evaluated exactly on the union of the sites' test splits, to
measure what the private evaluation's noise costs, or to compare models. This reads records of
every site: never part of a federation, and nothing it computes is sent anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fedmed.config.schema import FedMedConfig
from fedmed.coordinator.app import GLOBAL_MODEL_FILE
from fedmed.data import data_schema, load_site, num_sites
from fedmed.errors import FedMedError
from fedmed.metrics import EvalStats
from fedmed.models import build_loss, build_model
from fedmed.operating_point import OPERATING_POINT_FILE
from fedmed.runs.compose import compose_config
from fedmed.train import evaluate

RUN_OVERRIDES = ".hydra/overrides.yaml"  # what `fedmed simulate` was given (Hydra writes it)


def run_config(run_dir: Path) -> FedMedConfig:
    """The config of a run of ``fedmed simulate``, composed again from its overrides."""
    path = run_dir / RUN_OVERRIDES
    if not path.is_file():
        raise FedMedError(f"{run_dir}: no {RUN_OVERRIDES} (not the folder of a fedmed run)")
    overrides = [str(o) for o in OmegaConf.load(path)]
    return compose_config([o for o in overrides if not o.startswith("hydra.")])


def exact_evaluation(run_dir: Path, cfg: FedMedConfig | None = None) -> EvalStats:
    """The run's saved global model on every site's test split, exactly (merged), read at
    its saved operating point; ``cfg`` None: the run's own, from its overrides."""
    if not (run_dir / GLOBAL_MODEL_FILE).is_file():
        raise FedMedError(f"{run_dir}: no {GLOBAL_MODEL_FILE} (not the folder of a run)")
    cfg = cfg if cfg is not None else run_config(run_dir)
    model = build_model(cfg.model.name, data_schema(cfg), cfg.seed, cfg.audit.canaries)
    model.load_state_dict(torch.load(run_dir / GLOBAL_MODEL_FILE, weights_only=True))
    loss_fn = build_loss(cfg.model.name)
    sites = [load_site(cfg, index) for index in range(num_sites(cfg))]
    merged = EvalStats.merge(
        [evaluate(model, loss_fn, s.x_test, s.y_test, s.num_classes) for s in sites]
    )
    threshold = saved_threshold(run_dir)
    return merged.at_threshold(threshold) if threshold else merged


def saved_threshold(run_dir: Path) -> float:
    """The operating point saved with the run's global model (0 for a run without one)."""
    path = run_dir / OPERATING_POINT_FILE
    if not path.is_file():
        return 0.0
    return float(json.loads(path.read_text())["threshold"])
