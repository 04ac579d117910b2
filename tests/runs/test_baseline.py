"""Pooled and local-only baselines on the real heart-disease hospitals."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import read_summary, run_fedmed

pytestmark = pytest.mark.cost(30)  # seconds, the file alone on 2 cores


@pytest.mark.parametrize("model", ["svm", "logreg"])
def test_pooled_baseline_reaches_reference_accuracy(tmp_path: Path, model: str) -> None:
    proc = run_fedmed("baseline", "mode=pooled", f"model={model}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = read_summary(tmp_path)
    assert summary["mode"] == "pooled" and summary["strategy"] == "baseline-pooled"
    # Pooled non-private references on this data (FLamby): about 0.79; 230 test records.
    assert summary["global"]["accuracy"] >= 0.76
    assert len(summary["history"]) == 10


def test_local_baseline_evaluates_each_site_on_its_own_split(tmp_path: Path) -> None:
    proc = run_fedmed("baseline", "mode=local", "federation.rounds=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = read_summary(tmp_path)
    assert set(summary["sites"]) == {"cleveland", "hungary", "switzerland", "va"}
    total_test = sum(s["num_test"] for s in summary["sites"].values())
    assert total_test == 230
    assert 0.6 <= summary["global"]["accuracy"] <= 1.0
