"""``fedmed audit verify``: is every ledger intact, and is every recorded epsilon honest?

For each ledger: the hash chain and the Ed25519 signatures (first bad line named); then every
entry's cumulative epsilon is recomputed from its recorded mechanism parameters with an
accountant independent of the one that wrote it (``fedmed.audit.independent``). An entry
whose recorded epsilon is more than ``TOLERANCE`` below the independent PLD value is flagged,
as is any budget overrun (recorded, or independent beyond the tolerance) and any delta above
1/dataset_size. The verdict holds only when nothing is flagged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmed.audit.independent import cumulative_epsilons, independent_accountants
from fedmed.errors import FedMedError
from fedmed.privacy.budget import LEDGER_SUFFIX, MECHANISM
from fedmed.privacy.ledger import LedgerError, load_public_key, read_verified

TOLERANCE = 0.01  # relative: recorded >= (1 - TOLERANCE) * independent PLD epsilon
REQUIRED_FIELDS = (
    "site",
    "run_id",
    "round",
    "mechanism",
    "dataset_size",
    "sample_rate",
    "noise_multiplier",
    "steps",
    "delta",
    "epsilon",
    "budget_epsilon",
)


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a ledger: where, which check, and what."""

    line: int | None
    check: str  # integrity | format | mechanism | recomputation | budget | delta
    message: str


@dataclass(frozen=True)
class EntryCheck:
    """One entry's recorded parameters and epsilon beside the independent recomputation."""

    line: int
    run_id: str
    round: int
    dataset_size: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    budget_epsilon: float
    recorded_epsilon: float
    pld_epsilon: float
    rdp_epsilon: float
    max_grad_norm: float | None
    accountant: str  # the writer's: "opacus 1.6.0 prv"
    config_hash: str
    code_version: str

    @property
    def relative_gap(self) -> float:
        """How far the recorded epsilon lies below (+) or above (-) the independent PLD one."""
        if not self.pld_epsilon:
            return 0.0
        return (self.pld_epsilon - self.recorded_epsilon) / self.pld_epsilon


@dataclass
class LedgerAudit:
    """The verdict on one ledger."""

    ledger: str
    public_key: str
    site: str | None = None
    entries: list[EntryCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ok": self.ok,
            "entries": [{**asdict(e), "relative_gap": e.relative_gap} for e in self.entries],
        }


