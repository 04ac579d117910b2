"""The coordinator's receipts: signed with its own key, continued across a resume, robust to
a crash mid-append, and any edit fails the auditor's check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmed.audit.receipts import load_receipts
from fedmed.coordinator.receipts import RECEIPTS_FILE, RECEIPTS_PUBLIC_KEY, ReceiptBook
from fedmed.protocol import FitReport, PrivacyReport


def _metrics(site: str, entry: str) -> PrivacyReport:
    """A DP fit reply's accounting, read from its metrics as a site sends them."""
    report = FitReport.from_metrics(_sent(site, entry))
    assert report.privacy is not None and report.train_loss == 0.4
    return report.privacy


def _sent(site: str, entry: str) -> dict[str, Any]:
    return {
        "site": site,
        "num_examples": 227,
        "train_loss": 0.4,
        "epsilon": 0.34,
        "budget_epsilon": 1.0,
        "delta": 1e-3,
        "noise_multiplier": 1.98,
        "sample_rate": 16 / 227,
        "steps": 15,
        "ledger": f"/hospital/{site}.ledger.jsonl",
        "ledger_entry": entry,
    }


def test_receipts_are_signed_by_the_coordinator_and_continue_after_a_resume(
    tmp_path: Path,
) -> None:
    ReceiptBook(tmp_path).record(1, "va", _metrics("va", "a" * 64))
    resumed = ReceiptBook(tmp_path)  # a new coordinator process on the same run folder
    resumed.record(2, "va", _metrics("va", "b" * 64))
    book = load_receipts(tmp_path / RECEIPTS_FILE)
    assert book.ok, book.findings
    assert [(r.round, r.ledger_entry) for r in book.receipts] == [(1, "a" * 64), (2, "b" * 64)]
    assert book.receipts[0].reported["epsilon"] == 0.34
    assert "train_loss" not in book.receipts[0].reported  # only the accounting is kept


def test_a_deployed_coordinator_keeps_its_key_outside_the_run_folder(tmp_path: Path) -> None:
    key = tmp_path / "runs" / "receipts.key"
    for run in ("run-1", "run-2"):
        ReceiptBook(tmp_path / "runs" / run, key).record(1, "va", _metrics("va", "c" * 64))
    pubs = {
        (tmp_path / "runs" / run / RECEIPTS_PUBLIC_KEY).read_bytes() for run in ("run-1", "run-2")
    }
    assert len(pubs) == 1 and not (tmp_path / "runs" / "run-1" / "receipts.key").exists()


def test_a_receipt_cut_off_by_a_crash_is_dropped_on_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ReceiptBook(tmp_path).record(1, "va", _metrics("va", "a" * 64))
    with (tmp_path / RECEIPTS_FILE).open("a") as handle:
        handle.write('{"format":"fedmed-receipt/1","site":"hu')  # killed mid-append
    with caplog.at_level("WARNING", logger="fedmed.coordinator.receipts"):
        ReceiptBook(tmp_path).record(2, "va", _metrics("va", "b" * 64))
    assert "cut off by a crash" in caplog.text
    assert [r.round for r in load_receipts(tmp_path / RECEIPTS_FILE).receipts] == [1, 2]


def test_an_edited_receipt_fails_the_auditors_check(tmp_path: Path) -> None:
    book = ReceiptBook(tmp_path)
    for rnd in (1, 2):
        book.record(rnd, "va", _metrics("va", str(rnd) * 64))
    path = tmp_path / RECEIPTS_FILE
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["ledger_entry"] = "f" * 64  # point the receipt at another entry
    path.write_text(lines[0] + "\n" + json.dumps(edited) + "\n")
    audit = load_receipts(path)
    assert [(f.check, f.line) for f in audit.findings] == [("integrity", 2)]
