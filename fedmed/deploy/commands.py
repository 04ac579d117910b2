"""``fedmed server start|run`` and ``fedmed site start|explain``: argument parsing only."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from fedmed.deploy.launch import server_run, server_start, site_start
from fedmed.explain import RECORDS_HELP

DEFAULT_SERVER_KIT = "server/coordinator.yaml"


def server_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmed server")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run the coordinator's SuperLink (foreground)")
    run = commands.add_parser("run", help="submit a federation run to the SuperLink")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedmed simulate")
    run.add_argument("--name", help="run folder name under the kit's output_dir")
    run.add_argument("--resume", metavar="NAME", help="continue run NAME from its last checkpoint")
    for sub in (start, run):
        sub.add_argument("--kit", default=DEFAULT_SERVER_KIT, help="the coordinator's kit")
        sub.add_argument("--insecure", action="store_true", help="no TLS, no node auth")
    args = parser.parse_args(argv)
    if args.command == "start":
        return server_start(args.kit, args.insecure)
    if args.resume:
        return server_run(args.kit, [*args.overrides, "resume=true"], args.insecure, args.resume)
    name = args.name or datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    return server_run(args.kit, args.overrides, args.insecure, name)


def site_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmed site")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run this hospital's SuperNode (foreground)")
    start.add_argument("kit", help="the hospital's site kit (sites/NAME.yaml)")
    start.add_argument("--insecure", action="store_true", help="no TLS, no node auth")
    explain = commands.add_parser(
        "explain", help="explain a global model on this hospital's own records (stays here)"
    )
    explain.add_argument("kit", help="the hospital's site kit (sites/NAME.yaml)")
    explain.add_argument("--model", type=Path, required=True, help="RUN/global_model.pt")
    explain.add_argument("--out", type=Path, help="default: <ledger folder>/<site>.explain")
    explain.add_argument("--records", type=int, nargs="+", default=[], help=RECORDS_HELP)
    args = parser.parse_args(argv)
    if args.command == "explain":
        from fedmed.explain.commands import explain_deployed_site

        return explain_deployed_site(args.kit, args.model, args.out, args.records)
    return site_start(args.kit, args.insecure)
