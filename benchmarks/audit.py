"""Auditor toolkit measurements (issue 6).

1. Independent recomputation: two DP runs on the four heart-disease hospitals into one
   persistent ledger folder (10 entries per site); every entry's recorded Opacus PRV epsilon
   against dp-accounting's PLD and RDP (``fedmed audit verify``).
2. Empirical one-run audit (``fedmed audit empirical``): epsilon lower bound vs the formal
   epsilon, heart svm and pneumonia cnn, target epsilon 1, 4, 8 and noise switched off.

Usage: .venv/bin/python benchmarks/audit.py [--only recompute|empirical] [--canaries 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, run_cli, write_results

from fedmed.audit.verify import ledger_paths, verify_all

EMPIRICAL_CASES = (
    ("heart", "svm", ["dataset=heart", "model=svm", "federation.rounds=5"]),
    (
        "pneumonia",
        "cnn",
        ["dataset=pneumonia", "model=cnn", "federation.rounds=3", "privacy.delta=1e-4"],
    ),  # sites hold ~1,100 records: delta < 1/n
)


def recompute(workdir: Path, rounds: int = 5) -> dict[str, Any]:
    ledgers = workdir / "ledgers"
    for run in (1, 2):
        run_cli(
            "simulate",
            [
                "dataset=heart_kits",
                "model=svm",
                "privacy=dp",
                "privacy.target_epsilon=1",
                f"federation.rounds={rounds}",
                f"privacy.ledger_dir={ledgers}",
                f"seed={run}",
                f"hydra.run.dir={workdir / f'run{run}'}",
            ],
        )
    started = time.perf_counter()
    audits = verify_all(ledger_paths([str(ledgers)]))
    seconds = time.perf_counter() - started
    entries = [e for a in audits for e in a.entries]
    return {
        "ok": all(a.ok for a in audits),
        "ledgers": len(audits),
        "entries": len(entries),
        "verify_seconds": seconds,
        "max_recorded_below_pld": max(e.relative_gap for e in entries),
        "max_recorded_above_pld": max(-e.relative_gap for e in entries),
        "rows": [
            {
                "site": a.site,
                "line": e.line,
                "recorded_prv": e.recorded_epsilon,
                "pld": e.pld_epsilon,
                "rdp": e.rdp_epsilon,
            }
            for a in audits
            for e in a.entries
        ],
    }


def empirical(workdir: Path, canaries: int, quick: bool = False) -> list[dict[str, Any]]:
    rows = []
    levels = ((1, True),) if quick else ((1, False), (4, False), (8, False), (1, True))
    for dataset, model, overrides in EMPIRICAL_CASES[:1] if quick else EMPIRICAL_CASES:
        if quick:
            overrides = [*overrides, "federation.rounds=1"]
        for epsilon, noise_off in levels:
            out = workdir / f"{dataset}-eps{epsilon}-{'off' if noise_off else 'on'}"
            args = [
                *overrides,
                "privacy=dp",
                f"privacy.target_epsilon={epsilon}",
                f"audit.canaries={canaries}",
                f"audit.disable_noise={noise_off}",
                f"hydra.run.dir={out}",
            ]
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "fedmed.cli", "audit", "empirical", *args],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if proc.returncode not in (0, 1):
                raise SystemExit(f"audit empirical {args} failed:\n{proc.stderr[-2000:]}")
            report = json.loads((out / "empirical_audit.json").read_text())
            report.update(
                dataset=dataset,
                model=model,
                target_epsilon=epsilon,
                exit_code=proc.returncode,
                wall_seconds=time.perf_counter() - started,
            )
            rows.append(report)
            print(
                f"{dataset} eps={epsilon} noise {'OFF' if noise_off else 'on'}: lower bound "
                f"{report['epsilon_lower_bound']:.3f} vs formal {report['formal_epsilon']:.3f}"
                f" -> {report['verdict']}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["recompute", "empirical"])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="1 round, 1 case; writes nothing")
    args = parser.parse_args()
    results_file = RESULTS / "audit.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "recompute"):
            results["recompute"] = recompute(Path(tmp) / "recompute", 1 if args.quick else 5)
            r = results["recompute"]
            print(
                f"recompute: {r['entries']} entries, ok={r['ok']}, recorded at most "
                f"{r['max_recorded_below_pld']:.4%} below / {r['max_recorded_above_pld']:.4%} "
                f"above PLD; verify took {r['verify_seconds']:.1f}s"
            )
        if args.only in (None, "empirical"):
            canaries = 100 if args.quick else args.canaries
            results["empirical"] = empirical(Path(tmp) / "empirical", canaries, args.quick)
    write_results(results_file.name, results, args.quick)


if __name__ == "__main__":
    main()
