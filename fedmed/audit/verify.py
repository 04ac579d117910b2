"""``fedmed audit verify``: is every ledger intact and complete, and is every epsilon honest?

For each ledger: the hash chain and the Ed25519 signatures (first bad line named); the site's
signed high-water mark when one is found (a ledger shorter than it, or with another head,
fails); then every entry's cumulative epsilon is recomputed from its recorded mechanism
parameters with an accountant independent of the one that wrote it
(``fedmed.audit.independent``), within its split (training or evaluation records), and the
recorded epsilon must lie in the window the writer's accountant allows, above AND below
(``allowed_window``): a recorded epsilon the entry's own fields do not explain fails either
way. An entry's ``record_epsilon`` (the worse split's) must be the larger of its own and the
other split's latest recorded epsilon. Budget overruns and a delta above 1/dataset_size are
flagged too. With the coordinator's receipts (``fedmed.audit.receipts``), every update the
coordinator received must have its entry in its site's ledger. The verdict holds only when
nothing is flagged.

The windows, set from the gaps measured on real ledgers and on the writer's own function:
- ``prv``: Opacus records PRV's upper bound, its estimate plus ``eps_error``, the estimate
  lying within ``eps_error`` of the true epsilon. So recorded - PLD must lie within
  [-eps_error, +2 eps_error] (measured: +0.996 to +1.09 eps_error, i.e. +0.28% to +0.35%,
  on heart and PneumoniaMNIST settings from epsilon 0.01 to 10). ``eps_error`` is what the
  entry states: "0.0025 x RDP epsilon" (relative), a number (absolute), or nothing (Opacus'
  default 0.01, what fedmed used before it recorded one).
- ``rdp``: compared with dp-accounting's RDP over Opacus' orders, within ``TOLERANCE``
  relative (measured: -0.51% to +0.00%; dp-accounting drops fractional orders it cannot
  evaluate, Opacus does not).
- ``gdp`` (an approximation, no error bound; refused for budgets now): PLD +-``TOLERANCE``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmed.audit.independent import cumulative_epsilons, independent_accountants
from fedmed.errors import FedMedError
from fedmed.privacy.budget import LEDGER_SUFFIX
from fedmed.privacy.ledger import (
    MARK_SUFFIX,
    HighWaterMark,
    LedgerEntry,
    LedgerError,
    load_public_key,
    mark_problem,
    read_mark,
    read_verified,
)
from fedmed.privacy.mechanisms import SPLIT_OF, record_epsilon
from fedmed.records import RecordError

if TYPE_CHECKING:
    from fedmed.audit.receipts import ReceiptsAudit

TOLERANCE = 0.01  # relative, for accountants without a stated error bound (rdp, gdp)
OPACUS_DEFAULT_EPS_ERROR = 0.01  # absolute; what PRV entries without a stated eps_error used
# The largest error bound an entry may state and still be checked: Opacus' default, or 1%.
MAX_STATED_ERROR = (0.01, 0.01)  # (absolute, relative to the RDP epsilon): the larger wins
_RELATIVE_ERROR = re.compile(r"^\s*([0-9.eE+-]+)\s*x\s*RDP epsilon\s*$")
WINDOWS = {
    "prv": "PRV: recorded - PLD within [-eps_error, +2 eps_error]",
    "rdp": f"RDP: within {TOLERANCE:.0%} of RDP over Opacus' orders",
    "gdp": f"GDP: within {TOLERANCE:.0%} of PLD",
}


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a ledger: where, which check, and what."""

    line: int | None
    check: str  # integrity | mark | format | mechanism | recomputation | budget | delta | receipt
    message: str


@dataclass(frozen=True)
class Window:
    """Where an honest recorded epsilon lies, given the independent values and the writer."""

    reference: str  # "pld" or "rdp": the independent value it is compared with
    value: float
    low: float
    high: float
    basis: str  # why: the accountant and its stated error


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
    hash: str = ""
    reference: str = "pld"  # the independent value the recorded epsilon is checked against
    allowed_low: float = 0.0
    allowed_high: float = 0.0
    split: str = "train"  # the records the release touched: train or evaluation
    mechanism: str = "dp_sgd_poisson_gaussian"
    sensitivity: float | None = None
    released: str | None = None  # an evaluation's counts, in words

    @property
    def reference_epsilon(self) -> float:
        return self.rdp_epsilon if self.reference == "rdp" else self.pld_epsilon

    @property
    def relative_gap(self) -> float:
        """How far the recorded epsilon lies below (+) or above (-) its independent value."""
        if not self.reference_epsilon:
            return 0.0
        return (self.reference_epsilon - self.recorded_epsilon) / self.reference_epsilon


