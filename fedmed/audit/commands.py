"""``fedmed audit verify|report``: argument parsing only (``audit empirical`` is a Hydra task)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmed.audit.report import find_sources, write_report
from fedmed.audit.verify import ledger_paths, result_json, result_table, verify_all


def _verify(args: argparse.Namespace) -> int:
    keys = [Path(k) for k in args.public_key] if args.public_key else None
    audits = verify_all(ledger_paths(args.ledgers), keys)
    if args.json == "-":
        print(result_json(audits))
    else:
        print(result_table(audits))
        if args.json:
            Path(args.json).write_text(result_json(audits) + "\n")
            print(f"JSON result: {args.json}")
    return 0 if all(a.ok for a in audits) else 1


def _report(args: argparse.Namespace) -> int:
    md_path, html_path, ok = write_report(find_sources(args.target, args.out))
    print(f"privacy statement: {md_path} and {html_path} (verification {'PASS' if ok else 'FAIL'})")
    return 0 if ok else 1


def audit_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmed audit")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="verify ledgers and recompute every epsilon")
    verify.add_argument("ledgers", nargs="+", help="ledger files, folders of ledgers, run folders")
    verify.add_argument(
        "--public-key",
        action="append",
        metavar="PUB",
        help="a site's ledger.pub, once per ledger in the same order "
        "(default: the .pub beside each ledger)",
    )
    verify.add_argument("--json", metavar="FILE", help="also write the JSON result ('-': stdout)")
    report = commands.add_parser("report", help="write the privacy statement (Markdown + HTML)")
    report.add_argument("target", nargs="+", help="a run folder, or ledger files/folders")
    report.add_argument("--out", help="output folder (default: the run folder, or .)")
    commands.add_parser(
        "empirical",
        help="one-run empirical audit: fedmed audit empirical "
        "[hydra overrides] (see fedmed audit empirical --help)",
    )
    args = parser.parse_args(argv)
    handlers = {"verify": _verify, "report": _report}
    if args.command not in handlers:  # empirical is routed to Hydra before parsing
        print("fedmed audit empirical takes Hydra overrides", file=sys.stderr)
        return 2
    return handlers[args.command](args)
