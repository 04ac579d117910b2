"""fedmed's SuperLink: Flower's own SuperLink app, served on two sockets.

Flower 1.41 serves its Control API (``flwr run``, ``flwr ls``, ``flwr supernode register``),
its Fleet API (the SuperNodes) and its Runtime API (the ServerApp) on one HTTPS port, and
its Control API has no authentication outside Flower Enterprise: anyone who trusts the CA
certificate (every hospital, and whoever got ``ca.crt``) could list, register and submit
runs that ship code to every hospital. So this entry builds Flower's app, with Flower's own
argument parsing and lifespan, and serves it twice:

- on the hospitals' address (``--fleet-address``, the server kit's ``address``): the Fleet
  API only; any other path is answered 403;
- on the operator's address (Flower's ``--host``/``--port``, the kit's ``control_address``),
  which must be loopback: everything. Flower's own ServerApp runtime connects there.

Which socket a request came in on is read from the ASGI scope (``scope["server"]``, the
local address of the connection); anything not on the operator's loopback socket gets the
Fleet API only. Before it serves, it registers exactly the server kit's node keys, each
under its site's name, unregisters any other key its database still holds, and writes the
site registry (node id -> site) the coordinator names sites by.

Usage: ``python -m fedmed.deploy.superlink --fleet-address HOST:PORT [--site NAME=NODE_PUB
...] [--registry FILE] FLOWER_SUPERLINK_ARGS...`` (started by ``fedmed server start``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from logging import INFO, WARN
from pathlib import Path
from typing import Any

from fedmed.coordinator.registry import write_registry
from fedmed.errors import FedMedError
from fedmed.terminal import show_on_terminal

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PREFIX = "/v1/fleet/"
REFUSAL = (
    "fedmed: this address serves only the Fleet API (the hospitals' SuperNodes). The Control "
    "API (flwr run, flwr ls, flwr supernode ...) is served on the coordinator's loopback "
    "only (server kit: control_address)"
)
# Flower starts extra gRPC Control/Fleet servers on their own (0.0.0.0) ports when these
# are "1"; they would bypass the split, so this entry never passes them on.
FLOWER_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


class FleetOnlyOffLoopback:
    """ASGI middleware: the whole API on the operator's loopback socket, else Fleet only.

    Fails closed: a request whose local address is unknown, on another port, or not
    loopback gets only the Fleet API's exact paths.
    """

    def __init__(self, app: ASGIApp, operator_port: int, fleet_paths: frozenset[str]) -> None:
        self.app = app
        self.operator_port = operator_port
        self.fleet_paths = fleet_paths

    def on_operator_socket(self, scope: Scope) -> bool:
        server = scope.get("server")
        if not server or server[1] != self.operator_port:
            return False
        try:
            return ipaddress.ip_address(str(server[0])).is_loopback
        except ValueError:
            return False

    def allows(self, scope: Scope) -> bool:
        return self.on_operator_socket(scope) or scope.get("path") in self.fleet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.allows(scope):
            await _refuse(scope, send)
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": "forbidden"})
        return
    body = json.dumps({"detail": REFUSAL}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def fleet_paths(app: Any) -> frozenset[str]:
    """The exact paths of the Fleet API routes the app serves (nothing else, no prefix match)."""
    from fastapi.routing import iter_route_contexts

    paths = {str(rc.path) for rc in iter_route_contexts(app.routes)}
    return frozenset(p for p in paths if p.startswith(FLEET_PREFIX))


def node_public_key(site: str, path: str) -> bytes:
    """A site's node.pub (OpenSSH, NIST EC) as the bytes Flower stores; one-line errors."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    source = Path(path)
    where = f"server kit: sites.{site}={path}"
    if not source.is_file():
        raise FedMedError(f"{where}: file not found (the site's node.pub from `fedmed certs`)")
    try:
        key = serialization.load_ssh_public_key(source.read_bytes())
    except (ValueError, TypeError) as exc:
        raise FedMedError(f"{where}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise FedMedError(f"{where}: not a NIST EC key (`fedmed certs site` makes P-384)")
    return bytes(public_key_to_bytes(key))


def register_sites(state: Any, account: Any, keys: dict[str, bytes]) -> dict[int, str]:
    """Register exactly ``keys`` (site -> node key); returns node id -> site.

    A key already registered keeps its node id (the database survives restarts); a key the
    database holds but the kit no longer lists is unregistered, so it cannot connect.
    """
    from flwr.proto.control_pb2 import RegisterNodeRequest, UnregisterNodeRequest
    from flwr.supercore import log
    from flwr.supercore.constant import NodeStatus

    # Flower 1.41 private module: the Control API's own handlers, called in-process.
    from flwr.superlink.servicer.control import control_handlers

    wanted = set(keys.values())
    if len(wanted) != len(keys):
        raise FedMedError("server kit: two sites list the same node.pub; each needs its own")
    for info in state.get_node_info():
        if info.status != NodeStatus.UNREGISTERED and info.public_key not in wanted:
            request = UnregisterNodeRequest(node_id=info.node_id)
            control_handlers.unregister_node(request, account, state)
            log(WARN, "fedmed: unregistered node %s: not in the server kit", info.node_id)
    nodes: dict[int, str] = {}
    for site, key in keys.items():
        node_id = state.get_node_id_by_public_key(key)
        if node_id is None:
            request = RegisterNodeRequest(public_key=key, name=site)
            node_id = control_handlers.register_node(request, account, state).node_id
        nodes[int(node_id)] = site
        log(INFO, "fedmed: site '%s' is node %s", site, node_id)
    return nodes


def _bind(address: str, what: str) -> socket.socket:
    from flwr.supercore.address import parse_address

    parsed = parse_address(address)
    if parsed is None:
        raise FedMedError(f"{what} {address!r} is not HOST:PORT")
    host, port, is_v6 = parsed
    sock = socket.socket(socket.AF_INET6 if is_v6 else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FedMedError(f"{what} {address}: cannot listen ({exc.strerror})") from None
    return sock


def _loopback_port(host: str, port: int) -> int:
    from fedmed.kits.server import is_loopback

    if not is_loopback(host):
        raise FedMedError(
            f"--host {host}: the operator's API (Control, Runtime) must listen on loopback; "
            "hospitals reach the Fleet API on --fleet-address"
        )
    return port


def serve(app: Any, config: Any, fleet_address: str) -> None:
    """Serve ``app`` with uvicorn on the hospitals' and the operator's sockets (one server,
    one lifespan, the same TLS certificate on both)."""
    import uvicorn
    from flwr.supercore import log
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    operator_port = _loopback_port(config.host, config.port)
    fleet = _bind(fleet_address, "--fleet-address")
    operator = _bind(f"{config.host}:{config.port}", "operator address (--host/--port)")
    guarded = FleetOnlyOffLoopback(app, operator_port, fleet_paths(app))
    server = uvicorn.Server(
        uvicorn.Config(
            guarded,
            interface="asgi3",
            lifespan="on",
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            proxy_headers=False,
            access_log=True,
            log_config=get_uvicorn_log_config(console_handler.level),
            workers=1,  # the lifespan starts the ServerApp runtime (SuperExec) once
        )
    )
    log(INFO, "fedmed: Fleet API for the hospitals on %s", fleet_address)
    log(INFO, "fedmed: Control and Runtime APIs on %s:%s (loopback)", config.host, config.port)
    server.run(sockets=[fleet, operator])


def _own_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m fedmed.deploy.superlink", allow_abbrev=False)
    parser.add_argument("--fleet-address", required=True, help="the hospitals' HOST:PORT")
    parser.add_argument("--site", action="append", default=[], metavar="NAME=NODE_PUB")
    parser.add_argument("--registry", type=Path, help="where to write node id -> site")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse fedmed's and Flower's arguments, register the sites, serve until stopped."""
    show_on_terminal()
    own, flower_args = _own_args(sys.argv[1:] if argv is None else argv)
    for switch in FLOWER_GRPC_SWITCHES:
        os.environ.pop(switch, None)
    # Flower 1.41 private names (flwr is pinned to 1.41.*): its CLI's parsing and lifespan.
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    sys.argv = [sys.argv[0], *flower_args]
    try:
        config = _parse_superlink_lifespan_config()
        _loopback_port(config.host, config.port)
        keys = {}
        for entry in own.site:
            site, _, path = entry.partition("=")
            keys[site] = node_public_key(site, path)
        if keys and not config.enable_supernode_auth:
            raise FedMedError("--site needs --enable-supernode-auth (keys bind nodes to sites)")
        app = create_app(config, SuperLinkLifespan)
        if keys:
            _, account = config.authn_plugin.validate_tokens_in_metadata([])
            nodes = register_sites(app.state.linkstate_factory.state(), account, keys)
            if own.registry is not None:
                write_registry(own.registry, nodes)
        serve(app, config, own.fleet_address)
    except FedMedError as exc:
        log.error(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