@dataclass
class LedgerAudit:
    """The verdict on one ledger."""

    ledger: str
    public_key: str
    site: str | None = None
    entries: list[EntryCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    mark: str | None = None  # the high-water mark checked, if one was found
    mark_entries: int | None = None
    hashes: list[str] = field(default_factory=list)  # every verified entry's hash, in order
    receipts: int = 0  # the coordinator's receipts matched to entries of this ledger

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def intact(self) -> bool:
        """The file itself verified (chain, signatures); its values may still be flagged."""
        return not any(f.check == "integrity" for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        del body["hashes"]
        return {
            **body,
            "ok": self.ok,
            "entries": [
                {
                    **asdict(e),
                    "relative_gap": e.relative_gap,
                    "reference_epsilon": e.reference_epsilon,
                }
                for e in self.entries
            ],
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


def _parsed(line: int, raw: dict[str, Any]) -> LedgerEntry | Finding:
    """The line's entry, or what keeps it from being one whose epsilon can be recomputed."""
    try:
        entry = LedgerEntry.from_dict(raw)
    except RecordError as err:
        return Finding(line, "format", str(err))
    if entry.mechanism not in SPLIT_OF:
        known = " and ".join(SPLIT_OF)
        return Finding(
            line,
            "mechanism",
            f"unknown mechanism '{entry.mechanism[:40]}' (only {known} can be recomputed)",
        )
    if entry.split_name != SPLIT_OF[entry.mechanism]:
        return Finding(
            line,
            "mechanism",
            f"mechanism {entry.mechanism} touches the {SPLIT_OF[entry.mechanism]} records, "
            f"but the entry says split '{entry.split_name[:40]}'",
        )
    return entry


def stated_error(stated: Any, rdp_epsilon: float) -> float | None:
    """A PRV entry's absolute ``eps_error``; None when it cannot be read."""
    if stated is None:
        return OPACUS_DEFAULT_EPS_ERROR
    text = str(stated)
    relative = _RELATIVE_ERROR.match(text)
    try:
        value = float(relative.group(1)) * rdp_epsilon if relative else float(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def allowed_window(entry: LedgerEntry, pld: float, rdp: float) -> Window | str:
    """The window an honest entry's recorded epsilon lies in; a problem text when none."""
    name, stated = entry.accountant_name, entry.eps_error  # no record: PRV, Opacus' default
    if name == "prv":
        error = stated_error(stated, rdp)
        if error is None:
            return f"unreadable accountant eps_error {str(stated)[:40]!r}"
        largest = max(MAX_STATED_ERROR[0], MAX_STATED_ERROR[1] * rdp)
        if error > largest:
            return (
                f"the entry states a PRV eps_error of {error:.4g}, larger than any fedmed "
                f"writes (at most {largest:.4g}): its epsilon cannot be checked"
            )
        basis = f"PRV upper bound, eps_error {error:.3g} ({stated or 'Opacus default'})"
        return Window("pld", pld, pld - error, pld + 2 * error, basis)
    if name == "rdp":
        basis = f"RDP over Opacus' orders, +-{TOLERANCE:.0%}"
        return Window("rdp", rdp, rdp * (1 - TOLERANCE), rdp * (1 + TOLERANCE), basis)
    if name == "gdp":
        basis = f"GDP approximation (no error bound), +-{TOLERANCE:.0%} of PLD"
        return Window("pld", pld, pld * (1 - TOLERANCE), pld * (1 + TOLERANCE), basis)
    return f"unknown accountant {name[:40]!r}: its epsilon cannot be checked"


def _entry_check(line: int, entry: LedgerEntry, pld: float, rdp: float) -> EntryCheck:
    window = allowed_window(entry, pld, rdp)
    record = entry.accountant or {}
    return EntryCheck(
        line=line,
        run_id=entry.run_id,
        round=entry.round,
        dataset_size=entry.dataset_size,
        sample_rate=float(entry.sample_rate),
        noise_multiplier=float(entry.noise_multiplier),
        steps=entry.steps,
        delta=float(entry.delta),
        budget_epsilon=float(entry.budget_epsilon),
        recorded_epsilon=float(entry.epsilon),
        pld_epsilon=pld,
        rdp_epsilon=rdp,
        max_grad_norm=entry.max_grad_norm,
        accountant=" ".join(str(record.get(k, "?")) for k in ("library", "version", "name")),
        config_hash=entry.config_hash or "",
        code_version=entry.code_version or "",
        hash=entry.hash or "",
        reference=window.reference if isinstance(window, Window) else "pld",
        allowed_low=window.low if isinstance(window, Window) else float("nan"),
        allowed_high=window.high if isinstance(window, Window) else float("nan"),
        split=entry.split_name,
        mechanism=entry.mechanism,
        sensitivity=entry.sensitivity if entry.sensitivity is not None else entry.max_grad_norm,
        released=entry.released,
    )


def _recomputation_findings(line: int, entry: LedgerEntry, check: EntryCheck) -> list[Finding]:
    """Both directions: a recorded epsilon its own fields do not explain, above or below."""
    window = allowed_window(entry, check.pld_epsilon, check.rdp_epsilon)
    if isinstance(window, str):
        return [Finding(line, "recomputation", window)]
    recorded = check.recorded_epsilon
    if window.low <= recorded <= window.high:
        return []
    side = "below" if recorded < window.low else "above"
    gap = abs(recorded - window.value) / window.value if window.value else float("inf")
    why = (
        "under-reports the privacy spent"
        if side == "below"
        else "its own fields (noise, sample rate, steps) do not explain it"
    )
    return [
        Finding(
            line,
            "recomputation",
            f"recorded epsilon {recorded:.4f} is {gap:.1%} {side} the independent "
            f"{window.reference.upper()} epsilon {window.value:.4f} (allowed "
            f"{window.low:.4f} to {window.high:.4f}: {window.basis}); {why}",
        )
    ]


def _value_findings(check: EntryCheck, site: str, entry: LedgerEntry) -> list[Finding]:
    line, found = check.line, []
    if entry.site != site:
        found.append(Finding(line, "format", f"entry of site '{entry.site}' in {site}'s ledger"))
    found += _recomputation_findings(line, entry, check)
    if check.recorded_epsilon > check.budget_epsilon:
        found.append(
            Finding(
                line,
                "budget",
                f"recorded epsilon {check.recorded_epsilon:.4f} "
                f"exceeds the budget {check.budget_epsilon:g}",
            )
        )
    elif check.allowed_low > check.budget_epsilon:  # even its lowest honest reading (NaN: no)
        found.append(
            Finding(
                line,
                "budget",
                f"independent epsilon {check.reference_epsilon:.4f} "
                f"exceeds the budget {check.budget_epsilon:g}",
            )
        )
    if check.dataset_size < 1 or check.delta > 1.0 / check.dataset_size:
        found.append(
            Finding(
                line,
                "delta",
                f"delta {check.delta:g} > 1/{check.dataset_size} (1 / the site's "
                f"{entry.split_name} records)",
            )
        )
    return found


def _record_epsilon_findings(typed: list[LedgerEntry]) -> list[Finding]:
    """Each entry's stated record epsilon is the worse of its splits' latest epsilons."""
    latest: dict[str, float] = {}
    found = []
    for line, entry in enumerate(typed, start=1):
        latest[entry.split_name] = float(entry.epsilon)
        if entry.record_epsilon is None:  # entries from before private evaluation
            continue
        expected = record_epsilon(latest)
        if abs(float(entry.record_epsilon) - expected) > 1e-12 * max(expected, 1.0):
            found.append(
                Finding(
                    line,
                    "recomputation",
                    f"record_epsilon {float(entry.record_epsilon):.4f} is not the larger of "
                    f"the splits' epsilons ({expected:.4f})",
                )
            )
    return found


def mark_candidates(ledger: Path, public_key: Path) -> list[Path]:
    """Where a site's high-water mark may be: beside the ledger, or beside the key given.

    A deployed site keeps it beside its signing key (``<key>.mark``); an auditor copies it
    beside the ledger (``NAME.ledger.mark``) or passes it with ``--mark``.
    """
    return [ledger.with_suffix(MARK_SUFFIX), public_key.with_suffix(MARK_SUFFIX)]


def _check_mark(
    audit: LedgerAudit, ledger: Path, mark_file: Path, entries: list[dict[str, Any]], key: Any
) -> None:
    audit.mark = str(mark_file)
    try:
        mark: HighWaterMark | None = read_mark(mark_file, key)
    except LedgerError as err:
        audit.findings.append(Finding(None, "mark", str(err)))
        return
    if mark is None:
        audit.findings.append(Finding(None, "mark", f"{mark_file}: no such high-water mark"))
        return
    audit.mark_entries = mark.entries
    problem = mark_problem(ledger, mark, entries, mark_file)
    if problem is not None:
        audit.findings.append(Finding(None, "mark", f"privacy ledger {ledger}: {problem}"))


def verify_ledger(
    ledger: Path, public_key: Path | None = None, mark: Path | None = None
) -> LedgerAudit:
    """Every check on one ledger; ``public_key`` defaults to the ``.pub`` beside it, ``mark``
    to a ``.mark`` beside the ledger or the key (checked when one exists)."""
    key_path = public_key or ledger.with_suffix(".pub")
    audit = LedgerAudit(str(ledger), str(key_path))
    try:
        if not ledger.is_file():
            raise LedgerError(ledger, None, "no such file")
        if not key_path.is_file():
            raise LedgerError(key_path, None, "public key not found (give --public-key)")
        key = load_public_key(key_path)
        entries = read_verified(ledger, key)
    except LedgerError as err:
        audit.findings.append(Finding(err.line, "integrity", str(err)))
        return audit
    audit.hashes = [str(e["hash"]) for e in entries]
    mark_file = mark or next((m for m in mark_candidates(ledger, key_path) if m.is_file()), None)
    if mark_file is not None:
        _check_mark(audit, ledger, mark_file, entries, key)
    parsed = [_parsed(line, raw) for line, raw in enumerate(entries, start=1)]
    audit.findings += [p for p in parsed if isinstance(p, Finding)]
    typed = [p for p in parsed if isinstance(p, LedgerEntry)]
    if len(typed) < len(parsed) or not typed:
        return audit
    audit.site = typed[0].site
    lines = range(1, len(typed) + 1)
    for line, entry, eps in zip(lines, typed, cumulative_epsilons(typed), strict=True):
        check = _entry_check(line, entry, eps.pld, eps.rdp)
        audit.entries.append(check)
        audit.findings += _value_findings(check, audit.site, entry)
    audit.findings += _record_epsilon_findings(typed)
    return audit


PublicKeys = list[Path] | dict[str, Path] | None


def _claimed_site(ledger: Path) -> str | None:
    """The site a ledger's first line names (only to pick the auditor's key for it: the
    signatures are then checked with that key)."""
    try:
        with ledger.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline())
        return str(first["site"]) if isinstance(first, dict) and "site" in first else None
    except (OSError, ValueError):
        return None


def _keys_for(ledgers: list[Path], public_keys: PublicKeys) -> list[Path | None]:
    if not public_keys:
        return [None] * len(ledgers)
    if isinstance(public_keys, dict):
        keys: list[Path | None] = []
        for ledger in ledgers:
            site = _claimed_site(ledger) or ledger.name.removesuffix(LEDGER_SUFFIX)
            if site not in public_keys:
                raise FedMedError(
                    f"--public-key: no key given for site '{site}' ({ledger}); give "
                    f"--public-key {site}=PUB (sites given: {', '.join(sorted(public_keys))})"
                )
            keys.append(public_keys[site])
        return keys
    if len(public_keys) != len(ledgers):
        raise FedMedError(
            f"--public-key given {len(public_keys)} times for {len(ledgers)} ledgers: "
            "give one per ledger, in the same order, or SITE=PUB for each site, or none "
            "(the .pub beside each ledger)"
        )
    return list(public_keys)


def verify_all(
    ledgers: list[Path],
    public_keys: PublicKeys = None,
    marks: list[Path] | None = None,
) -> list[LedgerAudit]:
    """Verify each ledger with its public key: in the same order as the ledgers, by site
    name (``{site: key}``), or the ``.pub`` beside each. ``marks``: high-water marks, one per
    ledger in the same order (default: found beside the ledger or its key)."""
    keys = _keys_for(ledgers, public_keys)
    if marks and len(marks) != len(ledgers):
        raise FedMedError(
            f"--mark given {len(marks)} times for {len(ledgers)} ledgers: one per ledger, "
            "in the same order, or none (a .mark beside each ledger or key is checked)"
        )
    found: list[Path | None] = list(marks) if marks else [None] * len(ledgers)
    return [
        verify_ledger(ledger, key, mark)
        for ledger, key, mark in zip(ledgers, keys, found, strict=True)
    ]


def result_json(audits: list[LedgerAudit], receipts: list[ReceiptsAudit] | None = None) -> str:
    """The machine-readable verdict."""
    receipts = receipts or []
    return json.dumps(
        {
            "ok": all(a.ok for a in audits) and all(r.ok for r in receipts),
            "tolerance": TOLERANCE,
            "windows": WINDOWS,
            "independent_accountants": independent_accountants(),
            "ledgers": [a.to_json() for a in audits],
            "receipts": [r.to_json() for r in receipts],
        },
        indent=2,
    )


def result_table(audits: list[LedgerAudit], receipts: list[ReceiptsAudit] | None = None) -> str:
    """The verdict for people: one table per ledger, then the findings."""
    receipts = receipts or []
    lines = []
    header = (
        f"{'line':>4} {'run':<20} {'round':>5} {'split':<10} {'q':>7} {'sigma':>7} {'steps':>5} "
        f"{'delta':>7} {'recorded':>9} {'PLD':>8} {'RDP':>8} {'budget':>6}"
    )
    for audit in audits:
        verdict = "verified" if audit.ok else f"FAILED ({len(audit.findings)} problem(s))"
        extra = f"; mark {audit.mark_entries} entries" if audit.mark_entries is not None else ""
        extra += f"; {audit.receipts} receipt(s) matched" if receipts else ""
        lines.append(
            f"{audit.ledger} (site {audit.site or '?'}; key {audit.public_key}{extra}): {verdict}"
        )
        if audit.entries:
            lines.append("  " + header)
        for e in audit.entries:
            lines.append(
                f"  {e.line:>4} {e.run_id[:20]:<20} {e.round:>5} {e.split:<10} "
                f"{e.sample_rate:>7.4f} {e.noise_multiplier:>7.4f} {e.steps:>5} {e.delta:>7.0e} "
                f"{e.recorded_epsilon:>9.4f} {e.pld_epsilon:>8.4f} {e.rdp_epsilon:>8.4f} "
                f"{e.budget_epsilon:>6g}"
            )
        for f in audit.findings:
            where = f"line {f.line}" if f.line is not None else "file"
            lines.append(f"  ! {where} [{f.check}]: {f.message}")
    for book in receipts:
        verdict = "verified" if book.ok else f"FAILED ({len(book.findings)} problem(s))"
        lines.append(
            f"{book.path} ({len(book.receipts)} receipt(s); coordinator key "
            f"{book.public_key}): {verdict}"
        )
        for f in book.findings:
            where = f"line {f.line}" if f.line is not None else "file"
            lines.append(f"  ! {where} [{f.check}]: {f.message}")
        if book.unchecked:
            lines.append(
                f"  receipts of sites whose ledger was not given (not checked): "
                f"{', '.join(book.unchecked)}"
            )
    bad = sum(not a.ok for a in audits) + sum(not r.ok for r in receipts)
    acc = independent_accountants()
    checked = (
        f", {sum(r.ok for r in receipts)} of {len(receipts)} receipt file(s)" if receipts else ""
    )
    lines.append(
        f"verdict: {'PASS' if not bad else 'FAIL'}: {sum(a.ok for a in audits)} of "
        f"{len(audits)} ledger(s) verified{checked}; epsilon recomputed with "
        f"{acc['library']} {acc['version']} PLD and RDP, checked in both directions "
        f"({WINDOWS['prv']}; {WINDOWS['rdp']})"
    )
    return "\n".join(lines)
