"""What a site accepts from a run: its kit decides; the run may only ask within it.

A site's data source and reading rules, lifetime budget and delta, the accountant of its
budget check, its ledger and signing key, whether it demands differential privacy, its floor
on the noise and its cap on one run's epsilon all come from its kit. ``check_run`` compares
the run's configuration (which the coordinator composes and sends) with the kit and refuses
the run, in one line naming the key, the run's value and the kit's, when the run tries to
change any of them: never silently ignored, never obeyed. The site's gate calls it on every
message, before anything is trained or recorded.

Simulation follows the same path: a simulated site reads the kit it is given
(``dataset.site_kits``), or, when the federation has none, a kit generated from the run's
privacy settings; its ledger goes into the run folder (or ``privacy.ledger_dir``) instead of
the kit's ledger path, so simulations never touch a hospital's real ledger.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmed.config.schema import FedMedConfig, TabularConfig
from fedmed.data import site_kit, site_names
from fedmed.errors import REFUSES, ConfigError, FedMedError, SiteError
from fedmed.kits.site import (
    DEFAULT_DELTA,
    KitAccountant,
    SiteDataSource,
    SiteKit,
    SiteKitPrivacy,
    load_site_kit,
)
from fedmed.privacy.budget import LEDGER_SUFFIX, dp_config

# Node-config keys a hospital's SuperNode is started with (`fedmed site start` sets both).
NODE_SITE = "site"
NODE_KIT = "kit"
# Reading and preprocessing rules a kit's dataset config (conf/dataset/<name>.yaml) pins.
DATASET_RULE_KEYS = (
    "label",
    "header",
    "features",
    "categorical",
    "zero_as_missing",
    "missing_values",
    "binarize_above",
    "classes",
    "missing_indicators",
    "test_fraction",
)
# What each site-owned privacy value is, for the refusal message.
_OWNED = {
    "budget_epsilon": "the site's lifetime budget",
    "delta": "the site's delta",
    "accountant": "the accountant of the site's budget check",
}


@dataclass(frozen=True)
class SiteRuntime:
    """Where a site runs: the Flower run, where a simulated site's ledger goes, its kit.

    ``deployed``: a deployed site (a hospital's SuperNode) brings its own ``kit`` (from
    node_config ``kit``), keeps its ledger where that kit says and refuses simulation-only
    settings. A simulated site keeps its ledger under ``ledger_dir`` (the run directory) or
    ``privacy.ledger_dir``.
    """

    run_id: str
    ledger_dir: Path
    deployed: bool
    kit: SiteKit | None = None


@dataclass(frozen=True)
class SiteSetup:
    """One site's kit as it applies to one run.

    ``generated``: a simulated site without a kit; its kit was generated from the run, so
    there are no reading rules of its own to compare.
    """

    kit: SiteKit
    deployed: bool
    generated: bool = False

    @property
    def name(self) -> str:
        return self.kit.name


def refusal(site: str, problems: list[str]) -> SiteError:
    """The one-line error a site answers a run it does not accept with."""
    return SiteError(site, f"{REFUSES}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- kits
def generated_kit(cfg: FedMedConfig, name: str) -> SiteKit:
    """The kit of a simulated site that has none: its policy is the run's privacy config
    (budget: ``privacy.budget_epsilon`` or ``target_epsilon``; delta: ``privacy.delta`` or
    1e-3; accountant: ``privacy.accountant`` or prv), and it accepts ``privacy=none``."""
    privacy = SiteKitPrivacy(require_privacy=False)
    dp = dp_config(cfg)
    if dp is not None:
        privacy.budget_epsilon = dp.budget_epsilon or dp.target_epsilon
        privacy.delta = dp.delta if dp.delta is not None else DEFAULT_DELTA
        if dp.accountant is not None:
            if dp.accountant.value not in KitAccountant.__members__:
                raise ConfigError(
                    "privacy.accountant",
                    dp.accountant.value,
                    "prv or rdp: a site's budget check needs an upper bound on epsilon",
                )
            privacy.accountant = KitAccountant(dp.accountant.value)
    data = SiteDataSource(path="(the run's dataset)", dataset=cfg.dataset.name)
    return SiteKit(name=name, data=data, privacy=privacy)


def in_run_folder(kit: SiteKit, ledger_dir: Path) -> SiteKit:
    """A copy of ``kit`` whose ledger (and key) live in ``ledger_dir``: a simulation."""
    ledger = ledger_dir / f"{kit.name}{LEDGER_SUFFIX}"
    privacy = dataclasses.replace(kit.privacy, ledger=str(ledger), signing_key=None)
    return dataclasses.replace(kit, privacy=privacy)


def simulated_ledger_dir(cfg: FedMedConfig, runtime: SiteRuntime) -> Path:
    """``privacy.ledger_dir`` (budgets persist across simulations), else the run folder's."""
    dp = dp_config(cfg)
    if dp is not None and dp.ledger_dir is not None:
        return Path(dp.ledger_dir).expanduser().resolve()
    return runtime.ledger_dir


def site_setup(cfg: FedMedConfig, index: int, runtime: SiteRuntime) -> SiteSetup:
    """The site's kit for this run: a deployed site's own, or a simulated site's (from
    ``dataset.site_kits``, else generated from the run) with its ledger in the run folder."""
    if runtime.deployed:
        if runtime.kit is None:
            raise SiteError(f"#{index}", missing_kit_problem())
        return SiteSetup(runtime.kit, deployed=True)
    kit = site_kit(cfg, index)
    generated = kit is None
    if kit is None:
        kit = generated_kit(cfg, site_names(cfg)[index])
    return SiteSetup(in_run_folder(kit, simulated_ledger_dir(cfg, runtime)), False, generated)


def missing_kit_problem() -> str:
    return (
        f"{REFUSES}: a deployed site needs its own kit; start its SuperNode with "
        f"--node-config 'site=\"NAME\" kit=\"/absolute/path/to/NAME.yaml\"' "
        "(`fedmed site start KIT` does)"
    )


def is_deployed(node_config: dict[str, Any]) -> bool:
    """A hospital's SuperNode names its site or kit; Flower's simulation gives partition-id."""
    return NODE_KIT in node_config or NODE_SITE in node_config


def deployed_kit(node_config: dict[str, Any]) -> SiteKit:
    """The kit named by a hospital's SuperNode (node_config ``kit``, an absolute path), and
    no other hospital's."""
    name = str(node_config.get(NODE_SITE, "unknown"))
    if NODE_KIT not in node_config:
        raise SiteError(name, missing_kit_problem())
    path = Path(str(node_config[NODE_KIT]))
    if not path.is_absolute():
        raise SiteError(
            name,
            f"{REFUSES}: node_config kit={str(path)!r} must be an absolute path (the "
            "SuperNode's working folder is not the kit's)",
        )
    try:
        kit = load_site_kit(path)
    except FedMedError as err:
        raise SiteError(name, f"{REFUSES}: {err}") from None
    if NODE_SITE in node_config and name != kit.name:
        raise SiteError(
            name,
            f"{REFUSES}: node_config site={name!r} but its kit {path} is site {kit.name!r}",
        )
    return kit


# ----------------------------------------------------------------------------- the check
def check_run(cfg: FedMedConfig, setup: SiteSetup) -> None:
    """Refuse (SiteError, one line) a run that changes anything the site's kit owns."""
    problems = _privacy_problems(cfg, setup) + _simulation_only_problems(cfg, setup)
    if not setup.generated:
        problems += _dataset_problems(cfg, setup.kit)
    if problems:
        raise refusal(setup.name, problems)


def _privacy_problems(cfg: FedMedConfig, setup: SiteSetup) -> list[str]:
    kit = setup.kit.privacy
    dp = dp_config(cfg)
    if dp is None:
        if kit.require_privacy:
            return [
                "privacy=none, but its kit requires differential privacy "
                "(privacy.require_privacy: true); run with privacy=dp"
            ]
        return []
    problems = []
    run_values = {
        "budget_epsilon": dp.budget_epsilon,
        "delta": dp.delta,
        "accountant": dp.accountant.value if dp.accountant is not None else None,
    }
    kit_values = {
        "budget_epsilon": kit.budget_epsilon,
        "delta": kit.delta,
        "accountant": kit.accountant.value,
    }
    for key, what in _OWNED.items():
        if run_values[key] is not None and run_values[key] != kit_values[key]:
            problems.append(
                f"privacy.{key}={run_values[key]} is set by the run, but {what} belongs to "
                f"its kit (privacy.{key}: {kit_values[key]})"
            )
    if setup.deployed and dp.ledger_dir is not None:
        problems.append(
            f"privacy.ledger_dir={dp.ledger_dir} is set by the run; a deployed site keeps its "
            "ledger where its kit says (privacy.ledger)"
        )
    floor = kit.min_noise_multiplier
    if floor is not None and dp.noise_multiplier is not None and dp.noise_multiplier < floor:
        problems.append(
            f"privacy.noise_multiplier={dp.noise_multiplier} is below the noise floor of its "
            f"kit (privacy.min_noise_multiplier: {floor})"
        )
    cap = kit.max_run_epsilon
    if cap is not None and dp.target_epsilon is not None and dp.target_epsilon > cap:
        problems.append(
            f"privacy.target_epsilon={dp.target_epsilon} is above what its kit lets one run "
            f"spend (privacy.max_run_epsilon: {cap})"
        )
    return problems


