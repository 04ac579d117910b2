"""The Flower App project that ``flwr run`` bundles, as data: its components and its
run-config keys with their defaults.

``fedmed server run`` writes the project from the installed fedmed, so a coordinator needs
no checkout. The checkout's pyproject.toml carries the same ``[tool.flwr.app]`` table, for
``flwr run .``; a test keeps it equal to ``app_table()``, the one source.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import tomli_w

from fedmed.errors import FedMedError

DISTRIBUTION = "fedmed"
PUBLISHER = "fedmed"
APP_MODULE = "fedmed.runs.flower_app"
# The run-config keys: set by `fedmed server run` (or `flwr run . --run-config`), read by
# both apps (fedmed.runs.flower_app).
OVERRIDES_KEY = "overrides"  # Hydra overrides, space separated, e.g. "dataset=heart"
OUTPUT_DIR_KEY = "output-dir"  # where the coordinator writes summary.json, metrics, model
REGISTRY_KEY = "site-registry"  # node id -> site (`fedmed server start`); "": none
RUN_CONFIG_DEFAULTS: dict[str, str] = {
    OVERRIDES_KEY: "",
    OUTPUT_DIR_KEY: "outputs/flwr-run",
    REGISTRY_KEY: "",
}


# The bundle carries no code, only its project file: coordinator and sites run the fedmed
# installed on their own machine (a site should run code it installed; Flower never ships
# data files). Bundled code would also shadow it: Flower puts the bundle's folder first on
# sys.path, and its fedmed/ folder (no __init__.py) would hide an editable install's
# fedmed.runs.
FAB_INCLUDE = ["pyproject.toml"]


def app_table() -> dict[str, Any]:
    """``[tool.flwr.app]``: the components are the installed fedmed's."""
    return {
        "publisher": PUBLISHER,
        "fab-include": list(FAB_INCLUDE),
        "components": {
            "serverapp": f"{APP_MODULE}:server_app",
            "clientapp": f"{APP_MODULE}:client_app",
        },
        "config": dict(RUN_CONFIG_DEFAULTS),
    }


def project_table() -> dict[str, str]:
    """``[project]`` of the bundle: the installed distribution's name, version, summary and
    licence (what ``flwr`` records for the run and checks for)."""
    meta = importlib.metadata.metadata(DISTRIBUTION)
    table = {"name": meta["Name"], "version": meta["Version"], "description": meta["Summary"]}
    licence = meta.get_all("License-Expression") or []
    return {**table, "license": licence[0]} if licence else table


def write_app_project(folder: Path) -> Path:
    """Write (or rewrite) the Flower App project, its ``pyproject.toml``, into ``folder``;
    returns the folder (what ``flwr run`` takes)."""
    folder.mkdir(parents=True, exist_ok=True)
    pyproject = {"project": project_table(), "tool": {"flwr": {"app": app_table()}}}
    (folder / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return folder


def write_run_config(path: Path, values: dict[str, str]) -> Path:
    """A run-config TOML file for ``flwr run --run-config FILE``: any path or override text
    passes unquoted (Flower's ``key=value`` strings cannot hold both quote kinds)."""
    unknown = set(values) - set(RUN_CONFIG_DEFAULTS)
    if unknown:
        raise FedMedError(
            f"run config: unknown keys {sorted(unknown)}; known: {sorted(RUN_CONFIG_DEFAULTS)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values))
    return path
