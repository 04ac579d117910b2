"""End-to-end: the coordinator's overrides of what the hospitals' kits own, on the real CLI
and Flower's Ray simulation with the four example kits (sites/*.yaml).

Each site refuses the run at its first message, under its own name; the coordinator records
every refusal as that site's failure, and a run that every site refuses ends with status
``refused`` and exit code 1, with nothing trained and no ledger entry written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e import read_summary, run_fedmed

pytestmark = [pytest.mark.slow, pytest.mark.cost(50)]  # seconds, the file alone on 2 cores
SITES = ("cleveland", "hungary", "switzerland", "va")
BUDGETS = {"cleveland": 4.0, "hungary": 4.0, "switzerland": 2.0, "va": 3.0}  # sites/*.yaml


def _refused_run(run_dir: Path, *overrides: str) -> tuple[Any, dict[str, Any]]:
    proc = run_fedmed(
        "simulate", "dataset=heart_kits", "model=svm", "federation.rounds=1", *overrides,
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    return proc, read_summary(run_dir)


def _assert_nothing_recorded(run_dir: Path, summary: dict[str, Any]) -> None:
    assert summary["status"] == "refused" and summary["rounds_completed"] == 0
    assert (
        "every site refused the run (cleveland, hungary, switzerland, va)"
        in (summary["stop_reason"])
    )
    assert not list((run_dir / "ledgers").glob("*.jsonl"))  # no ledger, hence no entry
    for site in SITES:
        assert summary["sites"].get(site, {}).get("num_train") is None  # never trained


def test_the_coordinator_cannot_set_the_budget_delta_or_accountant(tmp_path: Path) -> None:
    """``privacy.budget_epsilon=100`` (the kits say 4, 4, 2, 3), ``privacy.accountant=rdp``
    and ``privacy.delta=1e-4`` (the kits say prv and 1e-3): refused by all four."""
    proc, summary = _refused_run(
        tmp_path, "privacy=dp", "privacy.budget_epsilon=100", "privacy.accountant=rdp",
        "privacy.delta=1e-4",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "federation refused: every site refused the run" in proc.stdout
    errors = {f["site"]: f["error"] for f in summary["failures"]}
    assert set(errors) == set(SITES)
    for site, error in errors.items():
        assert error.startswith(f"site '{site}': refuses the run: ")
        assert (
            f"privacy.budget_epsilon=100.0 is set by the run, but the site's lifetime budget "
            f"belongs to its kit (privacy.budget_epsilon: {BUDGETS[site]})"
        ) in error
        assert "privacy.accountant=rdp is set by the run" in error
        assert "(privacy.accountant: prv)" in error
        assert "privacy.delta=0.0001 is set by the run" in error
        assert "(privacy.delta: 0.001)" in error
    assert {f["stage"] for f in summary["failures"]} == {"fit"}
    _assert_nothing_recorded(tmp_path, summary)


def test_kits_requiring_privacy_refuse_a_run_without_it_at_the_secagg_setup(
    tmp_path: Path,
) -> None:
    """The default ``privacy=none`` with the kits (no DP, no ledger entry, plain updates
    before): every site refuses at the first SecAgg+ stage."""
    proc, summary = _refused_run(tmp_path, "secagg=secaggplus")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    failures = [f for f in summary["failures"] if f["site"] in SITES]
    assert {f["site"] for f in failures} == set(SITES)
    assert {f["stage"] for f in failures} == {"setup"}
    for failure in failures:
        assert failure["error"] == (
            f"site '{failure['site']}': refuses the run: privacy=none, but its kit requires "
            "differential privacy (privacy.require_privacy: true); run with privacy=dp"
        )
    _assert_nothing_recorded(tmp_path, summary)
