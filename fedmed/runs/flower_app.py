"""The Flower App entry points for ``flwr run .``: the same coordinator and sites as simulate.

The run config (keys in ``fedmed.runs.flower_project``) carries ``overrides``, a string of
Hydra overrides, ``output-dir`` and ``site-registry``; both apps compose the identical typed
config from it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.server import Grid
from flwr.serverapp import ServerApp

from fedmed.config.schema import FedMedConfig
from fedmed.errors import ConfigError
from fedmed.runs.compose import compose_config
from fedmed.runs.flower_project import (
    OUTPUT_DIR_KEY,
    OVERRIDES_KEY,
    REGISTRY_KEY,
    RUN_CONFIG_DEFAULTS,
)
from fedmed.site.app import make_site_app
from fedmed.terminal import show_on_terminal


def config_from_run_config(context: Context) -> FedMedConfig:
    """Compose the run's typed config from the ``overrides`` run-config string."""
    cfg = compose_config(shlex.split(str(context.run_config.get(OVERRIDES_KEY, ""))))
    if cfg.engine.address is not None:  # Flower's SuperLink, not fedmed, runs this engine
        raise ConfigError(
            "engine.address", cfg.engine.address, "unset under flwr run (`fedmed simulate` only)"
        )
    return cfg


def run_dir_from_run_config(context: Context) -> Path:
    """The run's output folder (``output-dir``), absolute."""
    folder = str(context.run_config.get(OUTPUT_DIR_KEY, RUN_CONFIG_DEFAULTS[OUTPUT_DIR_KEY]))
    return Path(folder).expanduser().resolve()


def registry_from_run_config(context: Context) -> dict[int, str] | None:
    """The deployment's site registry, if the run names one."""
    from fedmed.coordinator.registry import read_registry

    path = str(context.run_config.get(REGISTRY_KEY, ""))
    return read_registry(path) if path else None


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Coordinator entry point under ``flwr run``: its progress lines reach the operator
    through Flower's copy of this process's output (``flwr run --stream``, ``flwr log``)."""
    show_on_terminal()
    from fedmed.coordinator.app import run_coordinator  # heavy: not for the sites' processes
    from fedmed.coordinator.receipts import RECEIPTS_KEY
    from fedmed.coordinator.recorder import CLEAN_STATUSES

    cfg = config_from_run_config(context)
    run_dir = run_dir_from_run_config(context)
    # One receipt key for all the coordinator's runs, in its runs folder (not a run's own).
    key = run_dir.parent / RECEIPTS_KEY
    registry = registry_from_run_config(context)
    summary = run_coordinator(grid, context, cfg, run_dir, receipt_key=key, registry=registry)
    if summary["status"] not in CLEAN_STATUSES:
        raise RuntimeError(f"federation stopped: {summary['stop_reason']}")


# A hospital's SuperNode (node config site + kit) is a deployed site with its own kit; under
# `flwr run .`'s local simulation (node config partition-id) the sites are simulated.
client_app = make_site_app(config_from_run_config, run_dir_from_run_config, deployed=None)
