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
class SiteKit:
    """What one hospital's IT team fills in."""

    name: str = "???"
    data: SiteDataSource = field(default_factory=SiteDataSource)
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
    if not kit.data.path.startswith(BUNDLED_PREFIX) and not Path(kit.data.path).is_absolute():
        kit.data.path = str((kit_path.parent / kit.data.path).resolve())
    return kit
