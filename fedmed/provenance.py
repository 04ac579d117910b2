"""What produced a result: the hash of the exact configuration and the code version.

Both are written into every privacy-ledger entry and every run summary, so an auditor can tie
an epsilon to the configuration and code that spent it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

from fedmed.config.schema import FedMedConfig

# Recent configs by identity (kept alive, so an id is never reused while cached): a simulated
# site hashes the run's one config object for every message, and OmegaConf takes ~20 ms.
_RECENT_HASHES: dict[int, tuple[FedMedConfig, str]] = {}
_RECENT_HASHES_MAX = 8


def config_hash(cfg: FedMedConfig) -> str:
    """sha256 of the fully composed configuration (canonical YAML, keys sorted).

    A config is never changed after it is composed and validated, so the hash of one config
    object is computed once.
    """
    cached = _RECENT_HASHES.get(id(cfg))
    if cached is not None and cached[0] is cfg:
        return cached[1]
    digest = _config_digest(cfg)
    if len(_RECENT_HASHES) >= _RECENT_HASHES_MAX:
        _RECENT_HASHES.pop(next(iter(_RECENT_HASHES)))
    _RECENT_HASHES[id(cfg)] = (cfg, digest)
    return digest


def _config_digest(cfg: FedMedConfig) -> str:
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    canonical = OmegaConf.to_yaml(OmegaConf.create(container), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def installed_version() -> str:
    """The installed distribution's version (``unknown`` when fedmed runs uninstalled, e.g.
    from a source folder on ``PYTHONPATH``)."""
    # The distribution's metadata, not a constant in the code: it is what pip installed.
    try:
        return importlib.metadata.version("fedmed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def source_checkout() -> Path | None:
    """The git checkout this code runs from (an editable install), or None (a wheel)."""
    root = Path(__file__).resolve().parents[1]
    is_checkout = (root / ".git").exists() and (root / "pyproject.toml").is_file()
    return root if is_checkout else None


@functools.cache
def code_version() -> str:
    """``fedmed <version> (git <commit>[+dirty])`` in a checkout, ``fedmed <version>
    (installed package)`` from a wheel."""
    version = installed_version()
    checkout = source_checkout()
    if checkout is None:
        return f"fedmed {version} (installed package)"
    try:
        commit = _git(checkout, "rev-parse", "--short=12", "HEAD")
        dirty = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return f"fedmed {version} (checkout; git could not tell the commit)"
    return f"fedmed {version} (git {commit}{'+dirty' if dirty else ''})"


def _git(checkout: Path, *args: str) -> str:
    """What ``git ARGS`` prints in ``checkout``, stripped; raises when git fails."""
    return subprocess.run(
        ["git", "-C", str(checkout), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()
