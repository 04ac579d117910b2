"""Run a whole federation with Flower's Ray simulation engine (this machine, or a Ray cluster)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from fedmed.config.schema import FedMedConfig
from fedmed.coordinator import checkpoint
from fedmed.coordinator.app import make_server_app
from fedmed.data import load_site, num_sites
from fedmed.errors import FedMedError, SiteError
from fedmed.privacy.budget import check_delta, dp_config, site_policy
from fedmed.runs.ray_engine import (
    backend_config,
    cluster_address,
    end_abandoned_work,
    prepare_engine,
)
from fedmed.site.app import make_client_app
from fedmed.site.policy import SiteRuntime, site_setup


def check_privacy_setup(cfg: FedMedConfig, output_dir: Path) -> None:
    """Refuse, before any training, a delta that some site's record count cannot support."""
    if dp_config(cfg) is None:
        return
    problems = []
    runtime = SiteRuntime("check", output_dir / "ledgers", deployed=False)
    for index in range(num_sites(cfg)):
        try:
            policy = site_policy(site_setup(cfg, index, runtime).kit)
        except SiteError:
            continue  # the site itself refuses the run: the coordinator records it
        try:
            check_delta(policy.site, policy.delta, len(load_site(cfg, index).y_train))
        except SiteError as err:
            problems.append(str(err))
    if problems:
        raise FedMedError("; ".join(problems))


def simulate(cfg: FedMedConfig, output_dir: Path) -> dict[str, Any]:
    """Run every round and return the summary written to ``output_dir/summary.json``."""
    address = cluster_address(cfg.engine)  # a wrong address fails here, before any work
    backend = backend_config(cfg.engine, address)
    check_privacy_setup(cfg, output_dir)
    if cfg.resume:
        checkpoint.load(output_dir)  # a missing or foreign checkpoint fails here, in one line
    prepare_engine()
    from flwr.simulation import run_simulation

    output_dir.mkdir(parents=True, exist_ok=True)
    summary_path = output_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    engine_done = threading.Event()
    try:
        run_simulation(
            server_app=make_server_app(
                cfg, output_dir, on_done=lambda: end_abandoned_work(engine_done, address)
            ),
            client_app=make_client_app(cfg, output_dir),
            num_supernodes=num_sites(cfg),
            backend_config=backend,
        )
    finally:
        engine_done.set()
    if not summary_path.is_file():
        raise FedMedError(
            f"the coordinator stopped without writing {summary_path}; rerun with FEDMED_VERBOSE=1"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary
