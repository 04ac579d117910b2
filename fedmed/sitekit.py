"""Site kits: one YAML per hospital saying where its data is and how to reach the coordinator.

A kit is read into a typed schema, so a mistyped key is refused with the kit's file name.
Relative data paths are resolved against the kit's own folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedmed.kitfile import beside, load_kit


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
class SiteKitDeployment:
    """How the hospital's SuperNode reaches the coordinator (files from `fedmed certs`)."""

    ca_cert: str | None = None  # the consortium CA certificate (ca.crt)
    node_key: str | None = None  # this site's node authentication private key (node.key)
    node_public_key: str | None = None  # its public key (node.pub), registered by the centre
    runtime_port: int = 9094  # local port of the SuperNode's runtime API, one per SuperNode


@dataclass
class SiteKit:
    """What one hospital's IT team fills in."""

    name: str = "???"
    data: SiteDataSource = field(default_factory=SiteDataSource)
    privacy: SiteKitPrivacy = field(default_factory=SiteKitPrivacy)
    # True: the site refuses any training request that does not come through SecAgg+.
    require_secure_aggregation: bool = False
    coordinator: str = "127.0.0.1:9091"
    deployment: SiteKitDeployment = field(default_factory=SiteKitDeployment)


def load_site_kit(path: str | Path) -> SiteKit:
    """Read and type-check a kit; the data path comes back absolute (or ``bundled:``)."""
    from fedmed.data.types import BUNDLED_PREFIX  # fedmed.data reads kits: import lazily

    kit, kit_path = load_kit(path, SiteKit, "site kit")
    if not kit.data.path.startswith(BUNDLED_PREFIX):
        kit.data.path = beside(kit_path, kit.data.path)
    if kit.privacy.ledger is not None:
        kit.privacy.ledger = beside(kit_path, kit.privacy.ledger)
    if kit.privacy.signing_key is not None:
        kit.privacy.signing_key = beside(kit_path, kit.privacy.signing_key)
    for key in ("ca_cert", "node_key", "node_public_key"):
        value = getattr(kit.deployment, key)
        if value is not None:
            setattr(kit.deployment, key, beside(kit_path, value))
    return kit
