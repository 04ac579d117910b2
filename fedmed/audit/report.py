"""``fedmed audit report``: a privacy statement an auditor can read, recompute and publish.

Everything in it comes from the sites' ledgers after ``verify`` checked them (so every number
is one the auditor can recompute), plus, when a run folder is given, the run's
``summary.json`` for the secure-aggregation threat model. Written as Markdown (plot beside it)
and as one self-contained HTML file (plot embedded), rendered from the same Markdown.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.audit.independent import independent_accountants
from fedmed.audit.verify import TOLERANCE, EntryCheck, LedgerAudit, ledger_paths, verify_all
from fedmed.coordinator.privacy_log import UNIT_OF_PRIVACY
from fedmed.errors import FedMedError
from fedmed.privacy.budget import MECHANISM

STATEMENT = "privacy_statement"
PLOT = f"{STATEMENT}_epsilon.png"
HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222;
       line-height: 1.45; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #bbb; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } code { background: #f3f3f3; padding: 0 0.2rem; }
"""


@dataclass
class ReportSources:
    """What the statement is built from: ledgers, and the run's summary when there is one."""

    ledgers: list[Path]
    summary: dict[str, Any] | None
    output_dir: Path


def find_sources(target: list[str], output_dir: str | None) -> ReportSources:
    """A run folder (its summary.json and ledgers) or ledger files/folders."""
    first = Path(target[0])
    if len(target) == 1 and (first / "summary.json").is_file():
        summary = json.loads((first / "summary.json").read_text())
        recorded = [
            Path(site["privacy"]["ledger"])
            for site in summary.get("sites", {}).values()
            if site.get("privacy")
        ]
        ledgers = recorded or ledger_paths([str(first)])
        return ReportSources(ledgers, summary, Path(output_dir or first))
    return ReportSources(ledger_paths(target), None, Path(output_dir or "."))


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def epsilon_plot_png(audits: list[LedgerAudit]) -> bytes:
    """Lifetime epsilon after each of a site's trained rounds, against its budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for i, audit in enumerate(a for a in audits if a.entries):
        color = f"C{i % 10}"
        x = [e.line for e in audit.entries]
        ax.plot(
            x,
            [e.recorded_epsilon for e in audit.entries],
            "o-",
            color=color,
            label=f"{audit.site} (recorded)",
        )
        ax.plot(
            x,
            [e.pld_epsilon for e in audit.entries],
            "x:",
            color=color,
            label=f"{audit.site} (independent PLD)",
        )
        ax.axhline(audit.entries[-1].budget_epsilon, color=color, ls="--", lw=1)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trained round in the site's ledger (all runs)")
    ax.set_ylabel("lifetime epsilon (dashed: budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
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
            "**Secure aggregation was off.** The coordinator saw each site's model update in "
            "the clear. Differential privacy still bounds what any update reveals about one "
            "record, at the epsilon below."
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
        "dropped out, and the sites' reported metrics (epsilon, record counts, evaluation "
        "counts).\n"
        "- The coordinator **cannot see**: any single site's update, unless it colludes with "
        f"at least {secure['reconstruction_threshold']} sites of the round (enough shares to "
        "unmask one site). A round where fewer than the threshold remain fails and reveals "
        "nothing.\n"
        f"- Quantization: clipping range {secure['clipping_range']}, quantization range "
        f"{secure['quantization_range']}, max quantization error "
        f"{secure.get('max_quantization_error')}.\n"
        f"- Dropouts: {dropped}. Failed rounds: {failed}.\n\n"
        "Secure aggregation hides individual updates from the coordinator; the epsilon below "
        "does not rely on it (each site's DP holds even if its update were seen)."
    )


def _entry_row(site: str, e: EntryCheck) -> list[str]:
    return [
        site,
        e.run_id[:12],
        str(e.round),
        f"{e.sample_rate:.4f}",
        f"{e.noise_multiplier:.4f}",
        str(e.steps),
        f"{e.recorded_epsilon:.4f}",
        f"{e.pld_epsilon:.4f}",
        f"{e.rdp_epsilon:.4f}",
        f"{e.budget_epsilon:g}",
    ]


def statement_markdown(
    audits: list[LedgerAudit], summary: dict[str, Any] | None, image_src: str
) -> str:
    """The whole statement; ``image_src`` is the plot's file name or a data: URI."""
    ok = all(a.ok for a in audits)
    entries = [(a.site or "?", e) for a in audits for e in a.entries]
    acc = independent_accountants()
    writers = sorted({e.accountant for _, e in entries}) or ["none recorded"]
    clips = sorted({str(e.max_grad_norm) for _, e in entries})
    parts = [
        "# Privacy statement",
        f"**Verification verdict: {'PASS' if ok else 'FAIL'}** — {len(audits)} ledger(s); "
        f"hash chains and Ed25519 signatures checked, every epsilon recomputed independently.",
        "## Unit of privacy and mechanism",
        f"- Unit of privacy: {UNIT_OF_PRIVACY}. Each site enforces its own (epsilon, delta) "
        "budget over its lifetime (all runs), on its own data.",
        f"- Mechanism: `{MECHANISM}` — DP-SGD with Poisson sampling, per-sample gradient "
        f"clipping (max_grad_norm {', '.join(clips) or 'n/a'}) and Gaussian noise.",
        f"- Accountant that wrote the ledgers: {', '.join(writers)}.",
        f"- Independent recomputation: {acc['library']} {acc['version']}, PLD accountant "
        f"(reference; a recorded epsilon more than {TOLERANCE:.0%} below it is flagged) and "
        "RDP accountant (classic upper bound).",
        "## Budget and delta per site",
        _md_table(
            [
                "site",
                "records",
                "delta",
                "1/records",
                "delta ok",
                "budget",
                "epsilon (recorded)",
                "epsilon (PLD)",
                "epsilon (RDP)",
                "trained rounds",
                "verdict",
            ],
            [
                [
                    a.site or a.ledger,
                    str(a.entries[-1].dataset_size),
                    f"{a.entries[-1].delta:g}",
                    f"{1 / a.entries[-1].dataset_size:.2g}",
                    "yes" if a.entries[-1].delta <= 1 / a.entries[-1].dataset_size else "NO",
                    f"{a.entries[-1].budget_epsilon:g}",
                    f"{a.entries[-1].recorded_epsilon:.4f}",
                    f"{a.entries[-1].pld_epsilon:.4f}",
                    f"{a.entries[-1].rdp_epsilon:.4f}",
                    str(len(a.entries)),
                    "verified" if a.ok else "FAILED",
                ]
                for a in audits
                if a.entries
            ],
        ),
        "## Epsilon per site and round",
        f"![lifetime epsilon per site and round against budget]({image_src})",
        _md_table(
            [
                "site",
                "run",
                "round",
                "sample rate",
                "noise",
                "steps",
                "epsilon (recorded)",
                "epsilon (PLD)",
                "epsilon (RDP)",
                "budget",
            ],
            [_entry_row(site, e) for site, e in entries],
        ),
        "## What the coordinator could see",
        _threat_model(summary),
        "## Provenance",
        _md_table(
            ["config hash", "code version", "entries"],
            [[f"`{h[:16]}`", v, str(n)] for (h, v), n in _provenance(entries).items()],
        ),
        "## Verification findings",
        "\n".join(
            f"- `{a.ledger}` line {f.line if f.line is not None else '-'} [{f.check}]: {f.message}"
            for a in audits
            for f in a.findings
        )
        or "None: every ledger verified.",
        "## Ledgers and keys",
        "\n".join(f"- `{a.ledger}` verified with `{a.public_key}`" for a in audits),
    ]
    return "\n\n".join(parts) + "\n"


def _provenance(entries: list[tuple[str, EntryCheck]]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for _, e in entries:
        key = (e.config_hash, e.code_version)
        counts[key] = counts.get(key, 0) + 1
    return counts


def to_html(markdown_text: str) -> str:
    """One self-contained page: the Markdown rendered, styles inline, no external requests."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Privacy statement</title><style>{HTML_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def write_report(sources: ReportSources) -> tuple[Path, Path, bool]:
    """Write ``privacy_statement.md`` (+ plot) and ``.html``; returns the paths and verdict."""
    audits = verify_all(sources.ledgers)
    if not any(a.entries for a in audits) and all(a.ok for a in audits):
        raise FedMedError("no ledger entries to report on (did any site train with privacy=dp?)")
    png = epsilon_plot_png(audits)
    out = sources.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / PLOT).write_bytes(png)
    md_path = out / f"{STATEMENT}.md"
    md_path.write_text(statement_markdown(audits, sources.summary, PLOT))
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    html_path = out / f"{STATEMENT}.html"
    html_path.write_text(to_html(statement_markdown(audits, sources.summary, data_uri)))
    return md_path, html_path, all(a.ok for a in audits)
