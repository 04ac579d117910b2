"""Run a whole federation on one machine with Flower's Ray simulation engine."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from fedmed.config import FedMedConfig
from fedmed.coordinator import checkpoint
from fedmed.coordinator.app import make_server_app
from fedmed.data import load_site, num_sites
from fedmed.errors import FedMedError, SiteError
from fedmed.privacy.budget import check_delta, dp_config, site_policy
from fedmed.process_tree import command_line, descendants
from fedmed.site_app import make_client_app
from fedmed.site_policy import SiteRuntime, site_setup

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

# When the coordinator has finished, Flower's engine stops within about a second unless a
# site is still working on a message (a round that timed out); such workers are ended after
# ABANDONED_WORK_GRACE_S (checked again each second, REAP_ATTEMPTS times).
ABANDONED_WORK_GRACE_S = 2.0
REAP_ATTEMPTS = 30
BUSY_WORKER_TITLE = b"ray::ClientAppActor.run"


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


def _busy_site_workers(root: int) -> list[int]:
    """This process's own Ray workers that are running a site's message (Ray titles a
    worker ``ray::ClientAppActor.run`` while the actor runs one, ``ray::ClientAppActor``
    when idle). Only descendants of ``root``: the Ray instance this run started."""
    return [pid for pid in descendants(root) if command_line(pid).startswith(BUSY_WORKER_TITLE)]


def _reap(engine_done: threading.Event) -> None:
    """After a grace period, end the workers still busy until Flower's engine has stopped."""
    if engine_done.wait(ABANDONED_WORK_GRACE_S):
        return
    for _ in range(REAP_ATTEMPTS):
        busy = _busy_site_workers(os.getpid())
        if engine_done.is_set():  # stopped meanwhile: the next run's workers are not ours
            return
        for pid in busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if busy:
            print(
                f"simulation: ended {len(busy)} site worker(s) still running work of a round "
                "that timed out (federation.round_timeout)",
                flush=True,
            )
        if engine_done.wait(1.0):
            return


def _end_abandoned_work(engine_done: threading.Event) -> None:
    """Once the coordinator is done, a site message still running belongs to a round that
    timed out. Flower's Ray engine waits for each one without a timeout before it stops
    (``ray.get``), so a site stuck in its work would keep the process and its workers alive.
    Such workers are killed like a crash (a site's ledger survives a crash: each entry is
    durable before its update leaves); Ray then fails that message, and the engine stops."""
    if sys.platform.startswith("linux"):  # /proc; elsewhere the engine waits for the sites
        threading.Thread(target=_reap, args=(engine_done,), daemon=True).start()


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
    engine_done = threading.Event()
    try:
        run_simulation(
            server_app=make_server_app(
                cfg, output_dir, on_done=lambda: _end_abandoned_work(engine_done)
            ),
            client_app=make_client_app(cfg, output_dir),
            num_supernodes=num_sites(cfg),
            backend_config=BACKEND_CONFIG,
        )
    finally:
        engine_done.set()
    if not summary_path.is_file():
        raise FedMedError(
            f"the coordinator stopped without writing {summary_path}; rerun with FEDMED_VERBOSE=1"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary
