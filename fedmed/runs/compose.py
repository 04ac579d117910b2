"""A run's typed configuration: ``conf/`` plus overrides, checked, with the values that
depend on the data (how many sites, so the SecAgg+ settings) resolved."""

from __future__ import annotations

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from fedmed.config.compose import compose_raw, config_error_message
from fedmed.config.schema import FedMedConfig, validate
from fedmed.data import num_sites
from fedmed.errors import ConfigError, FedMedError
from fedmed.secure.params import resolve_secagg


def to_typed(cfg: DictConfig) -> FedMedConfig:
    """DictConfig -> dataclass instance, then the value checks; raises ConfigError."""
    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        raise ConfigError(str(exc.full_key), "???", "a value: this key is required") from None
    assert isinstance(typed, FedMedConfig)
    validate(typed)
    resolve_secagg(typed, num_sites(typed))
    return typed


def compose_config(overrides: list[str], config_name: str = "config") -> FedMedConfig:
    """Compose, type-check and validate; every failure becomes one ``FedMedError`` line."""
    raw = compose_raw(overrides, config_name)
    try:
        return to_typed(raw)
    except (HydraException, OmegaConfBaseException) as exc:
        raise FedMedError(config_error_message(exc)) from None
