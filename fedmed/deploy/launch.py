"""Start the coordinator's SuperLink and the hospitals' SuperNodes, and submit runs.

TLS and SuperNode authentication are on unless ``--insecure`` is asked for (with a warning).
Every process runs Flower's own binaries (``flower-superlink``, ``flower-supernode``,
``flwr``) from this environment; fedmed only fills in their arguments from the kits.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedmed.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from fedmed.deploy.kits import ServerKit, load_server_kit
from fedmed.errors import FedMedError
from fedmed.sitekit import SiteKit, load_site_kit

CONNECTION = "fedmed"
REPO = Path(__file__).resolve().parents[2]
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


def superlink_command(kit: ServerKit, insecure: bool) -> list[str]:
    """The ``flower-superlink`` command line for this kit."""
    host, port = kit.address.rsplit(":", 1)
    command = [
        _binary("flower-superlink"),
        "--host", host,
        "--port", port,
        "--database", str(Path(kit.state) / "superlink.db"),
        # The ServerApp runs in this environment: Flower would otherwise `uv sync` a fresh
        # one per run from the package's requirements (GBs of CUDA wheels, from the network).
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if insecure:
        return [*command, "--insecure"]
    certs = Path(kit.certs)
    return [
        *command,
        "--ssl-ca-certfile", _require(str(certs / CA_CERT), "consortium CA certificate"),
        "--ssl-certfile", _require(str(certs / SERVER_CERT), "coordinator certificate"),
        "--ssl-keyfile", _require(str(certs / SERVER_KEY), "coordinator private key"),
        "--enable-supernode-auth",
    ]  # fmt: skip


def supernode_command(kit: SiteKit, insecure: bool) -> list[str]:
    """The ``flower-supernode`` command line for a hospital's kit."""
    command = [
        _binary("flower-supernode"),
        "--superlink", kit.coordinator,
        "--port", str(kit.deployment.runtime_port),
        "--node-config", f'site="{kit.name}"',
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
    """A private Flower CLI home whose ``fedmed`` connection points at this SuperLink."""
    home = Path(kit.state) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f'address = "{kit.address}"')
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
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise FedMedError(f"nothing listens on {address} after {timeout:.0f}s")


def register_sites(kit: ServerKit, env: dict[str, str]) -> None:
    """Register every site's public key with the running SuperLink."""
    for public_key in kit.site_public_keys:
        _require(public_key, "site public key")
        done = subprocess.run(
            [_binary("flwr"), "supernode", "register", public_key, CONNECTION],
            env=env, capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        if done.returncode != 0 and "already" not in (done.stdout + done.stderr).lower():
            raise FedMedError(
                f"registering {public_key} failed: {(done.stdout + done.stderr).strip()[-300:]}"
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
    """Run the SuperLink in the foreground; register the sites' keys once it listens."""
    kit = load_server_kit(kit_path)
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    Path(kit.state).mkdir(parents=True, exist_ok=True)

    def when_up() -> None:
        wait_for_port(kit.address)
        if not insecure:
            register_sites(kit, flwr_environment(kit, insecure))
        print(f"SuperLink running; sites connect to {kit.address}", flush=True)

    return run_foreground(superlink_command(kit, insecure), when_up)


def site_start(kit_path: str, insecure: bool) -> int:
    """Run the hospital's SuperNode in the foreground, restarting it whenever it exits.

    A SuperNode exits when it cannot reach or activate with the coordinator (the coordinator
    is down, or still holds this site's connection from before a crash: it lets go after two
    missed heartbeats). An unattended hospital keeps trying; stopping this process stops it.
    """
    kit = load_site_kit(kit_path)
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    command = supernode_command(kit, insecure)
    while True:
        code = run_foreground(command)
        print(
            f"site '{kit.name}': the SuperNode exited with code {code}; restarting in "
            f"{SUPERNODE_RESTART_DELAY_S:g} s (stop with Ctrl+C)",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(SUPERNODE_RESTART_DELAY_S)


def server_run(kit_path: str, overrides: list[str], insecure: bool, run_name: str) -> int:
    """Submit the federation (``flwr run``) with the Hydra overrides; streams its output."""
    from fedmed.configure import compose_config

    compose_config(overrides)  # one-line config errors before anything is submitted
    kit = load_server_kit(kit_path)
    output_dir = Path(kit.output_dir) / run_name
    run_config = f'overrides="{shlex.join(overrides)}" output-dir="{output_dir}"'
    command = [_binary("flwr"), "run", str(REPO), CONNECTION, "--stream", "--run-config",
               run_config]  # fmt: skip
    done = subprocess.run(command, env=flwr_environment(kit, insecure), check=False)
    return done.returncode
