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

from fedmed.config import FedMedConfig


def config_hash(cfg: FedMedConfig) -> str:
    """sha256 of the fully composed configuration (canonical YAML, keys sorted)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    canonical = OmegaConf.to_yaml(OmegaConf.create(container), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@functools.cache
def code_version() -> str:
    """``fedmed <version>``, plus the git commit (``+dirty`` if modified) in a checkout."""
    # The installed distribution's version: under `flwr run` the package ``fedmed`` can be
    # a namespace spanning the Flower App bundle, whose __init__ is not executed.
    version = importlib.metadata.version("fedmed")
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / ".git").exists():
        return f"fedmed {version}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"fedmed {version}"
    return f"fedmed {version} (git {commit}{'+dirty' if dirty else ''})"
