"""Start the coordinator's SuperLink and the hospitals' SuperNodes, and submit runs.

TLS and SuperNode authentication are on unless ``--insecure`` is asked for (with a warning).
The SuperLink is Flower's own, served by ``fedmed.deploy.superlink`` on two sockets: the
hospitals' address (Fleet API only) and the operator's loopback address (Control and Runtime
APIs), where ``fedmed server run`` submits. SuperNodes and the CLI are Flower's own binaries
(``flower-supernode``, ``flwr``) from this environment; fedmed fills in their arguments from
the kits.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedmed.coordinator.registry import REGISTRY_FILE
from fedmed.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY, certificate_names
from fedmed.errors import FedMedError
from fedmed.kits.server import ServerKit, host_port, load_server_kit
from fedmed.kits.site import SiteKit, load_site_kit

log = logging.getLogger(__name__)

CONNECTION = "fedmed"
# In the kit's state folder: the Flower App project `fedmed server run` submits (its folder
# name is the app's: letters, digits, hyphens), and each run's run config.
APP_PROJECT = "flower-app"
RUN_CONFIGS = "run-configs"
INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication; anyone on the network can "
    "read the traffic and join as a site. Use only for a local test."
)


def _binary(name: str) -> str:
    """Flower's executables from this Python environment."""
    return str(Path(sys.executable).with_name(name))


def flower_environment() -> dict[str, str]:
    """This environment with its ``bin`` first on PATH.

    Flower's processes start their helpers (``flower-superexec``, ``flwr-clientapp``) by
    name, so they must find this environment's copies even when it was not activated.
    """
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}


def _require(path: str | None, what: str) -> str:
    if not path or not Path(path).is_file():
        raise FedMedError(f"{what}: file not found ({path}); see `fedmed certs -h`")
    return path


def registry_path(kit: ServerKit) -> Path:
    """Where ``fedmed server start`` writes node id -> site, and the coordinator reads it."""
    return Path(kit.state) / REGISTRY_FILE


