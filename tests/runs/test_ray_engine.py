"""Which Ray a simulation uses (engine.address, RAY_ADDRESS, or its own), and that a wrong
address fails at once with one error naming where it came from. The runs on a real cluster
are in test_ray_cluster.py."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmed.config.schema import EngineConfig, FedMedConfig
from fedmed.errors import ConfigError, FedMedError
from fedmed.runs.ray_engine import LOCAL, RAY_ADDRESS, backend_config, cluster_address
from tests.e2e import run_fedmed


def _closed_port() -> str:
    """127.0.0.1:PORT where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def http_server() -> Iterator[str]:
    """An address that answers, but not as a Ray head (a plain HTTP server)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_without_an_address_the_run_starts_its_own_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_ADDRESS, raising=False)
    assert cluster_address(EngineConfig()) is None
    # "local", not None: ray.init(address=None) would join a cluster found on the machine
    backend = backend_config(EngineConfig(), None)
    assert backend["init_args"]["address"] == LOCAL
    assert backend["client_resources"] == {
        "num_cpus": 1.0, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 0,
    }  # fmt: skip


def test_engine_address_wins_over_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    config_address, env_address = _closed_port(), _closed_port()
    monkeypatch.setenv(RAY_ADDRESS, env_address)
    with pytest.raises(FedMedError, match=f"^engine.address={config_address}: no Ray cluster"):
        cluster_address(EngineConfig(address=config_address))
    with pytest.raises(FedMedError, match=f"^RAY_ADDRESS={env_address}: no Ray cluster"):
        cluster_address(EngineConfig())


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("head-node", "engine.address='head-node' is not HOST:PORT"),
        ("127.0.0.1:99999", "engine.address='127.0.0.1:99999' is not HOST:PORT"),
        ("ray://127.0.0.1:10001", "Ray Client addresses are not supported"),
        ("no-such-host.invalid:6379", "engine.address=no-such-host.invalid:6379: no Ray"),
    ],
)
def test_a_malformed_or_unknown_address_is_refused(address: str, message: str) -> None:
    with pytest.raises(FedMedError, match=message):
        cluster_address(EngineConfig(address=address))


def test_an_address_that_is_not_a_ray_head_fails_in_seconds(http_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(FedMedError, match=f"^engine.address={http_server}: no Ray cluster"):
        cluster_address(EngineConfig(address=http_server))
    assert time.monotonic() - started < 15  # ray.init would retry for minutes


def test_a_local_ray_cannot_reserve_more_cpus_than_the_machine_has() -> None:
    cpus = float((os.cpu_count() or 1) + 1)
    with pytest.raises(ConfigError, match=r"engine\.num_cpus_per_site"):
        backend_config(EngineConfig(num_cpus_per_site=cpus), None)
    assert backend_config(EngineConfig(num_cpus_per_site=cpus), "10.0.0.1:6379")  # a cluster's


def test_num_cpus_per_site_must_be_positive(compose: Callable[..., FedMedConfig]) -> None:
    assert compose("engine.num_cpus_per_site=0.5").engine.num_cpus_per_site == 0.5
    with pytest.raises(ConfigError, match=r"engine\.num_cpus_per_site"):
        compose("engine.num_cpus_per_site=0")


def test_the_cli_refuses_a_dead_address_in_one_line(tmp_path: Path) -> None:
    address = _closed_port()
    started = time.monotonic()
    proc = run_fedmed("simulate", f"engine.address={address}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < 60
    [line] = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    assert f"engine.address={address}: no Ray cluster answers there" in line, line
