"""fedmed's SuperLink entry: the hospitals' socket serves the Fleet API only, the operator's
loopback socket everything; node keys come from the server kit only, each bound to its site.

The deployment itself (real sockets, the real flwr CLI and SuperNodes) is exercised in
tests/test_deployment_e2e.py; these check the pieces on Flower's real app and LinkState.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.superlink.main import create_app

from fedmed.cli import main as fedmed_main
from fedmed.coordinator.registry import read_registry, write_registry
from fedmed.deploy.certs import certificate_names
from fedmed.deploy.launch import check_server_kit, superlink_command, supernode_command
from fedmed.deploy.superlink import FleetOnlyOffLoopback, fleet_paths, node_public_key
from fedmed.errors import FedMedError
from fedmed.kits.server import load_server_kit
from fedmed.kits.site import load_site_kit
from tests.e2e import REPO

# Every path Flower's SuperNode calls (flwr/supernode/fleet_http_client.py, 1.41).
SUPERNODE_PATHS = {
    f"/v1/fleet/{name}"
    for name in (
        "register-node", "activate-node", "deactivate-node", "unregister-node",
        "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
        "push-object", "pull-object", "confirm-message-received",
    )
}  # fmt: skip
OPERATOR_PORT = 9093


@pytest.fixture(scope="module")
def app() -> Any:
    return create_app()  # Flower's own SuperLink app (in-memory state)


def _call(guard: FleetOnlyOffLoopback, path: str, server: tuple[str, int] | None) -> int:
    """The status the guard answers (200: passed to the app)."""
    sent: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    guard.app = inner
    scope = {"type": "http", "path": path, "server": server, "method": "POST"}
    asyncio.run(guard(scope, receive, send))
    return int(sent[0]["status"])


def test_the_fleet_paths_are_exactly_what_a_supernode_calls(app: Any) -> None:
    paths = fleet_paths(app)
    assert paths == SUPERNODE_PATHS


def test_the_hospitals_socket_gets_the_fleet_api_only(app: Any) -> None:
    guard = FleetOnlyOffLoopback(app, OPERATOR_PORT, fleet_paths(app))
    hospitals = ("10.0.0.5", 9091)
    for path in SUPERNODE_PATHS:
        assert _call(guard, path, hospitals) == 200
    refused = ["/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run",
               "/v1/runtime/push-messages", "/v1/runtime/get-nodes", "/docs", "/openapi.json",
               "/health", "/v1/fleet/../control/list-nodes", "/v1/fleet/",
               "/v1/fleetx"]  # fmt: skip
    for path in refused:
        assert _call(guard, path, hospitals) == 403, path


def test_only_the_operators_loopback_socket_gets_the_rest(app: Any) -> None:
    guard = FleetOnlyOffLoopback(app, OPERATOR_PORT, fleet_paths(app))
    control = "/v1/control/start-run"
    assert _call(guard, control, ("127.0.0.1", OPERATOR_PORT)) == 200
    assert _call(guard, control, ("::1", OPERATOR_PORT)) == 200
    # The hospitals' socket on loopback too (all on one machine), another port: refused.
    assert _call(guard, control, ("127.0.0.1", 9091)) == 403
    # The operator's port but not loopback (cannot be bound so, but fail closed), or unknown.
    assert _call(guard, control, ("10.0.0.5", OPERATOR_PORT)) == 403
    assert _call(guard, control, None) == 403


def test_the_refusal_says_where_the_control_api_is(app: Any) -> None:
    guard = FleetOnlyOffLoopback(app, OPERATOR_PORT, fleet_paths(app))
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": "/v1/control/list-runs", "server": ("10.0.0.5", 9091)}
    asyncio.run(guard(scope, receive, send))
    detail = json.loads(sent[1]["body"])["detail"]
    assert "only the Fleet API" in detail and "control_address" in detail


def _pki(tmp_path: Path, *sites: str) -> Path:
    pki = tmp_path / "pki"
    assert fedmed_main(["certs", "init-ca", "--dir", str(pki)]) == 0
    assert fedmed_main(["certs", "server", "--dir", str(pki), "--host", "coord.example"]) == 0
    for site in sites:
        assert fedmed_main(["certs", "site", site, "--dir", str(pki)]) == 0
    return pki


def _server_kit(tmp_path: Path, pki: Path, **changes: Any) -> Path:
    body = {
        "certs": str(pki),
        "address": "0.0.0.0:9091",
        "state": "state",
        "sites": {s: f"pki/sites/{s}/node.pub" for s in ("va", "cleveland")},
        **changes,
    }
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_registration_binds_each_kit_key_to_its_site_and_drops_any_other(
    tmp_path: Path, app: Any
) -> None:
    """Flower's Control API handlers on its real LinkState: what start-up registers."""
    from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.supercore.auth.typing import AccountInfo

    from fedmed.deploy.superlink import register_sites

    pki = _pki(tmp_path, "va", "cleveland", "stranger")
    keys = {s: node_public_key(s, str(pki / "sites" / s / "node.pub")) for s in ("va", "stranger")}
    state = app.state.linkstate_factory.state()
    account = AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)
    first = register_sites(state, account, keys)
    assert sorted(first.values()) == ["stranger", "va"]
    # Restart with a kit that no longer lists "stranger" but lists cleveland.
    keys = {s: node_public_key(s, str(pki / "sites" / s / "node.pub")) for s in ("va", "cleveland")}
    second = register_sites(state, account, keys)
    [va] = [n for n, s in first.items() if s == "va"]
    assert second[va] == "va"  # the database survives restarts: same node id
    assert sorted(second.values()) == ["cleveland", "va"]
    live = {i.node_id for i in state.get_node_info() if i.status != "unregistered"}
    assert live == set(second)
    with pytest.raises(FedMedError, match=r"same node\.pub"):
        register_sites(state, account, {"a": keys["va"], "b": keys["va"]})


