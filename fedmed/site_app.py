"""The hospital ClientApp's wiring: which site a process serves, its gate, its client_fn.

Kept light on purpose: a deployed SuperNode starts a fresh process for every message, and
most SecAgg+ stages never train, so torch and Opacus (``fedmed.site``) are imported only when
a message reaches the site itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp

from fedmed.config import FedMedConfig, site_faults
from fedmed.data import site_kit, site_names
from fedmed.errors import ConfigError
from fedmed.secure.site_gate import SiteIdentity, make_secure_aggregation_mod, secure_round


def site_index(cfg: FedMedConfig, node_config: dict[str, Any]) -> int:
    """Simulation passes ``partition-id``; a deployed SuperNode passes ``site`` (its name)."""
    if "site" in node_config:
        names = site_names(cfg)
        name = str(node_config["site"])
        if name not in names:
            raise ConfigError("node_config.site", name, f"one of {names}")
        return names.index(name)
    if "partition-id" in node_config:
        return int(node_config["partition-id"])
    raise ConfigError("node_config", dict(node_config), "a 'site' name or a 'partition-id'")


def make_client_fn(
    resolve_config: Callable[[Context], FedMedConfig],
    resolve_run_dir: Callable[[Context], Path],
    deployed: bool,
) -> Callable[[Context], Client]:
    """The ClientApp's client_fn; the resolvers say where the run's config and folder are."""

    def client_fn(context: Context) -> Client:
        from fedmed.site import HospitalSite, SiteRuntime

        cfg = resolve_config(context)
        runtime = SiteRuntime(str(context.run_id), resolve_run_dir(context) / "ledgers", deployed)
        index = site_index(cfg, dict(context.node_config))
        return HospitalSite(cfg, index, runtime, secure_round(context)).to_client()

    return client_fn


def make_site_identifier(
    resolve_config: Callable[[Context], FedMedConfig],
) -> Callable[[Context], SiteIdentity]:
    """Which site a context belongs to, whether its kit demands SecAgg+, its test faults."""

    def identify(context: Context) -> SiteIdentity:
        cfg = resolve_config(context)
        index = site_index(cfg, dict(context.node_config))
        name = site_names(cfg)[index]
        kit = site_kit(cfg, index)
        requires = bool(kit and kit.require_secure_aggregation)
        return SiteIdentity(name, requires, site_faults(cfg, name))

    return identify


def make_site_app(
    resolve_config: Callable[[Context], FedMedConfig],
    resolve_run_dir: Callable[[Context], Path],
    deployed: bool,
) -> ClientApp:
    """The hospital ClientApp: the site behind its secure-aggregation gate."""
    return ClientApp(
        client_fn=make_client_fn(resolve_config, resolve_run_dir, deployed),
        mods=[make_secure_aggregation_mod(make_site_identifier(resolve_config))],
    )


def make_client_app(cfg: FedMedConfig, run_dir: Path) -> ClientApp:
    """ClientApp for an in-process simulation whose config and run folder are known up front."""
    return make_site_app(lambda _c: cfg, lambda _c: run_dir, deployed=False)
