"""Hydra's side of the run configuration: where ``conf/`` is, parsing overrides, composing
the raw tree, and one-line messages for every way that can fail."""

from __future__ import annotations

import dataclasses
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fedmed.config.schema import register_schemas
from fedmed.errors import FedMedError

CONFIG_DIR_ENV = "FEDMED_CONFIG_DIR"
SCHEMA_SUFFIX = "_schema"


# The tree at the repository's top (conf/), installed as this package (setup.py maps it).
CONFIG_PACKAGE = "fedmed.conf"
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def config_dir() -> Path:
    """``$FEDMED_CONFIG_DIR`` if set (a user's own tree), else the tree installed with fedmed.

    The installed tree is found as a package, so the same lookup serves a wheel, an
    editable checkout and any working folder.
    """
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        path = Path(override).expanduser().resolve()
        where = f"{CONFIG_DIR_ENV}={override}"
    else:
        try:
            path = Path(str(resources.files(CONFIG_PACKAGE)))
        except ModuleNotFoundError:
            raise FedMedError(
                f"config error: the config tree {CONFIG_PACKAGE} is not installed; reinstall "
                f"fedmed (an editable install: pip install -e .) or set {CONFIG_DIR_ENV}"
            ) from None
        where = f"the installed {CONFIG_PACKAGE}"
    if not (path / "config.yaml").is_file():
        raise FedMedError(
            f"config error: no config.yaml in {path} ({where}); point {CONFIG_DIR_ENV} at a "
            "folder laid out like fedmed's conf/"
        )
    return path


def config_dir_as_searchpath(args: list[str]) -> list[str]:
    """``args`` with Hydra's ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``) as the
    override ``hydra.searchpath=[file://DIR]``, where the (first) flag stood.

    Hydra puts both at the same place in its search path (after the primary tree, which
    they extend with options of their own); as an override, fedmed's early check of the
    composed config sees the same tree as Hydra's runner.
    """
    out: list[str] = []
    extra: list[str] = []
    at = 0
    rest = iter(args)
    for arg in rest:
        flag, sep, value = arg.partition("=")
        if flag not in CONFIG_DIR_FLAGS:
            out.append(arg)
            continue
        at = at if extra else len(out)
        if not sep:
            value = next(rest, "")
        folder = Path(value).expanduser().resolve()
        if not value or not folder.is_dir():
            raise FedMedError(f"config error: {flag} {value!r}: no such folder")
        extra.append(f"file://{folder}")  # as Hydra writes it (no URL escapes)
    if not extra:
        return out
    if any(a.split("=", 1)[0].lstrip("+~") == "hydra.searchpath" for a in out):
        raise FedMedError("config error: give --config-dir or hydra.searchpath=[...], not both")
    quoted = ",".join("'" + uri.replace("'", "\\'") + "'" for uri in extra)
    return [*out[:at], f"hydra.searchpath=[{quoted}]", *out[at:]]


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


def compose_raw(overrides: list[str], config_name: str = "config") -> DictConfig:
    """``conf/`` composed with ``overrides`` (untyped); every failure is one ``FedMedError``."""
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise FedMedError(config_error_message(exc)) from None
    finally:
        GlobalHydra.instance().clear()
