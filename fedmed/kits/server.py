"""The coordinator's deployment kit (``server/*.yaml``), typed like the site kits.

Relative paths are read from the kit's own folder, so a kit can travel with its files.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from fedmed.errors import FedMedError
from fedmed.kits.files import beside, load_kit, resolve_paths

DEFAULT_CONTROL_ADDRESS = "127.0.0.1:9093"
# A site name travels in command lines and Flower's node config: no spaces, quotes or '='.
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The kit's folder paths, read from the kit's own folder when relative (and each value of
# ``sites``, a node.pub).
PATH_KEYS = ("certs", "state", "output_dir")


@dataclass
class ServerKit:
    """What the coordinating centre fills in."""

    certs: str = "???"  # folder with ca.crt, server.pem, server.key (from `fedmed certs`)
    # host:port the hospitals' SuperNodes connect to: the SuperLink's Fleet API only.
    address: str = "127.0.0.1:9091"
    # host:port of everything else (Control API: `flwr run`, `flwr ls`, `flwr supernode`;
    # the ServerApp's runtime API): the operator's, on this machine's loopback only.
    control_address: str = DEFAULT_CONTROL_ADDRESS
    # SuperLink database, site registry, the Flower CLI's home, the Flower App project that
    # `fedmed server run` submits and each run's run config.
    state: str = "state"
    # Each hospital's name and its node.pub (public keys only): the only nodes that can
    # connect, each bound to its name.
    sites: dict[str, str] = field(default_factory=dict)
    output_dir: str = "runs"  # run folders (summary.json, checkpoints)


def _refuse_old_key_list(kit_path: Path) -> None:
    """Kits from before site names were bound to keys listed bare ``site_public_keys``."""
    raw = OmegaConf.load(kit_path) if kit_path.is_file() else None
    if raw is not None and "site_public_keys" in raw:
        raise FedMedError(
            f"server kit {kit_path}: 'site_public_keys' is replaced by 'sites', a mapping of "
            "each hospital's name to its node.pub (e.g. `sites: {va: ../pki/sites/va/"
            "node.pub}`), so that a node cannot claim another hospital's name"
        )


def host_port(address: str, where: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) split; ``where`` names the setting in the error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedMedError(f"{where}={address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_addresses(kit: ServerKit, kit_path: Path) -> None:
    """The operator's address must be loopback and apart from the hospitals' address."""
    label = f"server kit {kit_path}"
    control_host, control_port = host_port(kit.control_address, f"{label}: control_address")
    _, fleet_port = host_port(kit.address, f"{label}: address")
    if not is_loopback(control_host):
        raise FedMedError(
            f"{label}: control_address={kit.control_address!r} must be on this machine's "
            "loopback (127.0.0.1, ::1 or localhost): whoever reaches it controls the "
            "federation (submits runs, registers nodes)"
        )
    if control_port == fleet_port:
        raise FedMedError(
            f"{label}: control_address and address share port {fleet_port}; give the "
            f"operator's API its own port (default {DEFAULT_CONTROL_ADDRESS})"
        )


def load_server_kit(path: str | Path) -> ServerKit:
    """Read and type-check the coordinator's kit; paths come back absolute."""
    _refuse_old_key_list(Path(path).expanduser())
    kit, kit_path = load_kit(path, ServerKit, "server kit")
    resolve_paths(kit, kit_path, PATH_KEYS)
    for name in kit.sites:
        if not SITE_NAME.fullmatch(name):
            raise FedMedError(
                f"server kit {kit_path}: sites: {name!r} is not a usable site name (letters, "
                "digits, '_', '.', '-'; as in the site's kit)"
            )
    kit.sites = {name: beside(kit_path, key) for name, key in kit.sites.items()}
    _check_addresses(kit, kit_path)
    return kit
