"""Site kits: one YAML per hospital saying where its data is, what privacy it demands, and how
to reach the coordinator.

A kit is read into a typed schema, so a mistyped key or an out-of-range value is refused with
the kit's file name. Relative paths are resolved against the kit's own folder. What a kit says
is the site's own policy: a run that asks for anything else is refused by the site
(``fedmed.site.policy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from fedmed.errors import FedMedError
from fedmed.kits.files import load_kit, resolve_paths

# A kit that states no delta: the same default a generated (simulated) kit gets.
DEFAULT_DELTA = 1e-3
# Every path a site kit holds: read from the kit's own folder when relative.
PATH_KEYS = (
    "data.path",
    "privacy.ledger",
    "privacy.signing_key",
    "deployment.ca_cert",
    "deployment.node_key",
    "deployment.node_public_key",
)


@dataclass
class SiteDataSource:
    """The site's own data file; ``dataset`` names the reading rules in conf/dataset/."""

    path: str = "???"
    dataset: str = "csv"


class KitAccountant(Enum):
    """Accountants a site may enforce its budget with: upper bounds only (GDP is an
    asymptotic approximation that can undercount, so a kit cannot choose it)."""

    prv = "prv"
    rdp = "rdp"


@dataclass
class SiteKitPrivacy:
    """The hospital's own privacy policy: a lifetime budget it enforces itself, and its ledger.

    ``ledger`` is the JSON Lines file; the Ed25519 signing key defaults to ``<ledger>.key``
    (mode 0600) and its public key to ``<ledger>.pub``, beside the ledger.
    ``require_privacy``: refuse runs without differential privacy (``privacy=none``).
    ``min_noise_multiplier``: refuse runs whose noise (explicit or calibrated) is lower.
    ``max_run_epsilon``: refuse a run aiming above it, and decline a round that would take
    the epsilon spent by that one run above it.
    """

    budget_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    accountant: KitAccountant = KitAccountant.prv
    require_privacy: bool = True
    min_noise_multiplier: float | None = None
    max_run_epsilon: float | None = None
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


def _check_privacy(kit: SiteKit, kit_path: Path) -> None:
    """Out-of-range privacy values are refused with the kit's file and key."""
    p = kit.privacy
    checks = (
        ("budget_epsilon", p.budget_epsilon, "a finite number > 0"),
        ("min_noise_multiplier", p.min_noise_multiplier, "a finite number > 0"),
        ("max_run_epsilon", p.max_run_epsilon, "a finite number > 0"),
    )
    for key, value, allowed in checks:
        if value is not None and not (value > 0.0 and math.isfinite(value)):
            raise FedMedError(f"site kit {kit_path}: privacy.{key}={value}: expected {allowed}")
    if not 0.0 < p.delta < 1.0:
        raise FedMedError(f"site kit {kit_path}: privacy.delta={p.delta}: expected (0, 1)")


def load_site_kit(path: str | Path) -> SiteKit:
    """Read and type-check a kit; its paths come back absolute (``bundled:`` data as is)."""
    kit, kit_path = load_kit(path, SiteKit, "site kit")
    _check_privacy(kit, kit_path)
    resolve_paths(kit, kit_path, PATH_KEYS)
    return kit
