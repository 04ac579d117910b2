"""Deployment on 127.0.0.1: fedmed's SuperLink with TLS and SuperNode authentication, the
four heart-disease hospitals as SuperNodes, each with its own kit, keys and ledger; DP +
SecAgg+; one hospital's SuperNode is killed mid-round and restarted. And the attacks: an
outsider holding only ``ca.crt``, nodes that try to join or pose as another hospital, and
coordinator overrides of what the hospitals' kits own.

One consortium (certificates, kits, SuperLink, five SuperNodes: the four hospitals and a
"rogue" whose key is registered under its own name but which claims to be VA) is shared by
every test in this file. Every process is stopped by PID at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedmed.cli import main as fedmed_main
from fedmed.coordinator.registry import read_registry
from fedmed.coordinator.releases import read_releases
from fedmed.deploy.launch import flower_environment, flwr_environment
from fedmed.kits.server import load_server_kit
from fedmed.privacy.ledger import load_public_key, read_verified
from fedmed.runs.compose import compose_config
from fedmed.runs.exact_evaluation import exact_evaluation
from tests.e2e import REPO

pytestmark = [pytest.mark.slow, pytest.mark.cost(510)]  # seconds, the file alone on 2 cores
SITES = ("cleveland", "hungary", "switzerland", "va")
ROGUE = "rogue"  # registered under its own name; its SuperNode says it is VA
# A stage waits at most this long for a reply (VA's crash is reported well before: its
# SuperNode misses its heartbeats, Flower's fixed 2 x 30 s).
ROUND_TIMEOUT_S = 150
REFUSED_HERE = "serves only the Fleet API"
FLWR = str(Path(sys.executable).with_name("flwr"))
SUPERNODE = str(Path(sys.executable).with_name("flower-supernode"))
# A stray SuperNode gives up after two attempts instead of retrying forever.
RETRIES = ("--max-retries", "2", "--max-wait-time", "10")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fedmed(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmed.cli", *args]


class Processes:
    """Background processes, each in its own process group, all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command,
            cwd=REPO,
            # Flower starts its helpers by name, from PATH; unbuffered: the logs are waited on
            env={**flower_environment(), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _tails(logs: Path) -> str:
    """The end of every process's log, for a failure message."""
    tails = [f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}" for log in logs.iterdir()]
    return "\n".join(sorted(tails))


def _wait_for(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"'{text}' not in {path}:\n{path.read_text(errors='replace')[-2000:]}")


def _wait_for_lines(path: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {count} lines in {timeout} s")


@dataclass
class Consortium:
    """The shared deployment: its files, its running processes, its two addresses."""

    root: Path
    server_kit: Path
    kits: dict[str, Path]
    address: str  # the hospitals' (Fleet API only)
    control_address: str  # the operator's (loopback)
    processes: Processes
    sites: dict[str, subprocess.Popen[bytes]]
    strays: dict[str, subprocess.Popen[bytes]]  # SuperNodes that are not the consortium's

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.processes.logs

    def ledger(self, site: str) -> Path:
        return self.root / "ledgers" / f"{site}.ledger.jsonl"

    def operator(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The Flower CLI as the operator uses it: on the coordinator's loopback address."""
        env = flwr_environment(load_server_kit(self.server_kit), insecure=False)
        return subprocess.run([FLWR, *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip

    def operator_json(self, *args: str) -> Any:
        done = self.operator(*args, "--format", "json")
        return json.loads(done.stdout)

    def run(self, name: str, *overrides: str, timeout: float = 900) -> dict[str, Any]:
        """``fedmed server run`` to its end; the run's summary.json."""
        run = self.processes.start(
            f"run-{name}", _fedmed("server", "run", "--kit", str(self.server_kit), "--name", name,
                                   *overrides)
        )  # fmt: skip
        try:
            run.wait(timeout=timeout)
        except subprocess.TimeoutExpired as late:
            raise AssertionError(
                f"run {name} did not end in {timeout} s\n{_tails(self.logs)}"
            ) from late
        summary_file = self.root / "runs" / name / "summary.json"
        assert summary_file.is_file(), _tails(self.logs)
        summary: dict[str, Any] = json.loads(summary_file.read_text())
        return summary


def _site_kit(root: Path, site: str, address: str, keys: str, ledger: Path) -> dict[str, Any]:
    """The repository's kit for ``site``, with this consortium's address, keys and ledger."""
    kit: dict[str, Any] = yaml.safe_load((REPO / "sites" / f"{site}.yaml").read_text())
    pki = root / "pki" / "sites" / keys
    kit["coordinator"] = address
    kit["privacy"]["ledger"] = str(ledger)
    kit["privacy"]["signing_key"] = str(pki / "ledger.key")
    kit["deployment"] = {
        "ca_cert": str(root / "pki" / "ca.crt"),
        "node_key": str(pki / "node.key"),
        "node_public_key": str(pki / "node.pub"),
        "runtime_port": _free_port(),
    }
    return kit


def _make_consortium(root: Path) -> tuple[Path, dict[str, Path], str, str]:
    """Certificates, a server kit (four hospitals and the rogue), the four hospitals' kits
    and the rogue's (a copy of VA's with the rogue's own keys and ledger)."""
    pki = root / "pki"
    # `fedmed certs` in this process: eight interpreters' start-up saved; the command itself
    # runs as a user runs it in tests/deploy/test_certs.py.
    for args in (["init-ca"], ["server", "--host", "localhost", "127.0.0.1"]):
        assert fedmed_main(["certs", *args, "--dir", str(pki)]) == 0
    for site in (*SITES, ROGUE):
        assert fedmed_main(["certs", "site", site, "--dir", str(pki)]) == 0
    stranger = ["certs", "site", "stranger", "--dir", str(root / "stranger")]
    assert fedmed_main(stranger) == 0  # keys nobody registered
    address = f"127.0.0.1:{_free_port()}"
    control_address = f"127.0.0.1:{_free_port()}"
    server_kit = root / "server.yaml"
    server_kit.write_text(
        yaml.safe_dump(
            {
                "certs": str(pki),
                "address": address,
                "control_address": control_address,
                "state": str(root / "state"),
                "output_dir": str(root / "runs"),
                "sites": {s: str(pki / "sites" / s / "node.pub") for s in (*SITES, ROGUE)},
            }
        )
    )
    kits = {}
    for site in SITES:
        kits[site] = root / f"{site}.yaml"
        ledger = root / "ledgers" / f"{site}.ledger.jsonl"
        kits[site].write_text(yaml.safe_dump(_site_kit(root, site, address, site, ledger)))
    kits[ROGUE] = root / "rogue-posing-as-va.yaml"
    rogue_ledger = root / "rogue-ledgers" / "va.ledger.jsonl"
    kits[ROGUE].write_text(yaml.safe_dump(_site_kit(root, "va", address, ROGUE, rogue_ledger)))
    return server_kit, kits, address, control_address


def _rogue_command(kit_path: Path) -> list[str]:
    """A SuperNode with the rogue's registered key whose node config claims site "va"."""
    kit = yaml.safe_load(kit_path.read_text())
    d = kit["deployment"]
    return [SUPERNODE, "--superlink", kit["coordinator"], "--root-certificates", d["ca_cert"],
            "--auth-supernode-private-key", d["node_key"],
            "--auth-supernode-public-key", d["node_public_key"], "--port", str(d["runtime_port"]),
            "--node-config", f"site=\"va\" kit='{kit_path}'"]  # fmt: skip


def _start_strays(
    root: Path, address: str, processes: Processes
) -> dict[str, subprocess.Popen[bytes]]:
    """SuperNodes that try the hospitals' address: a key nobody registered; no key at all
    (the Fleet API's own self-registration); no TLS. Each gives up after two attempts."""
    keys = root / "stranger" / "sites" / "stranger"
    ca = ("--root-certificates", str(root / "pki" / "ca.crt"))
    key_files = ("--auth-supernode-private-key", str(keys / "node.key"),
                 "--auth-supernode-public-key", str(keys / "node.pub"))  # fmt: skip
    strays = {"unregistered": (*ca, *key_files), "self-registering": ca,
              "plaintext": ("--insecure",)}  # fmt: skip
    started: dict[str, subprocess.Popen[bytes]] = {}
    for name, args in strays.items():
        command = [SUPERNODE, "--superlink", address, *args, *RETRIES]
        started[name] = processes.start(name, [*command, "--port", str(_free_port())])
    return started


def _wait_until_online(
    consortium: Consortium, names: tuple[str, ...], count: int, timeout: float = 180
) -> None:
    """Until ``count`` nodes are online for the operator. Each of the SuperNodes ``names``
    first logs its node id once the SuperLink activated it: reading that costs nothing,
    where every `flwr supernode ls` starts an interpreter."""
    deadline = time.monotonic() + timeout
    for name in names:
        _wait_for(consortium.logs / f"{name}.log", "SuperNode ID", timeout)
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        nodes = consortium.operator_json("supernode", "ls").get("nodes", [])
        if sum(node["status"] == "online" for node in nodes) >= count:
            return
        time.sleep(2)
    raise AssertionError(f"{count} nodes not online after {timeout} s: {nodes}\n"
                         f"{_tails(consortium.logs)}")  # fmt: skip


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    """The coordinator's SuperLink, the four hospitals' SuperNodes and the rogue's, online."""
    root = tmp_path_factory.mktemp("deployment")
    (root / "logs").mkdir()
    processes = Processes(root / "logs")
    try:
        server_kit, kits, address, control_address = _make_consortium(root)
        processes.start("server", _fedmed("server", "start", "--kit", str(server_kit)))
        _wait_for(root / "logs" / "server.log", "SuperLink running")
        strays = _start_strays(root, address, processes)
        sites = {s: processes.start(s, _fedmed("site", "start", str(kits[s]))) for s in SITES}
        result = Consortium(
            root, server_kit, kits, address, control_address, processes, sites, strays
        )
        _wait_until_online(result, SITES, len(SITES))
        processes.start(ROGUE, _rogue_command(kits[ROGUE]))
        _wait_until_online(result, (ROGUE,), len(SITES) + 1)
        yield result
    finally:
        processes.stop_all()
        assert all(p.poll() is not None for p in processes.started)


def _outsider_home(consortium: Consortium) -> dict[str, str]:
    """An outsider's Flower CLI home: only ca.crt, pointed at the hospitals' address."""
    home = consortium.root / "outsider-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "outsider"\n\n[superlink.outsider]\n'
        f'address = "{consortium.address}"\nroot-certificates = "{consortium.pki / "ca.crt"}"\n'
    )
    return {**flower_environment(), "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # fmt: skip


def test_an_outsider_with_only_the_ca_certificate_can_neither_list_register_nor_submit(
    consortium: Consortium,
) -> None:
    registry = read_registry(consortium.root / "state" / "site-registry.json")
    assert sorted(registry.values()) == sorted((*SITES, ROGUE))
    runs_before = consortium.operator_json("ls")["runs"]
    keys = consortium.root / "stranger" / "sites" / "stranger"
    env = _outsider_home(consortium)
    attempts = {
        "flwr ls": ["ls", "outsider"],
        "flwr supernode ls": ["supernode", "ls", "outsider"],
        "flwr supernode register": ["supernode", "register", str(keys / "node.pub"), "outsider"],
        "flwr run": ["run", str(REPO), "outsider", "--run-config",
                     'overrides="dataset=heart federation.rounds=1"'],
    }  # fmt: skip
    for what, args in attempts.items():
        done = subprocess.run([FLWR, *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        output = " ".join((done.stdout + done.stderr).split())  # rich wraps the message
        assert done.returncode != 0, (what, output)
        assert REFUSED_HERE in output, (what, output)

    # Nothing was registered and no run was started: the operator sees the same as before.
    nodes = consortium.operator_json("supernode", "ls")["nodes"]
    assert {int(node["node-id"]) for node in nodes} == set(registry)
    assert consortium.operator_json("ls")["runs"] == runs_before

    # The SuperNodes that tried to join (started with the consortium) were all turned away.
    for name, process in consortium.strays.items():
        assert process.wait(timeout=240) != 0, name
    logs = consortium.logs
    assert "Failed to activate SuperNode" in (logs / "unregistered.log").read_text()
    self_registering = (logs / "self-registering.log").read_text()
    assert "Failed to initialize the connection" in self_registering, self_registering[-2000:]
    # Flower's Fleet API refuses self-registration under --enable-supernode-auth (code 2001)
    assert "All SuperNodes must be registered" in self_registering, self_registering[-2000:]
    assert len(consortium.operator_json("supernode", "ls")["nodes"]) == len(registry)


@pytest.fixture(scope="module")
def secure_run(consortium: Consortium) -> dict[str, Any]:
    """Three DP + SecAgg+ rounds; VA's SuperNode is killed in round 1 and restarted."""
    # The coordinator names no hospital's kit: each site reads its own (node config `kit`).
    run = consortium.processes.start(
        "run-e2e",
        _fedmed("server", "run", "--kit", str(consortium.server_kit), "--name", "e2e",
                "dataset=heart_kits", "privacy=dp",
                "secagg=secaggplus", "federation.rounds=3",
                f"federation.round_timeout={ROUND_TIMEOUT_S}"),
    )  # fmt: skip
    # Crash: VA's SuperNode (its whole process group) is killed once VA has recorded round 1,
    # i.e. mid-round, before or while its update travels; VA's IT restarts it once the
    # coordinator has recorded the loss (the SuperLink reports the node gone when it misses its
    # heartbeats). Back earlier, under its node id, VA would leave the SuperLink nothing to
    # report: the stage would wait for the lost reply until the round timeout.
    _wait_for_lines(consortium.ledger("va"), 1, timeout=600)
    os.killpg(consortium.sites["va"].pid, signal.SIGKILL)
    consortium.sites["va"].wait()
    _wait_for(consortium.logs / "run-e2e.log", "failed at va", timeout=ROUND_TIMEOUT_S + 60)
    consortium.sites["va"] = consortium.processes.start(
        "va-restarted", _fedmed("site", "start", str(consortium.kits["va"]))
    )
    try:
        code = run.wait(timeout=900)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, _tails(consortium.logs)
    summary: dict[str, Any] = json.loads((consortium.root / "runs" / "e2e" / "summary.json")
                                         .read_text())  # fmt: skip
    return summary


def test_four_hospitals_over_tls_with_dp_and_secagg(
    consortium: Consortium, secure_run: dict[str, Any]
) -> None:
    summary = secure_run
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    secure = summary["secure_aggregation"]
    assert secure["protocol"] == "secaggplus"
    # Only VA was lost, and only while it was down; the others trained every round. (The
    # rogue is no site of this run: test_a_node_that_is_no_site_of_the_run_is_never_sampled.)
    lost = {d["site"] for d in secure["dropped"]} | {f["site"] for f in summary["failures"]}
    assert lost == {"va"}, (secure["dropped"], summary["failures"])
    # Every round aggregated: VA's crash leaves three sites, enough to unmask (a node refused
    # at setup would still hold a place in their share graph, and this round would fail).
    assert secure["failed_rounds"] == [], secure["failed_rounds"]
    # The model itself, exactly (this test holds the kits' data), and what the coordinator
    # learnt of it: the sum of the hospitals' noisy counts, unmasked by SecAgg+ after round 3.
    run_dir = consortium.root / "runs" / "e2e"
    exact = exact_evaluation(run_dir, compose_config(["dataset=heart_kits", "privacy=dp"]))
    assert exact.accuracy >= 0.70  # simulation: 0.75-0.80 at epsilon 1
    assert summary["global"]["evaluation"] == "private" and summary["global"]["round"] == 3
    assert abs(summary["global"]["accuracy"] - exact.accuracy) < 0.2  # noise sd about 0.04
    entries_by_hash = {}
    for site in SITES:
        ledger = consortium.ledger(site)
        entries = read_verified(ledger, load_public_key(consortium.pki / "sites" / site
                                                        / "ledger.pub"))  # fmt: skip
        entries_by_hash.update({e["hash"]: e for e in entries})
        rounds = [e["round"] for e in entries if e.get("split", "train") == "train"]
        if site == "va":  # an entry for an update that never arrived is fine: over-counting
            assert rounds[0] == 1 and rounds[-1] == 3, rounds  # rejoined
        else:
            assert rounds == [1, 2, 3]
        [evaluation] = [e for e in entries if e.get("split") == "evaluation"]
        assert evaluation["round"] == 3 and evaluation["mechanism"] == "gaussian_evaluation_counts"
        assert max(e["record_epsilon"] for e in entries) <= 1.0
        assert summary["sites"][site]["privacy"]["ledger"] == str(ledger)
    # Every value every hospital sent is in the inventory, and each private one (a masked
    # update or masked noisy counts) names the entry its site wrote first.
    releases = read_releases(run_dir)
    assert releases and not [line for line in releases if "problems" in line]
    named = {line["ledger_entry"] for line in releases} - {None}
    assert named <= set(entries_by_hash)
    assert {entries_by_hash[h]["split"] for h in named} == {"train", "evaluation"}
    assert all(v != "EXACT" for line in releases for v in line["values"].values())

    # No private key material in any log.
    secrets = []
    for key in consortium.pki.rglob("*.key"):
        secrets += [line for line in key.read_text().splitlines()[1:-1] if len(line) > 20]
    for log in consortium.logs.iterdir():
        text = log.read_text(errors="replace")
        assert "PRIVATE KEY" not in text, log
        assert not any(secret in text for secret in secrets), log


def _rogue_node(consortium: Consortium) -> int:
    registry = read_registry(consortium.root / "state" / "site-registry.json")
    [node] = [node for node, site in registry.items() if site == ROGUE]
    return node


def test_a_node_that_is_no_site_of_the_run_is_never_sampled(
    consortium: Consortium, secure_run: dict[str, Any]
) -> None:
    """The rogue's key is registered as "rogue" and its SuperNode says it is VA: the run's
    sites are the four hospitals, so it gets no message at all (not even SecAgg+ setup)."""
    [noted] = secure_run["unsampled_nodes"]
    assert noted["node"] == _rogue_node(consortium) and noted["registered_as"] == ROGUE
    assert "not one of this run's sites" in noted["reason"]
    assert ROGUE not in {f["site"] for f in secure_run["failures"]}
    assert ROGUE not in {d["site"] for d in secure_run["secure_aggregation"]["dropped"]}
    assert ROGUE not in secure_run["sites"]
    assert not (consortium.root / "rogue-ledgers").exists()  # it never trained


def test_a_node_claiming_another_hospitals_name_is_refused(consortium: Consortium) -> None:
    """A run whose sites include "rogue": the rogue's reply says it is VA, so it is refused
    (recorded, never aggregated, not sampled again); the four hospitals' round stands."""
    rogue_kit = yaml.safe_load((REPO / "sites" / "va.yaml").read_text())
    rogue_kit["name"] = ROGUE  # the coordinator's list of the run's sites names it "rogue"
    path = consortium.root / "coordinator-kits" / f"{ROGUE}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(rogue_kit))
    kits = ",".join([*(str(REPO / "sites" / f"{s}.yaml") for s in SITES), str(path)])
    summary = consortium.run("impostor", "dataset=heart_kits", f"dataset.site_kits=[{kits}]",
                             "privacy=dp", "federation.rounds=1")  # fmt: skip
    refusals = [f for f in summary["failures"] if f["site"] == ROGUE]
    assert len(refusals) == 1, summary["failures"]
    [refusal] = refusals
    claim = f"node {_rogue_node(consortium)} is registered as 'rogue' but claims to be 'va'"
    assert refusal["round"] == 1 and refusal["error"].startswith(claim), refusal
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1, summary
    assert summary["history"][0]["round"] == 1
    trained = {s for s, record in summary["sites"].items() if record.get("num_train")}
    assert trained == set(SITES), summary["sites"]  # never the rogue's update, under any name
    va = summary["sites"]["va"]["privacy"]["ledger"]
    assert va == str(consortium.ledger("va")), va  # VA's record is VA's own


def _ledgers(consortium: Consortium) -> dict[str, bytes | None]:
    return {
        s: consortium.ledger(s).read_bytes() if consortium.ledger(s).exists() else None
        for s in SITES
    }


def _assert_refused_by_every_site(summary: dict[str, Any], key: str) -> None:
    failures = summary["failures"]
    refused = {f["site"]: f["error"] for f in failures if "refuses the run" in f["error"]}
    assert set(refused) == set(SITES), summary["failures"]
    for site, error in refused.items():
        assert error.startswith(f"site '{site}': refuses the run") and key in error, error
    trained = {s for s, record in summary["sites"].items() if record.get("num_train")}
    assert not trained, summary["sites"]


def test_a_coordinator_moving_the_ledgers_is_refused_by_every_site(
    consortium: Consortium,
) -> None:
    """`privacy.ledger_dir` from the coordinator once reset every hospital's budget."""
    before = _ledgers(consortium)
    elsewhere = consortium.root / "coordinator-chosen-ledgers"
    summary = consortium.run("override-ledger", "dataset=heart_kits", "privacy=dp",
                             f"privacy.ledger_dir={elsewhere}", "federation.rounds=1")  # fmt: skip
    _assert_refused_by_every_site(summary, "privacy.ledger_dir")
    assert _ledgers(consortium) == before
    assert not elsewhere.exists()


def test_a_coordinator_switching_privacy_off_is_refused_by_every_site(
    consortium: Consortium,
) -> None:
    """`privacy=none` (the default) once trained every hospital with no DP at all."""
    before = _ledgers(consortium)
    summary = consortium.run("override-no-privacy", "dataset=heart_kits")
    _assert_refused_by_every_site(summary, "privacy")
    assert _ledgers(consortium) == before
