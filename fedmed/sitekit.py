"""Site kits: one YAML per hospital saying where its data is and how to reach the coordinator.

A kit is read into a typed schema, so a mistyped key is refused with the kit's file name.
Relative data paths are resolved against the kit's own folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedmed.data.types import BUNDLED_PREFIX
from fedmed.errors import FedMedError


@dataclass
class SiteDataSource:
    """The site's own data file; ``dataset`` names the reading rules in conf/dataset/."""

    path: str = "???"
    dataset: str = "csv"


@dataclass
class SiteKitPrivacy:
    """The hospital's own privacy policy: a lifetime budget it enforces itself, and its ledger.

    ``ledger`` is the JSON Lines file; the Ed25519 signing key defaults to ``<ledger>.key``
    (mode 0600) and its public key to ``<ledger>.pub``, beside the ledger.
    """

    budget_epsilon: float | None = None
    delta: float | None = None
    ledger: str | None = None
    signing_key: str | None = None


@dataclass
class SiteKit:
    """What one hospital's IT team fills in."""

    name: str = "???"
    data: SiteDataSource = field(default_factory=SiteDataSource)
    privacy: SiteKitPrivacy = field(default_factory=SiteKitPrivacy)
    # True: the site refuses any training request that does not come through SecAgg+.
    require_secure_aggregation: bool = False
    coordinator: str = "127.0.0.1:9092"


def load_site_kit(path: str | Path) -> SiteKit:
    """Read and type-check a kit; the data path comes back absolute (or ``bundled:``)."""
    kit_path = Path(path).expanduser()
    if not kit_path.is_file():
        raise FedMedError(f"site kit {kit_path}: file not found")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SiteKit), OmegaConf.load(kit_path))
        kit = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or "?"
        raise FedMedError(f"site kit {kit_path}: key '{key}': {str(exc).splitlines()[0]}") from None
    assert isinstance(kit, SiteKit)
    if not kit.data.path.startswith(BUNDLED_PREFIX):
        kit.data.path = _beside(kit_path, kit.data.path)
    if kit.privacy.ledger is not None:
        kit.privacy.ledger = _beside(kit_path, kit.privacy.ledger)
    if kit.privacy.signing_key is not None:
        kit.privacy.signing_key = _beside(kit_path, kit.privacy.signing_key)
    return kit


def _beside(kit_path: Path, path: str) -> str:
    """``path`` made absolute, relative paths being read from the kit's folder."""
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else (kit_path.parent / resolved).resolve())