def superlink_command(kit: ServerKit, insecure: bool) -> list[str]:
    """The SuperLink command line for this kit: Flower's arguments, the hospitals' address,
    and (with node authentication) every site's key with its name."""
    host, port = host_port(kit.control_address, "server kit: control_address")
    command = [
        sys.executable, "-m", "fedmed.deploy.superlink",
        "--fleet-address", kit.address,
        "--host", host,
        "--port", str(port),
        "--database", str(Path(kit.state) / "superlink.db"),
        # The ServerApp runs in this environment: Flower would otherwise `uv sync` a fresh
        # one per run from the package's requirements (GBs of CUDA wheels, from the network).
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if insecure:
        return [*command, "--insecure"]
    certs = Path(kit.certs)
    sites = [f"--site={name}={key}" for name, key in kit.sites.items()]
    return [
        *command,
        *sites,
        "--registry", str(registry_path(kit)),
        "--ssl-ca-certfile", _require(str(certs / CA_CERT), "consortium CA certificate"),
        "--ssl-certfile", _require(str(certs / SERVER_CERT), "coordinator certificate"),
        "--ssl-keyfile", _require(str(certs / SERVER_KEY), "coordinator private key"),
        "--enable-supernode-auth",
    ]  # fmt: skip


def config_string(value: str, what: str) -> str:
    """``value`` quoted for Flower's ``key=value`` config strings (TOML, no escapes)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    raise FedMedError(f"{what} {value!r}: a path with both quote kinds cannot be passed to Flower")


def supernode_command(kit: SiteKit, kit_path: str | Path, insecure: bool) -> list[str]:
    """The ``flower-supernode`` command line for a hospital's kit.

    Its node config names the site and its kit file (absolute): the ClientApp reads the
    site's policy from that kit, on the hospital's own machine.
    """
    kit_file = config_string(str(Path(kit_path).expanduser().resolve()), "site kit")
    command = [
        _binary("flower-supernode"),
        "--superlink", kit.coordinator,
        "--port", str(kit.deployment.runtime_port),
        "--node-config", f'site="{kit.name}" kit={kit_file}',
    ]  # fmt: skip
    if insecure:
        return [*command, "--insecure"]
    d = kit.deployment
    return [
        *command,
        "--root-certificates", _require(d.ca_cert, f"site '{kit.name}': deployment.ca_cert"),
        "--auth-supernode-private-key",
        _require(d.node_key, f"site '{kit.name}': deployment.node_key"),
        "--auth-supernode-public-key",
        _require(d.node_public_key, f"site '{kit.name}': deployment.node_public_key"),
    ]  # fmt: skip


def flwr_environment(kit: ServerKit, insecure: bool) -> dict[str, str]:
    """A private Flower CLI home whose ``fedmed`` connection points at the operator's
    (loopback) address."""
    home = Path(kit.state) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f'address = "{kit.control_address}"')
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(kit.certs) / CA_CERT}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return {
        **flower_environment(),
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def wait_for_port(address: str, timeout: float = 30.0) -> None:
    """Block until something listens on ``host:port``."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FedMedError(f"nothing listens on {address} after {timeout:.0f}s")


def check_server_kit(kit: ServerKit) -> None:
    """What ``fedmed server start`` needs before it starts anything: each site's key, and
    a certificate the operator's loopback connection can verify."""
    from fedmed.deploy.superlink import node_public_key

    if not kit.sites:
        raise FedMedError(
            "server kit: 'sites' is empty; list each hospital as NAME: path/to/node.pub"
        )
    owners: dict[bytes, str] = {}
    for name, key in kit.sites.items():
        other = owners.setdefault(node_public_key(name, key), name)
        if other != name:
            raise FedMedError(
                f"server kit: sites.{other} and sites.{name} list the same key; each hospital "
                "has its own node.pub"
            )
    cert = Path(_require(str(Path(kit.certs) / SERVER_CERT), "coordinator certificate"))
    host, _ = host_port(kit.control_address, "server kit: control_address")
    if host not in certificate_names(cert):
        raise FedMedError(
            f"coordinator certificate {cert} has no SAN for {host} (server kit: "
            "control_address, where the operator's tools and the ServerApp connect); "
            "re-issue it with `fedmed certs server --force --host <hospitals' names> "
            f"{host}`"
        )


SUPERNODE_RESTART_DELAY_S = 10.0


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def run_foreground(command: list[str], when_up: Callable[[], None] | None = None) -> int:
    """Run a Flower process until it exits; stopping this one (Ctrl+C, SIGTERM) stops it."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    process = subprocess.Popen(command, env=flower_environment())
    try:
        if when_up is not None:
            when_up()
        return process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def server_start(kit_path: str, insecure: bool) -> int:
    """Run the SuperLink in the foreground: the server kit's sites are registered (and no
    other node) before it listens."""
    kit = load_server_kit(kit_path)
    if insecure:
        log.warning(INSECURE_WARNING)
    else:
        check_server_kit(kit)
    Path(kit.state).mkdir(parents=True, exist_ok=True)

    def when_up() -> None:
        wait_for_port(kit.address)
        wait_for_port(kit.control_address)
        log.info(
            f"SuperLink running; hospitals connect to {kit.address} (Fleet API only); "
            f"the operator's API is on {kit.control_address} (this machine only)",
        )

    return run_foreground(superlink_command(kit, insecure), when_up)


def site_start(kit_path: str, insecure: bool) -> int:
    """Run the hospital's SuperNode in the foreground, restarting it whenever it exits.

    A SuperNode exits when it cannot reach or activate with the coordinator (the coordinator
    is down, or still holds this site's connection from before a crash: it lets go after two
    missed heartbeats). An unattended hospital keeps trying; stopping this process stops it.
    """
    kit = load_site_kit(kit_path)
    if insecure:
        log.warning(INSECURE_WARNING)
    command = supernode_command(kit, kit_path, insecure)
    while True:
        code = run_foreground(command)
        log.warning(
            f"site '{kit.name}': the SuperNode exited with code {code}; restarting in "
            f"{SUPERNODE_RESTART_DELAY_S:g} s (stop with Ctrl+C)",
        )
        time.sleep(SUPERNODE_RESTART_DELAY_S)


def server_run(kit_path: str, overrides: list[str], insecure: bool, run_name: str) -> int:
    """Submit the federation (``flwr run``, on the operator's address) with the Hydra
    overrides and the site registry; streams its output."""
    from fedmed.runs.compose import compose_config
    from fedmed.runs.flower_project import (
        OUTPUT_DIR_KEY,
        OVERRIDES_KEY,
        REGISTRY_KEY,
        write_app_project,
        write_run_config,
    )

    compose_config(overrides)  # one-line config errors before anything is submitted
    kit = load_server_kit(kit_path)
    run_config = {
        OVERRIDES_KEY: shlex.join(overrides),
        OUTPUT_DIR_KEY: str(Path(kit.output_dir) / run_name),
    }
    if not insecure:
        registry = registry_path(kit)
        if not registry.is_file():
            raise FedMedError(
                f"site registry {registry}: file not found; start the coordinator first "
                f"(`fedmed server start --kit {kit_path}`)"
            )
        run_config[REGISTRY_KEY] = str(registry)
    # The Flower App project comes from the installed fedmed: no checkout needed.
    state = Path(kit.state)
    app = write_app_project(state / APP_PROJECT)
    config_file = write_run_config(state / RUN_CONFIGS / f"{run_name}.toml", run_config)
    command = [_binary("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config",
               str(config_file)]  # fmt: skip
    done = subprocess.run(command, env=flwr_environment(kit, insecure), check=False)
    return done.returncode
