"""``fedmed audit verify|report``: argument parsing only (``audit empirical`` is a Hydra task)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fedmed.audit.receipts import check_receipts, receipts_in
from fedmed.audit.report import find_sources, write_report
from fedmed.audit.verify import PublicKeys, ledger_paths, result_json, result_table, verify_all
from fedmed.errors import FedMedError

log = logging.getLogger(__name__)


def public_keys(values: list[str] | None) -> PublicKeys:
    """``--public-key`` values: all ``PUB`` (one per ledger, in order) or all ``SITE=PUB``."""
    if not values:
        return None
    named = ["=" in v for v in values]
    if all(named):
        return {v.split("=", 1)[0]: Path(v.split("=", 1)[1]) for v in values}
    if any(named):
        raise FedMedError(
            "--public-key: give every key as SITE=PUB, or every key as PUB (one per ledger, "
            "in the same order), not a mix"
        )
    return [Path(v) for v in values]


def _paths(values: list[str] | None) -> list[Path] | None:
    return [Path(v) for v in values] if values else None


def _verify(args: argparse.Namespace) -> int:
    audits = verify_all(ledger_paths(args.ledgers), public_keys(args.public_key), _paths(args.mark))
    receipts = _paths(args.receipts) or receipts_in(args.ledgers)
    # Folders (a run's, or of ledgers) must hold every site the receipts name.
    every_site = any(Path(p).is_dir() for p in args.ledgers)
    books = check_receipts(audits, receipts, _paths(args.receipts_key), every_site)
    if args.json == "-":
        log.info(result_json(audits, books))
    else:
        log.info(result_table(audits, books))
        if args.json:
            Path(args.json).write_text(result_json(audits, books) + "\n")
            log.info(f"JSON result: {args.json}")
    return 0 if all(a.ok for a in audits) and all(b.ok for b in books) else 1


def _report(args: argparse.Namespace) -> int:
    sources = find_sources(
        args.target,
        args.out,
        public_keys=public_keys(args.public_key),
        receipts=_paths(args.receipts),
        receipts_keys=_paths(args.receipts_key),
    )
    md_path, html_path, ok = write_report(sources)
    verdict = "PASS" if ok else "FAIL"
    log.info(f"privacy statement: {md_path} and {html_path} (verification {verdict})")
    return 0 if ok else 1


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--public-key",
        action="append",
        metavar="[SITE=]PUB",
        help="the auditor's copy of a site's ledger public key: SITE=PUB for each site, or "
        "PUB once per ledger in the same order (default: the .pub beside each ledger)",
    )
    parser.add_argument(
        "--receipts",
        action="append",
        metavar="FILE",
        help="the coordinator's receipts.jsonl of a run: every update it received must have "
        "its entry in its site's ledger (default: receipts.jsonl of each run folder given)",
    )
    parser.add_argument(
        "--receipts-key",
        action="append",
        metavar="PUB",
        help="the auditor's copy of the coordinator's receipt key, once per --receipts "
        "(default: receipts.pub beside each receipts file)",
    )


def audit_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmed audit")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="verify ledgers and recompute every epsilon")
    verify.add_argument("ledgers", nargs="+", help="ledger files, folders of ledgers, run folders")
    _key_options(verify)
    verify.add_argument(
        "--mark",
        action="append",
        metavar="MARK",
        help="a site's high-water mark (beside its signing key), once per ledger in the same "
        "order (default: a .mark beside each ledger or its public key, when there is one)",
    )
    verify.add_argument("--json", metavar="FILE", help="also write the JSON result ('-': stdout)")
    report = commands.add_parser("report", help="write the privacy statement (Markdown + HTML)")
    report.add_argument("target", nargs="+", help="a run folder, or ledger files/folders")
    report.add_argument("--out", help="output folder (default: the run folder, or .)")
    _key_options(report)
    commands.add_parser(
        "empirical",
        help="one-run empirical audit: fedmed audit empirical "
        "[hydra overrides] (see fedmed audit empirical --help)",
    )
    args = parser.parse_args(argv)
    handlers = {"verify": _verify, "report": _report}
    if args.command not in handlers:  # empirical is routed to Hydra before parsing
        raise FedMedError("fedmed audit empirical takes Hydra overrides")
    return handlers[args.command](args)
