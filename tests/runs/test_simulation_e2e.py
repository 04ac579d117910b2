"""End-to-end: the real CLI on Flower's Ray simulation engine with the bundled heart data."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedmed.data import load_site, num_sites
from fedmed.metrics import EvalStats
from fedmed.models import build_loss, build_model
from fedmed.process_tree import command_line, descendants, start_time
from fedmed.runs.compose import compose_config
from fedmed.train import evaluate
from tests.e2e import REPO, read_summary, run_fedmed

pytestmark = [pytest.mark.slow, pytest.mark.cost(150)]  # seconds, the file alone on 2 cores
BUNDLED = "bundled:heart_disease/processed"


def _global_stats(overrides: list[str], state_dict: dict | None) -> EvalStats:
    """A model's (initial if state_dict is None) figures on the union of all test splits."""
    cfg = compose_config(overrides)
    sites = [load_site(cfg, i) for i in range(num_sites(cfg))]
    model = build_model(cfg.model.name, sites[0].schema, cfg.seed)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    loss_fn = build_loss(cfg.model.name)
    stats = [evaluate(model, loss_fn, s.x_test, s.y_test, s.num_classes) for s in sites]
    return EvalStats.merge(stats)


def test_heart_federation_trains_and_writes_outputs(tmp_path: Path) -> None:
    overrides = ["dataset=heart", "model=svm", "federation.rounds=3"]
    proc = run_fedmed("simulate", *overrides, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (1, 2, 3):
        assert f"round   {r}/3 | loss" in proc.stdout
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed" and summary["failures"] == []
    assert [h["round"] for h in summary["history"]] == [1, 2, 3]
    assert set(summary["sites"]) == {"cleveland", "hungary", "switzerland", "va"}
    assert (
        summary["sites"]["cleveland"]["num_train"] + summary["sites"]["cleveland"]["num_test"]
        == 303
    )

    initial = _global_stats(overrides, None).accuracy
    final = summary["global"]["accuracy"]
    assert final > initial + 0.05, (initial, final)
    # Each hospital's split is seeded by its name (not its place in the list): seeds 0-4 give
    # 0.744, 0.770, 0.778, 0.783, 0.813 (seed 0, used here, is the lowest).
    assert final >= 0.74

    # The saved global model reproduces the reported global figures exactly, the clinical
    # ones included (in the summary, its history and the progress line).
    saved = _global_stats(overrides, torch.load(tmp_path / "global_model.pt"))
    assert saved.accuracy == pytest.approx(final, abs=1e-9)
    for rate in ("balanced_accuracy", "sensitivity", "specificity"):
        assert summary["global"][rate] == pytest.approx(getattr(saved, rate), abs=1e-9), rate
        assert summary["history"][-1][rate] == summary["global"][rate]
    assert summary["global"]["balanced_accuracy"] >= 0.7
    assert f"balanced {saved.balanced_accuracy:.4f} (sens " in proc.stdout

    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 4
    assert all(0.0 < float(row["balanced_accuracy"]) < 1.0 for row in rows)
    assert (tmp_path / "accuracy.png").stat().st_size > 5000
    assert (tmp_path / "config.yaml").read_text().count("rounds: 3") == 1


def _paths_with_missing_switzerland() -> str:
    files = [
        f"{BUNDLED}.cleveland.data",
        f"{BUNDLED}.hungarian.data",
        "/nonexistent/switzerland.data",
        f"{BUNDLED}.va.data",
    ]
    return f"dataset.paths=[{','.join(files)}]"


def test_failing_site_is_reported_and_federation_continues(tmp_path: Path) -> None:
    """A site without its data file fails every round; a site whose training diverges (NaN
    loss) in round 2 sends nothing that round and trains again in round 3."""
    proc = run_fedmed(
        "simulate",
        "federation.rounds=3",
        _paths_with_missing_switzerland(),
        "inject_faults=[va:nan_loss:2]",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["rounds_completed"] == 3
    failed = {(f["site"], f["round"]): f["error"] for f in summary["failures"]}
    assert set(failed) == {("switzerland", 1), ("switzerland", 2), ("switzerland", 3), ("va", 2)}
    assert "/nonexistent/switzerland.data: file not found" in failed[("switzerland", 1)]
    assert "site 'va': update not sent: the training loss is nan" in failed[("va", 2)]
    assert "switzerland" not in summary["sites"]
    assert "fit failed at switzerland" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    va_trained = [r["round"] for r in rows if r["site"] == "va" and r["train_loss"]]
    assert va_trained == ["1", "3"]
    assert math.isfinite(summary["global"]["loss"])


def test_fewer_than_min_sites_ends_run_with_nonzero_exit(tmp_path: Path) -> None:
    proc = run_fedmed(
        "simulate",
        "federation.rounds=2",
        "federation.min_sites=4",
        _paths_with_missing_switzerland(),
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 1
    summary = read_summary(tmp_path)
    assert summary["status"] == "stopped"
    assert "fewer than federation.min_sites=4" in summary["stop_reason"]
    assert summary["failures"][0]["site"] == "switzerland"


BUSY_WORKER = b"ray::ClientAppActor.run"  # Ray's title for an actor running a message


def test_a_run_whose_every_site_timed_out_exits_and_leaves_no_worker(tmp_path: Path) -> None:
    """Every site is still training (hours of local epochs) when the round times out: the
    coordinator stops the run, and the process ends seconds later with no Ray worker left.
    Flower's Ray engine waited for each unanswered message before exiting (ray.get without a
    timeout): the process and its busy workers had stayed alive until the sites finished.
    The timeout leaves Ray time to start its workers (5 s; 35 s on a loaded 2-core machine)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmed.cli", "simulate", "dataset=heart", "model=svm",
         "federation.rounds=2", "federation.local_epochs=1000000",
         "federation.round_timeout=60", "engine.num_cpus_per_site=2",  # one busy worker
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    seen: dict[int, str | None] = {}
    busy: set[int] = set()  # workers seen running a site's message
    stop = threading.Event()

    def watch() -> None:  # every process the run started, while it runs
        while not stop.is_set():
            for pid in descendants(proc.pid):
                seen.setdefault(pid, start_time(pid))
                try:
                    if command_line(pid).startswith(BUSY_WORKER):
                        busy.add(pid)
                except OSError:
                    continue
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines: list[str] = []
    coordinator_done = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("outputs: "):  # the coordinator's last line
                coordinator_done = time.monotonic()
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        proc.wait(timeout=60)
        ended = time.monotonic()
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines)
    assert proc.returncode == 1, output[-3000:]
    assert coordinator_done is not None, output[-3000:]
    assert ended - coordinator_done < 15, (ended - coordinator_done, output[-3000:])
    summary = read_summary(tmp_path)
    assert summary["status"] == "stopped" and summary["rounds_completed"] == 0
    assert "0 site(s) returned an update" in summary["stop_reason"]
    no_reply = [f for f in summary["failures"] if "no reply within" in f["error"]]
    assert len(no_reply) == 4, summary["failures"]
    watcher.join(timeout=5)
    assert busy, "no Ray worker was running a site's message: the case was not exercised"
    time.sleep(2)
    left = sorted(pid for pid, started in seen.items() if started and start_time(pid) == started)
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left]
