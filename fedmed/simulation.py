"""Run a whole federation on one machine with Flower's Ray simulation engine."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fedmed.config import FedMedConfig
from fedmed.coordinator import checkpoint
from fedmed.coordinator.app import make_server_app
from fedmed.data import load_site, num_sites
from fedmed.errors import FedMedError, SiteError
from fedmed.privacy.budget import check_delta, dp_config, site_policy
from fedmed.site_app import make_client_app

# One CPU per simulated site: asking Ray for more CPUs than the machine has hangs. A worker
# process that dies (killed, out of memory) is restarted by Ray; the message it held fails
# and is recorded, and is never retried (a retried fit would train and spend privacy twice).
BACKEND_CONFIG: dict[str, Any] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 0},
    "init_args": {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    },
}


def prepare_engine() -> None:
    """Keep Flower's INFO chatter out of the progress output (FEDMED_VERBOSE=1 shows it), and
    set Ray up for CPU-only workers."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB migrations
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # under Hydra every Flower line would print twice
    if not os.environ.get("FEDMED_VERBOSE"):
        flwr_logger.setLevel(logging.CRITICAL)  # site failures are reported by the recorder
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def check_privacy_setup(cfg: FedMedConfig, output_dir: Path) -> None:
    """Refuse, before any training, a delta that some site's record count cannot support."""
    if dp_config(cfg) is None:
        return
    problems = []
    for index in range(num_sites(cfg)):
        policy = site_policy(cfg, index, output_dir / "ledgers", use_kit_ledger=False)
        try:
            check_delta(policy.site, policy.delta, len(load_site(cfg, index).y_train))
        except SiteError as err:
            problems.append(str(err))
    if problems:
        raise FedMedError("; ".join(problems))


def simulate(cfg: FedMedConfig, output_dir: Path) -> dict[str, Any]:
    """Run every round and return the summary written to ``output_dir/summary.json``."""
    check_privacy_setup(cfg, output_dir)
    if cfg.resume:
        checkpoint.load(output_dir)  # a missing or foreign checkpoint fails here, in one line
    prepare_engine()
    from flwr.simulation import run_simulation

    output_dir.mkdir(parents=True, exist_ok=True)
    summary_path = output_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    run_simulation(
        server_app=make_server_app(cfg, output_dir),
        client_app=make_client_app(cfg, output_dir),
        num_supernodes=num_sites(cfg),
        backend_config=BACKEND_CONFIG,
    )
    if not summary_path.is_file():
        raise FedMedError(
            f"the coordinator stopped without writing {summary_path}; rerun with FEDMED_VERBOSE=1"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary
