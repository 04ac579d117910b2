"""Kill the coordinator after round 2 of 4, resume, and end with the uninterrupted model."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmed.coordinator.checkpoint import CHECKPOINT_FILE
from tests.e2e import REPO, read_summary, run_fedmed

pytestmark = [pytest.mark.slow, pytest.mark.cost(80)]  # seconds, the file alone on 2 cores
# FedAdam: the resumed run must also restore the server optimiser's moments.
RUN = ["dataset=heart", "model=svm", "strategy=fedadam", "federation.rounds=4"]


def _checkpoint_round(run_dir: Path) -> int:
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return int(pickle.load(handle).round)


def test_a_killed_coordinator_resumes_to_the_uninterrupted_model(tmp_path: Path) -> None:
    full = tmp_path / "full"
    assert run_fedmed("simulate", *RUN, f"hydra.run.dir={full}").returncode == 0

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(
        [sys.executable, "-m", "fedmed.cli", "simulate", *RUN, f"hydra.run.dir={crashed}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while _checkpoint_round(crashed) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # coordinator and its simulated sites
        process.wait()
    killed_after = _checkpoint_round(crashed)
    assert killed_after == 2, killed_after
    assert not (crashed / "summary.json").exists()  # it really died mid-run

    proc = run_fedmed("simulate", *RUN, "resume=true", f"hydra.run.dir={crashed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after round 2" in proc.stdout
    summary = read_summary(crashed)
    assert summary["status"] == "completed" and summary["resumed_after_round"] == 2
    assert [h["round"] for h in summary["history"]] == [1, 2, 3, 4]
    assert summary["global"] == pytest.approx(read_summary(full)["global"], abs=1e-6)
    # Not bitwise: FedAvg sums the sites' results in arrival order, so float rounding may
    # differ in the last bits (as between two uninterrupted runs); 1e-6 is far below that.
    resumed = torch.load(crashed / "global_model.pt")
    reference = torch.load(full / "global_model.pt")
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


def test_resume_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    proc = run_fedmed("simulate", *RUN, "resume=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert f"no {CHECKPOINT_FILE} in {tmp_path}" in proc.stderr + proc.stdout
