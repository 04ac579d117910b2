"""End-to-end: ``fedmed simulate engine.address=...`` on an existing Ray cluster.

The module starts one real cluster, ``ray start --head --num-cpus=2`` on 127.0.0.1 with its
session files in a folder of its own, and stops it by its own processes (the process group
``ray start`` led, and what those processes started), never ``ray stop``, which ends every
Ray on the machine. Each run checks that the fedmed process is the cluster's driver and
nothing more: no Ray process below it, the sites' workers are the cluster's, no actor of the
run is left on the cluster afterwards, and the cluster is still up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedmed.audit.verify import verify_ledger
from fedmed.process_tree import command_line, descendants, parents
from fedmed.runs.ray_engine import SITE_ACTOR, check_cluster
from tests.e2e import REPO, read_summary, run_fedmed

pytestmark = [pytest.mark.slow, pytest.mark.cost(125)]  # seconds, the file alone on 2 cores
RAY = Path(sys.executable).with_name("ray")
SITES = ("cleveland", "hungary", "switzerland", "va")
SITE_WORKER_TITLE = f"ray::{SITE_ACTOR}".encode()  # Ray's title for a site actor's worker
RAY_PROCESSES = (b"raylet", b"gcs_server", b"ray::", b"ray/dashboard", b"ray/autoscaler")
START_TIMEOUT_S = 180  # `ray start` takes ~10 s, several times that on a loaded 2-core CI
RUN_TIMEOUT_S = 480  # the 2-round DP run took 75-155 s at a load of 8-10, 232 s at 14


@dataclass
class Cluster:
    """A Ray head this module started: its address, process group and raylet."""

    address: str
    group: int
    raylet: int

    def processes(self) -> list[int]:
        return _processes(self.group)

    def site_workers(self) -> list[int]:
        return [p for p in descendants(self.raylet) if _title(p).startswith(SITE_WORKER_TITLE)]


def _processes(group: int) -> list[int]:
    """Every process of the cluster: those in its process group and whatever they started."""
    members = [pid for pid in parents() if _group(pid) == group]
    return sorted({*members, *(child for pid in members for child in descendants(pid))})


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _title(pid: int) -> bytes:
    return command_line(pid).split(b"\0", 1)[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(group: int) -> None:
    """End the cluster's processes: SIGTERM, then SIGKILL what is left after 5 s (the GCS
    and the autoscaler's monitor outlast a SIGTERM by far more)."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in _processes(group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _processes(group) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert _processes(group) == [], "the Ray cluster's processes would not stop"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Ray's sockets live under the temp dir, and an AF_UNIX path must stay under 108 bytes:
    # a short folder in /tmp, not pytest's deeper tmp_path.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = _free_port()
    log = temp / "ray-start.log"
    with log.open("w") as out:
        start = subprocess.Popen(
            [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2",
             "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--include-dashboard=false",
             "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        assert start.wait(timeout=START_TIMEOUT_S) == 0, log.read_text()[-3000:]
        cluster = Cluster(f"127.0.0.1:{port}", start.pid, 0)
        [cluster.raylet] = [p for p in cluster.processes() if b"/raylet/raylet" in _title(p)]
        yield cluster
    finally:
        if start.poll() is None:
            start.kill()
        _stop(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class Watch:
    """Processes seen while a run goes: below this test process, and the cluster's site
    workers."""

    cluster: Cluster
    local: set[bytes] = field(default_factory=set)
    site_workers: set[int] = field(default_factory=set)
    busy: set[int] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.local.update(c for pid in descendants(os.getpid()) if (c := command_line(pid)))
            for pid in self.cluster.site_workers():
                self.site_workers.add(pid)
                if _title(pid).endswith(b".run"):
                    self.busy.add(pid)
            self.stop.wait(0.2)

    def __enter__(self) -> Watch:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _assert_only_a_driver(watch: Watch) -> None:
    """Below the test, only the fedmed process ran; the sites' workers were the cluster's,
    none is left, and the cluster is still up."""
    ray_here = [c[:80] for c in watch.local if any(name in c for name in RAY_PROCESSES)]
    assert ray_here == [], ray_here
    # Every Python process below the test is the fedmed driver (short-lived tools such as
    # the `uname -p` Python's platform module runs are not Ray and not fedmed's). A child
    # caught between fork and exec still shows this test process's own command line.
    own = command_line(os.getpid())
    pythons = [c for c in watch.local if b"python" in c.split(b"\0")[0] and c != own]
    assert all(b"fedmed.cli" in c for c in pythons), [c[:80] for c in pythons]
    assert watch.site_workers, "no site worker of the cluster was seen"
    deadline = time.monotonic() + 20  # actors end asynchronously once their driver is gone
    while watch.cluster.site_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert watch.cluster.site_workers() == [], "site actors were left on the cluster"
    check_cluster(watch.cluster.address, "the test cluster")
    assert watch.cluster.raylet in parents(), "the cluster's raylet is gone"


def test_a_dp_federation_runs_on_an_existing_ray_cluster(cluster: Cluster, tmp_path: Path) -> None:
    with Watch(cluster) as watch:
        proc = run_fedmed(
            "simulate", "dataset=heart", "model=svm", "privacy=dp", "privacy.target_epsilon=1",
            "federation.rounds=2", f"engine.address={cluster.address}", f"hydra.run.dir={tmp_path}",
            timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed" and summary["failures"] == [], summary["failures"]
    # DP: the sites evaluate privately after the last round only (each evaluation costs).
    assert summary["rounds_completed"] == 2 and [h["round"] for h in summary["history"]] == [2]
    assert set(summary["sites"]) == set(SITES)
    for site in SITES:
        spent = summary["sites"][site]["privacy"]
        assert 0 < spent["record_epsilon"] <= spent["budget_epsilon"] == 1.0, spent
        audit = verify_ledger(tmp_path / "ledgers" / f"{site}.ledger.jsonl")
        assert audit.ok and audit.site == site, audit.findings
        assert [(e.round, e.split) for e in audit.entries] == [
            (1, "train"), (2, "train"), (2, "evaluation")
        ]  # fmt: skip
        assert audit.entries[1].recorded_epsilon == pytest.approx(spent["epsilon"])
        assert audit.entries[2].recorded_epsilon == pytest.approx(spent["evaluation_epsilon"])
    _assert_only_a_driver(watch)


def test_work_a_timed_out_round_left_on_the_cluster_is_ended(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Every site is still training when the round times out: the run ends seconds after
    the coordinator, by ending its own actors on the cluster (Flower's engine would wait for
    them for ever), while the cluster stays up. The timeout leaves the cluster time to start
    the sites' workers (5-35 s on a loaded 2-core machine)."""
    with Watch(cluster) as watch:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmed.cli", "simulate", "dataset=heart", "model=svm",
             "federation.rounds=2", "federation.local_epochs=1000000",
             "federation.round_timeout=60", f"engine.address={cluster.address}",
             "engine.num_cpus_per_site=2",  # one busy worker: the others' messages queue
             f"hydra.run.dir={tmp_path}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        lines: list[str] = []
        coordinator_done = None
        limit = threading.Timer(RUN_TIMEOUT_S, proc.kill)  # a hung run fails, never hangs CI
        limit.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("outputs: "):  # the coordinator's last line
                    coordinator_done = time.monotonic()
            proc.wait(timeout=60)
            ended = time.monotonic()
        finally:
            limit.cancel()
            if proc.poll() is None:
                proc.kill()
    output = "".join(lines)
    assert proc.returncode == 1 and coordinator_done is not None, output[-3000:]
    assert ended - coordinator_done < 15, (ended - coordinator_done, output[-3000:])
    summary = read_summary(tmp_path)
    assert summary["status"] == "stopped" and summary["rounds_completed"] == 0
    assert len([f for f in summary["failures"] if "no reply within" in f["error"]]) == 4
    assert watch.busy, "no site worker was running a message: the case was not exercised"
    _assert_only_a_driver(watch)