def ledger_paths(paths: list[str]) -> list[Path]:
    """Ledger files from arguments: files, folders of ledgers, or run folders (``ledgers/``)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            folder = path / "ledgers" if (path / "ledgers").is_dir() else path
            ledgers = sorted(folder.glob(f"*{LEDGER_SUFFIX}"))
            if not ledgers:
                raise FedMedError(f"{path}: no *{LEDGER_SUFFIX} ledger in this folder")
            found += ledgers
        elif path.is_file():
            found.append(path)
        else:
            raise FedMedError(f"{path}: no such ledger file or folder")
    return found


def _entry_problems(line: int, entry: dict[str, Any]) -> list[Finding]:
    missing = [k for k in REQUIRED_FIELDS if k not in entry]
    if missing:
        return [Finding(line, "format", f"entry lacks {', '.join(missing)}")]
    if entry["mechanism"] != MECHANISM:
        return [
            Finding(
                line,
                "mechanism",
                f"unknown mechanism '{entry['mechanism']}' (only {MECHANISM} can be recomputed)",
            )
        ]
    return []


def _entry_check(line: int, entry: dict[str, Any], pld: float, rdp: float) -> EntryCheck:
    return EntryCheck(
        line=line,
        run_id=str(entry["run_id"]),
        round=int(entry["round"]),
        dataset_size=int(entry["dataset_size"]),
        sample_rate=float(entry["sample_rate"]),
        noise_multiplier=float(entry["noise_multiplier"]),
        steps=int(entry["steps"]),
        delta=float(entry["delta"]),
        budget_epsilon=float(entry["budget_epsilon"]),
        recorded_epsilon=float(entry["epsilon"]),
        pld_epsilon=pld,
        rdp_epsilon=rdp,
        max_grad_norm=entry.get("max_grad_norm"),
        accountant=" ".join(
            str(entry.get("accountant", {}).get(k, "?")) for k in ("library", "version", "name")
        ),
        config_hash=str(entry.get("config_hash", "")),
        code_version=str(entry.get("code_version", "")),
    )


def _value_findings(check: EntryCheck, site: str, entry_site: str) -> list[Finding]:
    line, found = check.line, []
    if entry_site != site:
        found.append(Finding(line, "format", f"entry of site '{entry_site}' in {site}'s ledger"))
    if check.relative_gap > TOLERANCE:
        found.append(
            Finding(
                line,
                "recomputation",
                f"recorded epsilon {check.recorded_epsilon:.4f} is {check.relative_gap:.1%} below "
                f"the independent PLD epsilon {check.pld_epsilon:.4f} (tolerance {TOLERANCE:.0%})",
            )
        )
    if check.recorded_epsilon > check.budget_epsilon:
        found.append(
            Finding(
                line,
                "budget",
                f"recorded epsilon {check.recorded_epsilon:.4f} "
                f"exceeds the budget {check.budget_epsilon:g}",
            )
        )
    elif check.pld_epsilon > check.budget_epsilon * (1 + TOLERANCE):
        found.append(
            Finding(
                line,
                "budget",
                f"independent epsilon {check.pld_epsilon:.4f} "
                f"exceeds the budget {check.budget_epsilon:g}",
            )
        )
    if check.dataset_size < 1 or check.delta > 1.0 / check.dataset_size:
        found.append(
            Finding(
                line,
                "delta",
                f"delta {check.delta:g} > 1/{check.dataset_size} (1 / the site's training records)",
            )
        )
    return found


def verify_ledger(ledger: Path, public_key: Path | None = None) -> LedgerAudit:
    """Every check on one ledger; ``public_key`` defaults to the ``.pub`` beside it."""
    key_path = public_key or ledger.with_suffix(".pub")
    audit = LedgerAudit(str(ledger), str(key_path))
    try:
        if not ledger.is_file():
            raise LedgerError(ledger, None, "no such file")
        if not key_path.is_file():
            raise LedgerError(key_path, None, "public key not found (give --public-key)")
        entries = read_verified(ledger, load_public_key(key_path))
    except LedgerError as err:
        audit.findings.append(Finding(err.line, "integrity", str(err)))
        return audit
    lines = range(1, len(entries) + 1)
    for line, entry in zip(lines, entries, strict=True):
        audit.findings += _entry_problems(line, entry)
    if audit.findings or not entries:
        return audit
    audit.site = str(entries[0]["site"])
    for line, entry, eps in zip(lines, entries, cumulative_epsilons(entries), strict=True):
        check = _entry_check(line, entry, eps.pld, eps.rdp)
        audit.entries.append(check)
        audit.findings += _value_findings(check, audit.site, str(entry["site"]))
    return audit


def verify_all(ledgers: list[Path], public_keys: list[Path] | None = None) -> list[LedgerAudit]:
    """Verify each ledger with its public key (given in the same order, or beside each)."""
    if public_keys and len(public_keys) != len(ledgers):
        raise FedMedError(
            f"--public-key given {len(public_keys)} times for {len(ledgers)} ledgers: "
            "give one per ledger, in the same order, or none (the .pub beside each ledger)"
        )
    keys: list[Path | None] = list(public_keys) if public_keys else [None] * len(ledgers)
    return [verify_ledger(ledger, key) for ledger, key in zip(ledgers, keys, strict=True)]


def result_json(audits: list[LedgerAudit]) -> str:
    """The machine-readable verdict."""
    return json.dumps(
        {
            "ok": all(a.ok for a in audits),
            "tolerance": TOLERANCE,
            "independent_accountants": independent_accountants(),
            "ledgers": [a.to_json() for a in audits],
        },
        indent=2,
    )


def result_table(audits: list[LedgerAudit]) -> str:
    """The verdict for people: one table per ledger, then the findings."""
    lines = []
    header = (
        f"{'line':>4} {'run':<20} {'round':>5} {'q':>7} {'sigma':>7} {'steps':>5} "
        f"{'delta':>7} {'recorded':>9} {'PLD':>8} {'RDP':>8} {'budget':>6}"
    )
    for audit in audits:
        verdict = "verified" if audit.ok else f"FAILED ({len(audit.findings)} problem(s))"
        lines.append(
            f"{audit.ledger} (site {audit.site or '?'}; key {audit.public_key}): {verdict}"
        )
        if audit.entries:
            lines.append("  " + header)
        for e in audit.entries:
            lines.append(
                f"  {e.line:>4} {e.run_id[:20]:<20} {e.round:>5} {e.sample_rate:>7.4f} "
                f"{e.noise_multiplier:>7.4f} {e.steps:>5} {e.delta:>7.0e} "
                f"{e.recorded_epsilon:>9.4f} {e.pld_epsilon:>8.4f} {e.rdp_epsilon:>8.4f} "
                f"{e.budget_epsilon:>6g}"
            )
        for f in audit.findings:
            where = f"line {f.line}" if f.line is not None else "file"
            lines.append(f"  ! {where} [{f.check}]: {f.message}")
    bad = sum(not a.ok for a in audits)
    acc = independent_accountants()
    lines.append(
        f"verdict: {'PASS' if not bad else 'FAIL'}: {len(audits) - bad} of {len(audits)} "
        f"ledger(s) verified; epsilon recomputed with {acc['library']} {acc['version']} "
        f"PLD (checked, tolerance {TOLERANCE:.0%}) and RDP"
    )
    return "\n".join(lines)
