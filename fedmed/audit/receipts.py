"""The coordinator's receipts against the sites' ledgers: is every update's entry still there?

``receipts.jsonl`` (written by ``fedmed.coordinator.receipts``) is checked like a ledger (hash
chain and Ed25519 signatures) with the coordinator's public key: ``receipts.pub`` beside it,
or the auditor's copy. Then every receipt's entry hash must be in its site's ledger, for the
same round and with the values the site reported beside it. A receipt whose entry is missing
means that site's ledger was truncated, replaced or deleted after the update left the site:
the entries the coordinator saw are gone from the record the site's budget is counted from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmed.audit.verify import EntryCheck, Finding, LedgerAudit
from fedmed.coordinator.receipts import RECEIPTS_FILE, RECEIPTS_PUBLIC_KEY
from fedmed.errors import FedMedError
from fedmed.privacy.budget import LEDGER_SUFFIX
from fedmed.privacy.ledger import LedgerError, load_public_key, read_verified

# What the site reported with its update, against the entry's field of the same name.
COMPARED = ("epsilon", "steps", "noise_multiplier", "sample_rate", "delta")


@dataclass(frozen=True)
class Receipt:
    """One update the coordinator received, and the ledger entry the site named for it."""

    line: int
    site: str
    round: int
    ledger_entry: str | None
    reported: dict[str, Any]


@dataclass
class ReceiptsAudit:
    """The verdict on one receipts file (its own integrity, and sites without a ledger)."""

    path: str
    public_key: str
    receipts: list[Receipt] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # sites whose ledger was not asked for

    @property
    def ok(self) -> bool:
        return not self.findings

    def hashes(self) -> set[str]:
        return {r.ledger_entry for r in self.receipts if r.ledger_entry}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def receipts_in(paths: list[str]) -> list[Path]:
    """The receipts of every run folder among ``paths`` (picked up without ``--receipts``)."""
    return [Path(p) / RECEIPTS_FILE for p in paths if (Path(p) / RECEIPTS_FILE).is_file()]


def _receipt(path: Path, line: int, raw: dict[str, Any]) -> Receipt:
    try:
        entry = raw.get("ledger_entry")
        reported = raw.get("reported")
        return Receipt(
            line,
            str(raw["site"]),
            int(raw["round"]),
            str(entry) if entry is not None else None,
            dict(reported) if isinstance(reported, dict) else {},
        )
    except (KeyError, TypeError, ValueError):
        raise LedgerError(path, line, "receipt lacks its site or round") from None


def load_receipts(path: Path, public_key: Path | None = None) -> ReceiptsAudit:
    """The receipts after their chain and signatures are checked (findings, never raises)."""
    key_path = public_key or path.with_name(RECEIPTS_PUBLIC_KEY)
    book = ReceiptsAudit(str(path), str(key_path))
    try:
        if not path.is_file():
            raise LedgerError(path, None, "no such receipts file")
        if not key_path.is_file():
            raise LedgerError(key_path, None, "coordinator's public key not found")
        raw = read_verified(path, load_public_key(key_path))
        book.receipts = [_receipt(path, n, r) for n, r in enumerate(raw, start=1)]
    except LedgerError as err:
        book.findings.append(Finding(err.line, "integrity", f"receipts: {err}"))
    return book


def _site_of(audit: LedgerAudit) -> str:
    return audit.site or Path(audit.ledger).name.removesuffix(LEDGER_SUFFIX)


def _where(book: ReceiptsAudit, receipt: Receipt) -> str:
    return (
        f"receipt {book.path} line {receipt.line}: site '{receipt.site}' round "
        f"{receipt.round}, entry {receipt.ledger_entry}"
    )


def _value_mismatches(receipt: Receipt, entry: EntryCheck, raw: dict[str, Any]) -> list[str]:
    problems = [] if entry.round == receipt.round else [f"round {entry.round}"]
    for key in COMPARED:
        if key in receipt.reported and key in raw:
            try:
                same = math.isclose(float(receipt.reported[key]), float(raw[key]), rel_tol=1e-9)
            except (TypeError, ValueError):
                same = False
            if not same:
                problems.append(f"{key} {raw[key]} (reported {receipt.reported[key]})")
    return problems


def _check_one(
    book: ReceiptsAudit, receipt: Receipt, audit: LedgerAudit, seen: dict[str, int]
) -> None:
    """One receipt against its site's (intact) ledger."""
    where = _where(book, receipt)
    if receipt.ledger_entry is None:
        audit.findings.append(
            Finding(None, "receipt", f"{where}: the site named no ledger entry for this update")
        )
        return
    if receipt.ledger_entry in seen:
        audit.findings.append(
            Finding(
                None,
                "receipt",
                f"{where}: the same entry was named for the update of receipt line "
                f"{seen[receipt.ledger_entry]}: one of these rounds was not recorded",
            )
        )
        return
    seen[receipt.ledger_entry] = receipt.line
    if receipt.ledger_entry not in audit.hashes:
        held = (
            f"it holds {len(audit.hashes)} entries"
            if Path(audit.ledger).exists()
            else "the file is missing"
        )
        audit.findings.append(
            Finding(
                None,
                "receipt",
                f"{where}: not in this ledger ({held}): the ledger was truncated, replaced "
                "or deleted after this update left the site",
            )
        )
        return
    audit.receipts += 1
    line = audit.hashes.index(receipt.ledger_entry) + 1
    entry = next((e for e in audit.entries if e.line == line), None)
    if entry is not None:
        raw = {**asdict(entry), "epsilon": entry.recorded_epsilon}
        mismatches = _value_mismatches(receipt, entry, raw)
        if mismatches:
            audit.findings.append(
                Finding(
                    line,
                    "receipt",
                    f"{where}: the entry records {', '.join(mismatches)}, not what the site "
                    "reported with its update",
                )
            )


