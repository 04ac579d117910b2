"""Compose a typed run configuration from ``conf/`` plus overrides; explain failures in one line."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from fedmed.config import FedMedConfig, register_schemas, validate
from fedmed.data import num_sites
from fedmed.errors import ConfigError, FedMedError
from fedmed.secure.params import resolve_secagg

CONFIG_DIR_ENV = "FEDMED_CONFIG_DIR"
SCHEMA_SUFFIX = "_schema"
C = TypeVar("C", bound=FedMedConfig)


def config_dir() -> Path:
    """``$FEDMED_CONFIG_DIR`` if set, else the ``conf/`` folder of this checkout."""
    override = os.environ.get(CONFIG_DIR_ENV)
    path = Path(override) if override else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "config.yaml").is_file():
        raise FedMedError(f"config error: no config.yaml in {path} (set {CONFIG_DIR_ENV})")
    return path


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


OVERRIDE_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
_LEXER_PREFIX = "LexerNoViableAltException: "


def bad_override_message(override: str, hydra_message: str) -> str:
    """One line for an override Hydra cannot parse: the override, why, and the form to use.

    Hydra's message spans several lines (the parser's token list, a caret line, a link).
    """
    lines = [
        line
        for line in hydra_message.splitlines()
        if line.strip() and not line.startswith(("See https://", "Error parsing override"))
    ]
    reason = lines[0].split(" expecting ")[0] if lines else "not an override"
    if reason.startswith(_LEXER_PREFIX) and len(lines) > 1:
        position = lines[1].find("^") - len(_LEXER_PREFIX)
        if 0 <= position < len(override):
            reason = f"unexpected character {override[position]!r} at position {position + 1}"
    return (
        f"config error: cannot parse the override '{override}' ({reason}); write KEY=VALUE "
        f"(e.g. federation.rounds=3; grammar: {OVERRIDE_GRAMMAR})"
    )


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's parse of the command-line overrides; a malformed one is one ``FedMedError``."""
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as exc:
            raise FedMedError(bad_override_message(text, exc.message)) from None
    return parsed


def first_of_each_sweep(overrides: list[str], multirun: bool = True) -> list[str]:
    """Replace sweep overrides (``seed=1,2,3``) by their first value, to check one job early.

    Without ``--multirun`` a sweep is refused here: Hydra's own refusal spans several lines.
    """
    out = []
    for override in parse_overrides(overrides):
        line = override.input_line or ""
        if override.is_sweep_override() and not multirun:
            key = override.get_key_element()
            raise FedMedError(
                f"config error: the override '{line}' is a sweep; add --multirun to run one job "
                f"per value, or write a list as {key}=[...]"
            )
        if override.is_sweep_override():
            try:
                first = next(iter(override.sweep_string_iterator()))
            except (HydraException, StopIteration) as exc:
                problem = str(exc).splitlines()[0] if str(exc) else "it has no values"
                if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                    problem = "glob() sweeps are not supported"
                raise FedMedError(
                    f"config error: cannot sweep the override '{line}' ({problem}); list the "
                    "values (seed=1,2,3) or use range(start,stop) with start < stop"
                ) from None
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(line)
    return out


def compose_config(overrides: list[str], config_name: str = "config") -> FedMedConfig:
    """Compose, type-check and validate; every failure becomes one ``FedMedError`` line."""
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            raw = compose(config_name, overrides=overrides)
        return to_typed(raw)
    except (HydraException, OmegaConfBaseException) as exc:
        raise FedMedError(config_error_message(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def _schema_fields(object_type: Any) -> list[str]:
    if isinstance(object_type, type) and dataclasses.is_dataclass(object_type):
        return [f.name for f in dataclasses.fields(object_type)]
    return []


def config_error_message(exc: BaseException) -> str:
    """One line naming the offending key and what is allowed."""
    if isinstance(exc, OverrideParseException):
        return bad_override_message(exc.override, exc.message)
    if isinstance(exc, MissingConfigException):
        text = str(exc)
        wanted = re.search(r"Could not find '([^']+)'", text)
        options = [
            line.strip()
            for line in text.split("Available options")[-1].splitlines()[1:]
            if line.startswith("\t")
            and not line.strip().endswith(SCHEMA_SUFFIX)
            and "provider=" not in line
        ]
        if wanted and "/" in wanted.group(1):
            group, option = wanted.group(1).rsplit("/", 1)
            choices = ", ".join(options)
            return f"config error: {group}={option} is not an option; choose one of: {choices}"
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, OmegaConfBaseException):
        full_key = getattr(cause, "full_key", None) or ""
        message = str(getattr(cause, "msg", cause)).splitlines()[0]
        allowed = _schema_fields(getattr(cause, "object_type", None))
        if "not in" in message or "Missing key" in message or "not in struct" in message:
            parent = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
            keys = ", ".join(allowed)
            return f"config error: unknown key '{full_key}'; allowed keys in {parent}: {keys}"
        return f"config error: {full_key}: {message}"
    return f"config error: {str(exc).splitlines()[0]}"