def test_the_registry_file_round_trips_and_says_how_to_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "state" / "site-registry.json"
    write_registry(path, {12345678901234567890: "va", 7: "cleveland"})
    assert read_registry(path) == {12345678901234567890: "va", 7: "cleveland"}
    with pytest.raises(FedMedError, match="file not found; restart `fedmed server start`"):
        read_registry(tmp_path / "missing.json")
    path.write_text('{"format": 1, "nodes": {"1": "va", "2": "va"}}')
    with pytest.raises(FedMedError, match="appears twice"):
        read_registry(path)


def test_a_server_kit_names_each_sites_key_and_keeps_the_operator_on_loopback(
    tmp_path: Path,
) -> None:
    pki = _pki(tmp_path, "va", "cleveland")
    kit = load_server_kit(_server_kit(tmp_path, pki))
    assert kit.sites == {s: str(pki / "sites" / s / "node.pub") for s in ("va", "cleveland")}
    assert kit.control_address == "127.0.0.1:9093"
    check_server_kit(kit)  # keys load; the certificate covers 127.0.0.1 (added by certs)
    assert {"coord.example", "localhost", "127.0.0.1"} <= certificate_names(pki / "server.pem")
    command = superlink_command(kit, insecure=False)
    assert command[1:3] == ["-m", "fedmed.deploy.superlink"]
    host = command.index("--host")
    assert command[host : host + 4] == ["--host", "127.0.0.1", "--port", "9093"]
    assert command[command.index("--fleet-address") + 1] == "0.0.0.0:9091"
    assert f"--site=va={pki}/sites/va/node.pub" in command

    for changes, message in (
        ({"control_address": "0.0.0.0:9093"}, "must be on this machine's loopback"),
        ({"control_address": "10.1.2.3:9093"}, "must be on this machine's loopback"),
        ({"control_address": "127.0.0.1:9091"}, "share port 9091"),
        ({"control_address": "127.0.0.1"}, "is not HOST:PORT"),
        ({"sites": {"v a": "pki/sites/va/node.pub"}}, "'v a' is not a usable site name"),
    ):
        with pytest.raises(FedMedError, match=message):
            load_server_kit(_server_kit(tmp_path, pki, **changes))

    missing = load_server_kit(_server_kit(tmp_path, pki, sites={"va": "pki/sites/nobody.pub"}))
    with pytest.raises(FedMedError, match=r"sites\.va=.*nobody\.pub: file not found"):
        check_server_kit(missing)
    same = {"va": "pki/sites/va/node.pub", "cleveland": "pki/sites/va/node.pub"}
    with pytest.raises(FedMedError, match=r"sites\.cleveland and sites\.va list the same key"):
        check_server_kit(load_server_kit(_server_kit(tmp_path, pki, sites=same)))
    with pytest.raises(FedMedError, match="'sites' is empty"):
        check_server_kit(load_server_kit(_server_kit(tmp_path, pki, sites={})))


def test_an_old_server_kit_listing_bare_keys_gets_one_clear_error(tmp_path: Path) -> None:
    pki = _pki(tmp_path, "va")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"certs": str(pki), "site_public_keys": ["pki/va.pub"]}))
    with pytest.raises(FedMedError) as refused:
        load_server_kit(path)
    message = str(refused.value)
    assert str(path) in message and "'site_public_keys' is replaced by 'sites'" in message
    assert "\n" not in message


def test_a_certificate_without_the_loopback_name_is_refused_at_start(tmp_path: Path) -> None:
    pki = _pki(tmp_path, "va", "cleveland")
    kit = load_server_kit(_server_kit(tmp_path, pki, control_address="[::1]:9093"))
    assert "::1" not in certificate_names(pki / "server.pem")
    with pytest.raises(FedMedError, match="no SAN for ::1"):
        check_server_kit(kit)


def test_a_supernode_names_its_site_and_its_own_kit() -> None:
    kit_path = REPO / "sites" / "va.yaml"
    command = supernode_command(load_site_kit(kit_path), kit_path, insecure=True)
    node_config = command[command.index("--node-config") + 1]
    assert node_config == f"site=\"va\" kit='{kit_path}'"
    from flwr.common.config import parse_config_args

    assert parse_config_args([node_config]) == {"site": "va", "kit": str(kit_path)}
