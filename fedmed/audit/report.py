"""``fedmed audit report``: a privacy statement an auditor can read, recompute and publish.

Everything in it comes from the sites' ledgers after ``verify`` checked them (so every number
is one the auditor can recompute), with the auditor's own copy of each site's public key
when given (``--public-key``), plus, when a run folder is given, the run's ``summary.json``
for the secure-aggregation threat model and the coordinator's signed receipts, which are
cross-checked against the ledgers and tell this run's entries from the site's lifetime
context (its entries of other runs). Written as Markdown (plot beside it) and as one
self-contained HTML file (plot embedded), rendered from the same Markdown.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.audit.independent import independent_accountants
from fedmed.audit.receipts import ReceiptsAudit, check_receipts, receipts_in
from fedmed.audit.verify import (
    WINDOWS,
    EntryCheck,
    LedgerAudit,
    PublicKeys,
    ledger_paths,
    verify_all,
)
from fedmed.coordinator.privacy_log import UNIT_OF_PRIVACY
from fedmed.errors import FedMedError
from fedmed.pages import md_table, png_data_uri, to_html
from fedmed.plots import panels
from fedmed.privacy.evaluation import PERSONAL_SENSITIVITY, SENSITIVITY
from fedmed.privacy.mechanisms import DP_SGD, EVALUATION, EVALUATION_COUNTS, SPLITS, TRAIN

STATEMENT = "privacy_statement"
PLOT = f"{STATEMENT}_epsilon.png"


@dataclass
class ReportSources:
    """What the statement is built from: ledgers (with the auditor's keys), and the run's
    summary and receipts when there is a run folder."""

    ledgers: list[Path]
    summary: dict[str, Any] | None
    output_dir: Path
    public_keys: PublicKeys = None
    receipts: list[Path] = field(default_factory=list)
    receipts_keys: list[Path] | None = None
    every_site: bool = True  # the ledgers are a whole run's: every receipted site must be there


def find_sources(
    target: list[str],
    output_dir: str | None,
    *,
    public_keys: PublicKeys = None,
    receipts: list[Path] | None = None,
    receipts_keys: list[Path] | None = None,
) -> ReportSources:
    """A run folder (its summary.json, ledgers and receipts) or ledger files/folders."""
    first = Path(target[0])
    found = receipts or receipts_in(target)
    if len(target) == 1 and (first / "summary.json").is_file():
        summary = json.loads((first / "summary.json").read_text())
        recorded = [
            Path(site["privacy"]["ledger"])
            for site in summary.get("sites", {}).values()
            if site.get("privacy")
        ]
        # A simulation's own ledgers/ folder first: the paths in summary.json are where the
        # sites kept them, which a copied run folder no longer points to.
        ledgers = (
            ledger_paths([str(first)]) if (first / "ledgers").is_dir() or not recorded else recorded
        )
        return ReportSources(
            ledgers, summary, Path(output_dir or first), public_keys, found, receipts_keys
        )
    every_site = any(Path(p).is_dir() for p in target)
    return ReportSources(
        ledger_paths(target),
        None,
        Path(output_dir or "."),
        public_keys,
        found,
        receipts_keys,
        every_site,
    )


def epsilon_plot_png(audits: list[LedgerAudit]) -> bytes:
    """Each split's lifetime epsilon after each of a site's ledger entries, recorded and
    recomputed, against its budget: one panel per site (sites on the same target draw the
    same curves)."""
    shown = [a for a in audits if a.entries]
    buffer = io.BytesIO()
    with panels(
        buffer,
        [str(a.site) for a in shown],
        xlabel="entry in the site's ledger (all runs)",
        ylabel="lifetime epsilon",
        integer_x=True,
    ) as axes:
        for ax, audit in zip(axes, shown, strict=True):
            pld_label = "independent PLD"
            for split, marker, color in ((TRAIN, "o-", "C0"), (EVALUATION, "D-", "C2")):
                entries = [e for e in audit.entries if e.split == split]
                if not entries:
                    continue
                x = [e.line for e in entries]
                ax.plot(x, [e.recorded_epsilon for e in entries], marker, color=color,
                        label=f"{split}: recorded by the site")  # fmt: skip
                ax.plot(x, [e.pld_epsilon for e in entries], "x:", color="C1", label=pld_label)
                pld_label = "_nolegend_"  # one legend entry for both splits
            ax.axhline(audit.entries[-1].budget_epsilon, color="C3", ls="--", lw=1,
                       label="budget")  # fmt: skip
            ax.set_ylim(bottom=0)
    return buffer.getvalue()


def _threat_model(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return (
            "Not known from ledgers alone: run `fedmed audit report RUN_DIR` on the run "
            "folder to include what the coordinator could see."
        )
    secure = summary.get("secure_aggregation") or {}
    if secure.get("protocol") in (None, "none"):
        return (
            "**Secure aggregation was off.** The coordinator saw each site's model update and "
            "its noisy evaluation counts in the clear. Differential privacy still bounds what "
            "any of them reveals about one record, at each site's epsilon in the tables above."
        )
    dropped = (
        ", ".join(
            f"{d['site']} (round {d['round']}, {d['stage']})" for d in secure.get("dropped", [])
        )
        or "none"
    )
    failed = [f["round"] for f in secure.get("failed_rounds", [])] or "none"
    return (
        f"**SecAgg+** ({secure['num_shares']} shares per site, reconstruction threshold "
        f"{secure['reconstruction_threshold']}).\n\n"
        "- The coordinator **can see**: each site's masked input (indistinguishable from "
        "random without the other sites' shares), the unmasked sum of the quantized updates "
        "of the sites that completed a round (the aggregate), which sites took part and which "
        "dropped out, the sites' public metadata (record counts, their accounting) and, in "
        "each evaluation round, the unmasked sum of the sites' noisy evaluation counts (each "
        "site's a Gaussian mechanism in its ledger, masked by SecAgg+ like its update).\n"
        "- The coordinator **cannot see**: any single site's update or evaluation counts, "
        "unless it colludes with "
        f"at least {secure['reconstruction_threshold']} sites of the round (enough shares to "
        "unmask one site). A round where fewer than the threshold remain fails and reveals "
        "nothing.\n"
        f"- Quantization: clipping range {secure['clipping_range']}, quantization range "
        f"{secure['quantization_range']}, max quantization error "
        f"{secure.get('max_quantization_error')}.\n"
        f"- Dropouts: {dropped}. Failed rounds: {failed}.\n\n"
        "Secure aggregation hides individual updates from the coordinator; the epsilons in "
        "the tables above do not rely on it (each site's DP holds even if its update were seen)."
    )


def _last(audit: LedgerAudit, split: str) -> EntryCheck | None:
    return next((e for e in reversed(audit.entries) if e.split == split), None)


def _split_row(audit: LedgerAudit, split: str) -> list[str]:
    """One site's split: its latest entry's figures, and the site's record epsilon."""
    last = _last(audit, split)
    assert last is not None
    site_epsilon = max(e.recorded_epsilon for e in map(lambda s: _last(audit, s), SPLITS) if e)
    return [
        audit.site or audit.ledger,
        split,
        str(last.dataset_size),
        f"{last.delta:g}",
        f"{1 / last.dataset_size:.2g}",
        "yes" if last.delta <= 1 / last.dataset_size else "NO",
        f"{last.budget_epsilon:g}",
        f"{last.recorded_epsilon:.4f}",
        f"{last.pld_epsilon:.4f}",
        f"{last.rdp_epsilon:.4f}",
        f"{site_epsilon:.4f}",
        str(sum(e.split == split for e in audit.entries)),
        "verified" if audit.ok else "FAILED",
    ]


def _entry_row(site: str, e: EntryCheck) -> list[str]:
    return [
        site,
        e.run_id[:12],
        str(e.round),
        e.split,
        f"{e.sample_rate:.4f}",
        f"{e.noise_multiplier:.4f}",
        str(e.steps),
        f"{e.recorded_epsilon:.4f}",
        f"{e.pld_epsilon:.4f}",
        f"{e.rdp_epsilon:.4f}",
        f"{e.budget_epsilon:g}",
    ]


ENTRY_HEADER = [
    "site",
    "run",
    "round",
    "split",
    "sample rate",
    "noise",
    "steps",
    "epsilon (recorded)",
    "epsilon (PLD)",
    "epsilon (RDP)",
    "budget",
]


@dataclass(frozen=True)
class RunSplit:
    """A site's entries: this run's (receipted, or of a receipted run id) and the others."""

    this_run: list[tuple[str, EntryCheck]]
    unreceipted: list[tuple[str, EntryCheck]]  # this run's run id, but no receipt
    lifetime: list[tuple[str, EntryCheck]]


def split_by_run(audits: list[LedgerAudit], books: list[ReceiptsAudit]) -> RunSplit:
    """This run's entries are those the coordinator holds receipts for; an entry of the same
    run id without one was recorded by the site but its update never arrived (or was lost)."""
    receipted = set().union(*(b.hashes() for b in books)) if books else set()
    runs = {e.run_id for a in audits for e in a.entries if e.hash in receipted}
    this_run, unreceipted, lifetime = [], [], []
    for audit in audits:
        for e in audit.entries:
            item = (audit.site or "?", e)
            if e.hash in receipted:
                this_run.append(item)
            elif e.run_id in runs:
                unreceipted.append(item)
            else:
                lifetime.append(item)
    return RunSplit(this_run, unreceipted, lifetime)


def _run_sections(audits: list[LedgerAudit], books: list[ReceiptsAudit]) -> list[str]:
    """This run's entries, then the lifetime context; one table of all without receipts."""
    every = [(a.site or "?", e) for a in audits for e in a.entries]
    if not books:
        return [
            "## Epsilon per site and round (all runs)",
            "No receipts of the coordinator were given, so this run's entries cannot be told "
            "from the sites' other runs: give the run folder (its `receipts.jsonl`) or "
            "`--receipts`.",
            md_table(ENTRY_HEADER, [_entry_row(site, e) for site, e in every]),
        ]
    split = split_by_run(audits, books)
    count = sum(len(b.receipts) for b in books)
    parts = [
        "## This run's entries",
        f"The coordinator holds {count} signed receipt(s) of updates it received "
        f"({', '.join(f'`{b.path}`' for b in books)}); each names the ledger entry its site "
        f"recorded first. {len(split.this_run)} of them were found in the sites' ledgers.",
        md_table(ENTRY_HEADER, [_entry_row(site, e) for site, e in split.this_run]),
    ]
    if split.unreceipted:
        parts += [
            "Recorded by the site in this run without a receipt (the update never reached "
            "the coordinator, e.g. a dropout; the spend counts all the same):",
            md_table(ENTRY_HEADER, [_entry_row(site, e) for site, e in split.unreceipted]),
        ]
    parts += [
        "## Lifetime context (the sites' entries of other runs)",
        "Each site's budget counts these too; they are verified like this run's, but no "
        "receipt of this run covers them."
        if split.lifetime
        else "None: the ledgers hold only this run.",
    ]
    if split.lifetime:
        parts.append(md_table(ENTRY_HEADER, [_entry_row(site, e) for site, e in split.lifetime]))
    return parts


def _keys_section(audits: list[LedgerAudit], auditor_keys: bool) -> str:
    if auditor_keys:
        return "\n".join(
            f"- `{a.ledger}` verified with the auditor's key `{a.public_key}`"
            + (f"; high-water mark `{a.mark}` ({a.mark_entries} entries)" if a.mark else "")
            for a in audits
        )
    return "\n".join(
        f"- `{a.ledger}` verified with `{a.public_key}`, the copy beside the ledger (give "
        "`--public-key SITE=PUB` with the auditor's own copy of each site's key)"
        + (f"; high-water mark `{a.mark}` ({a.mark_entries} entries)" if a.mark else "")
        for a in audits
    )


def statement_markdown(
    audits: list[LedgerAudit],
    summary: dict[str, Any] | None,
    image_src: str,
    books: list[ReceiptsAudit] | None = None,
    auditor_keys: bool = False,
) -> str:
    """The whole statement; ``image_src`` is the plot's file name or a data: URI."""
    books = books or []
    ok = all(a.ok for a in audits) and all(b.ok for b in books)
    entries = [(a.site or "?", e) for a in audits for e in a.entries]
    acc = independent_accountants()
    writers = sorted({e.accountant for _, e in entries}) or ["none recorded"]
    clips = sorted({str(e.max_grad_norm) for _, e in entries if e.split == TRAIN})
    receipts_text = (
        f"; {sum(len(b.receipts) for b in books)} coordinator receipt(s) cross-checked"
        if books
        else "; no coordinator receipts given"
    )
    parts = [
        "# Privacy statement",
        f"**Verification verdict: {'PASS' if ok else 'FAIL'}** — {len(audits)} ledger(s); "
        f"hash chains and Ed25519 signatures checked, every epsilon recomputed independently"
        f"{receipts_text}.",
        "## Unit of privacy and mechanism",
        f"- Unit of privacy: {UNIT_OF_PRIVACY}. Each site enforces its own (epsilon, delta) "
        "budget over its lifetime (all runs), on its own data. Its training and test records "
        "are disjoint splits, each composing its own releases: one record's guarantee is its "
        "split's epsilon, and the site's is the larger of the two (column 'site epsilon').",
        f"- Training split: `{DP_SGD}` — DP-SGD with Poisson sampling, per-sample gradient "
        f"clipping (max_grad_norm {', '.join(clips) or 'n/a'}) and Gaussian noise.",
        f"- Evaluation split: `{EVALUATION_COUNTS}` — the test split's counts "
        f"plus Gaussian noise, L2 sensitivity {SENSITIVITY:g} (one record is one count; "
        f"{PERSONAL_SENSITIVITY:.4g} at a personalised run's final evaluation, which also counts "
        "the test records under each site's personal model, with the noise scaled by it), one "
        "Gaussian mechanism per evaluation. Released, as the entries record it: "
        + ("; ".join(sorted({f"{e.released}" for _, e in entries if e.released})) or "none")
        + ".",
        f"- Accountant that wrote the ledgers: {', '.join(writers)}.",
        f"- Independent recomputation: {acc['library']} {acc['version']}, PLD accountant "
        "(reference for PRV) and RDP accountant over Opacus' orders (reference for RDP); a "
        "recorded epsilon outside its window, above or below, is flagged "
        f"({WINDOWS['prv']}; {WINDOWS['rdp']}).",
        "## Budget and delta per site and split (lifetime)",
        md_table(
            [
                "site",
                "split",
                "records",
                "delta",
                "1/records",
                "delta ok",
                "budget",
                "epsilon (recorded)",
                "epsilon (PLD)",
                "epsilon (RDP)",
                "site epsilon",
                "releases",
                "verdict",
            ],
            [_split_row(a, split) for a in audits for split in SPLITS if _last(a, split)],
        ),
        f"![lifetime epsilon per site and round against budget]({image_src})",
        *_run_sections(audits, books),
        "## What the coordinator could see",
        _threat_model(summary),
        "## Provenance",
        md_table(
            ["config hash", "code version", "entries"],
            [[f"`{h[:16]}`", v, str(n)] for (h, v), n in _provenance(entries).items()],
        ),
        "## Verification findings",
        "\n".join(
            [
                f"- `{a.ledger}` line {f.line if f.line is not None else '-'} [{f.check}]: "
                f"{f.message}"
                for a in audits
                for f in a.findings
            ]
            + [
                f"- `{b.path}` line {f.line if f.line is not None else '-'} [{f.check}]: "
                f"{f.message}"
                for b in books
                for f in b.findings
            ]
        )
        or "None: every ledger verified.",
        "## Ledgers and keys",
        _keys_section(audits, auditor_keys),
    ]
    if books:
        parts.append(
            "\n".join(
                f"- receipts `{b.path}` verified with the coordinator's key `{b.public_key}`"
                for b in books
            )
        )
    return "\n\n".join(parts) + "\n"


def _provenance(entries: list[tuple[str, EntryCheck]]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for _, e in entries:
        key = (e.config_hash, e.code_version)
        counts[key] = counts.get(key, 0) + 1
    return counts


def write_report(sources: ReportSources) -> tuple[Path, Path, bool]:
    """Write ``privacy_statement.md`` (+ plot) and ``.html``; returns the paths and verdict."""
    audits = verify_all(sources.ledgers, sources.public_keys)
    books = check_receipts(audits, sources.receipts, sources.receipts_keys, sources.every_site)
    if not any(a.entries for a in audits) and all(a.ok for a in audits):
        raise FedMedError("no ledger entries to report on (did any site train with privacy=dp?)")
    png = epsilon_plot_png(audits)
    out = sources.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / PLOT).write_bytes(png)
    md_path = out / f"{STATEMENT}.md"
    auditor_keys = bool(sources.public_keys)
    md_path.write_text(statement_markdown(audits, sources.summary, PLOT, books, auditor_keys))
    data_uri = png_data_uri(png)
    html_path = out / f"{STATEMENT}.html"
    html = statement_markdown(audits, sources.summary, data_uri, books, auditor_keys)
    html_path.write_text(to_html(html, "Privacy statement"))
    return md_path, html_path, all(a.ok for a in audits) and all(b.ok for b in books)
