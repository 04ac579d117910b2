"""Reading a kit YAML (site or coordinator) into its typed schema, with one-line errors."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedmed.errors import FedMedError

K = TypeVar("K")

# Data paths starting with this prefix point into fedmed's own bundled data, not a file.
BUNDLED_PREFIX = "bundled:"


def load_kit(path: str | Path, schema: type[K], label: str) -> tuple[K, Path]:
    """The kit at ``path`` as a ``schema`` instance, and the kit's path; a mistyped or
    unknown key is refused naming the file and the key."""
    kit_path = Path(path).expanduser()
    if not kit_path.is_file():
        raise FedMedError(f"{label} {kit_path}: file not found")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(kit_path))
        kit = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or "?"
        raise FedMedError(f"{label} {kit_path}: key '{key}': {str(exc).splitlines()[0]}") from None
    assert isinstance(kit, schema)
    return kit, kit_path


def beside(kit_path: Path, path: str) -> str:
    """``path`` made absolute, relative paths being read from the kit's folder."""
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else (kit_path.parent / resolved).resolve())


def resolve_paths(kit: object, kit_path: Path, keys: tuple[str, ...]) -> None:
    """Make each set path field of ``kit`` (dotted ``keys``) absolute with ``beside``: a
    kit travels with its files, wherever it is started from (never the current folder or
    a checkout). ``bundled:`` values name fedmed's own data and stay as they are."""
    for key in keys:
        *parents, name = key.split(".")
        owner = functools.reduce(getattr, parents, kit)
        value = getattr(owner, name)
        if value is not None and not value.startswith(BUNDLED_PREFIX):
            setattr(owner, name, beside(kit_path, value))
