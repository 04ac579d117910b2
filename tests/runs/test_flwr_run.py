"""Smoke test: the same apps run under ``flwr run .`` (Flower's local simulation SuperLink)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import REPO, read_summary

pytestmark = [pytest.mark.slow, pytest.mark.cost(55)]  # seconds, the file alone on 2 cores


def _superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the detached local SuperLink that `flwr run` started under this FLWR_HOME."""
    out = subprocess.run(
        ["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True
    )
    return [int(pid) for pid in out.stdout.split()]


def _stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_flwr_run_uses_the_same_apps(tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr-home"
    out_dir = tmp_path / "out"
    venv_bin = str(Path(sys.executable).parent)  # flwr starts `flower-superlink` from PATH
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    flwr = str(Path(sys.executable).with_name("flwr"))
    try:
        proc = subprocess.run(
            [
                flwr,
                "run",
                ".",
                "--stream",
                "--federation-config",
                "num-supernodes=4",
                "--run-config",
                f'overrides="federation.rounds=2" output-dir="{out_dir}"',
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        started = _superlink_pids(flwr_home)
        _stop(started)
    assert started, f"flwr run started no SuperLink under FLWR_HOME:\n{proc.stdout[-2000:]}"
    assert not _superlink_pids(flwr_home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(out_dir)
    assert summary["status"] == "completed" and summary["failures"] == []
    assert summary["rounds_completed"] == 2
    assert set(summary["sites"]) == {"cleveland", "hungary", "switzerland", "va"}
    assert summary["global"]["accuracy"] > 0.7