def _simulation_only_problems(cfg: FedMedConfig, setup: SiteSetup) -> list[str]:
    """Settings that hand the coordinator the site's noise or data: simulations only."""
    if not setup.deployed:
        return []
    problems = []
    dp = dp_config(cfg)
    if dp is not None and dp.noise_seed is not None:
        problems.append(
            f"privacy.noise_seed={dp.noise_seed} is set by the run; reproducible noise is for "
            "simulations only (whoever knows the seed could replay the noise)"
        )
    if cfg.audit.disable_noise:
        problems.append("audit.disable_noise=true: it is a simulation self-test")
    if cfg.audit.canaries:
        problems.append(
            f"audit.canaries={cfg.audit.canaries}: canary records are added to training data "
            "only in simulations (fedmed audit empirical)"
        )
    return problems


@functools.cache
def kit_dataset_rules(name: str) -> DictConfig:
    """conf/dataset/<name>.yaml composed (the reading rules a kit's ``data.dataset`` names)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedmed.config.compose import config_dir, config_error_message
    from fedmed.config.schema import register_schemas

    register_schemas()
    overrides = [f"dataset={name}"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside `fedmed simulate` / dry-run
            raw = compose("config", overrides=overrides)
        else:
            with initialize_config_dir(str(config_dir()), version_base="1.3"):
                raw = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise FedMedError(f"data.dataset={name}: {config_error_message(exc)}") from None
    rules = raw.dataset
    assert isinstance(rules, DictConfig)
    return rules


def _dataset_problems(cfg: FedMedConfig, kit: SiteKit) -> list[str]:
    """The run's reading rules against the kit's (keys the kit's dataset leaves ``???`` are
    the run's to set)."""
    try:
        rules = kit_dataset_rules(kit.data.dataset)
    except FedMedError as err:
        return [f"its kit's data.dataset cannot be read: {err}"]
    run = cfg.dataset
    kind = OmegaConf.get_type(rules)
    if type(run) is not kind or not isinstance(run, TabularConfig):
        return [
            f"dataset={run.name} is not the kind of data its kit serves (data.dataset: "
            f"{kit.data.dataset}, {getattr(kind, '__name__', kind)})"
        ]
    values = OmegaConf.to_container(rules, resolve=True, throw_on_missing=False)
    assert isinstance(values, dict)
    problems = []
    for key in DATASET_RULE_KEYS:
        if OmegaConf.is_missing(rules, key):
            continue
        kit_value = values[key]
        if getattr(run, key) != kit_value:
            problems.append(
                f"dataset.{key}={getattr(run, key)!r} differs from the site's reading rules, "
                f"which belong to its kit (data.dataset: {kit.data.dataset} has {key}: "
                f"{kit_value!r})"
            )
    return problems


def check_noise(setup: SiteSetup, cfg: FedMedConfig, sigma: float) -> None:
    """Refuse a calibrated noise below the kit's floor (an explicit one is refused earlier)."""
    floor = setup.kit.privacy.min_noise_multiplier
    if floor is None or sigma >= floor:
        return
    dp = dp_config(cfg)
    target = dp.target_epsilon if dp is not None else None
    raise refusal(
        setup.name,
        [
            f"privacy.target_epsilon={target} over federation.rounds={cfg.federation.rounds} "
            f"calibrates to noise_multiplier={sigma:.4f}, below the noise floor of its kit "
            f"(privacy.min_noise_multiplier: {floor})"
        ],
    )


# ----------------------------------------------------------------------------- data
def site_data_config(cfg: FedMedConfig, kit: SiteKit) -> FedMedConfig:
    """The run's config with the dataset narrowed to this site's own file (its kit's
    ``data.path``): a deployed site reads nothing else, and no other hospital's kit."""
    assert isinstance(cfg.dataset, TabularConfig)  # check_run refused any other kind
    dataset = dataclasses.replace(
        cfg.dataset, paths=[kit.data.path], path=None, site_kits=[], site_names=[kit.name]
    )
    federation = dataclasses.replace(cfg.federation, num_sites=None)
    return dataclasses.replace(cfg, dataset=dataset, federation=federation)
