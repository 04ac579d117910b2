"""The hospital ClientApp's wiring: which site a process serves, its gate, its client_fn.

A deployed SuperNode is started with node-config ``site`` and ``kit`` (the absolute path of
its own kit): the site reads that kit and no other hospital's, and its kit, not the run,
decides its policy. Flower's simulation gives ``partition-id`` instead: the site is the run's
site of that index, with the kit listed in ``dataset.site_kits`` or one generated from the run.

Kept light on purpose: a deployed SuperNode starts a fresh process for every message, and
most SecAgg+ stages never train, so torch and Opacus (``fedmed.site.client``) are imported only when
a message reaches the site itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp

from fedmed.config.schema import FedMedConfig, site_faults
from fedmed.data import site_names
from fedmed.errors import ConfigError, FedMedError, SiteError
from fedmed.site.gate import SiteIdentity, make_secure_aggregation_mod, secure_round
from fedmed.site.policy import (
    NODE_SITE,
    SiteRuntime,
    check_run,
    deployed_kit,
    is_deployed,
    site_setup,
)


def site_index(cfg: FedMedConfig, node_config: dict[str, Any]) -> int:
    """A simulated site's index in the run: Flower's simulation passes ``partition-id``."""
    if "partition-id" in node_config:
        return int(node_config["partition-id"])
    if NODE_SITE in node_config:
        names = site_names(cfg)
        name = str(node_config[NODE_SITE])
        if name not in names:
            raise ConfigError("node_config.site", name, f"one of {names}")
        return names.index(name)
    raise ConfigError("node_config", dict(node_config), "a 'site' name or a 'partition-id'")


def site_runtime(
    context: Context, resolve_run_dir: Callable[[Context], Path], deployed: bool | None
) -> SiteRuntime:
    """Where this site runs; ``deployed=None``: as its node config says (``site``/``kit``:
    a hospital's SuperNode, which must bring its own kit)."""
    node_config = dict(context.node_config)
    if deployed is None:
        deployed = is_deployed(node_config)
    kit = deployed_kit(node_config) if deployed else None
    ledgers = resolve_run_dir(context) / "ledgers"  # a simulated site's ledgers only
    return SiteRuntime(str(context.run_id), ledgers, deployed, kit)


def _run_config(
    resolve_config: Callable[[Context], FedMedConfig], context: Context, runtime: SiteRuntime
) -> FedMedConfig:
    """The run's config; a deployed site that cannot read it says so under its own name."""
    try:
        return resolve_config(context)
    except SiteError:
        raise
    except FedMedError as err:
        if runtime.kit is None:
            raise
        raise SiteError(runtime.kit.name, f"cannot read the run's configuration: {err}") from None


def make_client_fn(
    resolve_config: Callable[[Context], FedMedConfig],
    resolve_run_dir: Callable[[Context], Path],
    deployed: bool | None,
) -> Callable[[Context], Client]:
    """The ClientApp's client_fn; the resolvers say where the run's config and folder are."""

    def client_fn(context: Context) -> Client:
        from fedmed.site.client import HospitalSite

        runtime = site_runtime(context, resolve_run_dir, deployed)
        cfg = _run_config(resolve_config, context, runtime)
        index = 0 if runtime.deployed else site_index(cfg, dict(context.node_config))
        return HospitalSite(cfg, index, runtime, secure_round(context)).to_client()

    return client_fn


def make_site_identifier(
    resolve_config: Callable[[Context], FedMedConfig],
    resolve_run_dir: Callable[[Context], Path],
    deployed: bool | None,
) -> Callable[[Context], SiteIdentity]:
    """Which site a context belongs to, whether its kit demands SecAgg+, its test faults;
    raises the site's refusal when the run changes anything its kit owns."""

    def identify(context: Context) -> SiteIdentity:
        runtime = site_runtime(context, resolve_run_dir, deployed)
        cfg = _run_config(resolve_config, context, runtime)
        index = 0 if runtime.deployed else site_index(cfg, dict(context.node_config))
        setup = site_setup(cfg, index, runtime)
        check_run(cfg, setup)
        return SiteIdentity(
            setup.name, setup.kit.require_secure_aggregation, site_faults(cfg, setup.name)
        )

    return identify


def make_site_app(
    resolve_config: Callable[[Context], FedMedConfig],
    resolve_run_dir: Callable[[Context], Path],
    deployed: bool | None = None,
) -> ClientApp:
    """The hospital ClientApp: the site behind its gate. ``deployed=None``: decided per
    node from its node config (a SuperNode with ``site``/``kit`` is a deployed hospital)."""
    return ClientApp(
        client_fn=make_client_fn(resolve_config, resolve_run_dir, deployed),
        mods=[
            make_secure_aggregation_mod(
                make_site_identifier(resolve_config, resolve_run_dir, deployed)
            )
        ],
    )


def make_client_app(cfg: FedMedConfig, run_dir: Path) -> ClientApp:
    """ClientApp for an in-process simulation whose config and run folder are known up front."""
    return make_site_app(lambda _c: cfg, lambda _c: run_dir, deployed=False)