def cross_check(
    books: list[ReceiptsAudit], audits: list[LedgerAudit], every_site: bool = True
) -> None:
    """Every receipt against its site's ledger; findings go to the ledger, or to the receipts
    file for a site without one. ``every_site``: the ledgers are a whole folder, so a site
    of the receipts missing from it fails (deleted); else (ledger files picked one by one)
    the other sites' receipts are listed as not checked."""
    by_site = {_site_of(a): a for a in audits}
    for book in books:
        seen: dict[str, int] = {}
        for receipt in book.receipts:
            audit = by_site.get(receipt.site)
            if audit is None and not every_site:
                if receipt.site not in book.unchecked:
                    book.unchecked.append(receipt.site)
            elif audit is None:
                book.findings.append(
                    Finding(
                        None,
                        "receipt",
                        f"{_where(book, receipt)}: no ledger of site '{receipt.site}' was "
                        "given or found (deleted?); give it to check this receipt",
                    )
                )
            elif audit.intact or not Path(audit.ledger).exists():
                _check_one(book, receipt, audit, seen)  # (a broken ledger already fails)


def check_receipts(
    audits: list[LedgerAudit],
    receipts: list[Path],
    keys: list[Path] | None = None,
    every_site: bool = True,
) -> list[ReceiptsAudit]:
    """Load each receipts file (with its coordinator key, in the same order, or the one
    beside it) and cross-check it against the verified ledgers (``cross_check``)."""
    if keys and len(keys) != len(receipts):
        raise FedMedError(
            f"--receipts-key given {len(keys)} times for {len(receipts)} receipts file(s): "
            "one per file, in the same order, or none (receipts.pub beside each)"
        )
    found: list[Path | None] = list(keys) if keys else [None] * len(receipts)
    books = [load_receipts(path, key) for path, key in zip(receipts, found, strict=True)]
    cross_check(books, audits, every_site)
    return books
