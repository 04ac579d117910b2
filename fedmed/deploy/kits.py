"""The coordinator's deployment kit (``server/*.yaml``), typed like the site kits.

Relative paths are read from the kit's own folder, so a kit can travel with its files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedmed.kitfile import beside, load_kit


@dataclass
class ServerKit:
    """What the coordinating centre fills in."""

    certs: str = "???"  # folder with ca.crt, server.pem, server.key (from `fedmed certs`)
    # host:port of the SuperLink's HTTPS API: SuperNodes connect and `fedmed server run`
    # submits runs here (Flower 1.41 serves both on one port).
    address: str = "127.0.0.1:9091"
    state: str = "state"  # SuperLink database and the Flower CLI's home
    site_public_keys: list[str] = field(default_factory=list)  # each site's node.pub
    output_dir: str = "runs"  # run folders (summary.json, checkpoints)


def load_server_kit(path: str | Path) -> ServerKit:
    """Read and type-check the coordinator's kit; paths come back absolute."""
    kit, kit_path = load_kit(path, ServerKit, "server kit")
    kit.certs = beside(kit_path, kit.certs)
    kit.state = beside(kit_path, kit.state)
    kit.output_dir = beside(kit_path, kit.output_dir)
    kit.site_public_keys = [beside(kit_path, p) for p in kit.site_public_keys]
    return kit
