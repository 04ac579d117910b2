"""Reproduce every row of benchmarks/RESULTS.md, or prove in minutes that every benchmark runs.

    .venv/bin/python benchmarks/run_all.py            # every RESULTS.md command, in order (hours)
    .venv/bin/python benchmarks/run_all.py --quick    # each benchmark at a tiny size (CI)
    .venv/bin/python benchmarks/run_all.py --only scale memory

A full run writes benchmarks/results/*.json; a quick run writes nothing there and asserts no
timing, it only fails when a benchmark fails. Timing rows want an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, script, arguments) for each command RESULTS.md quotes, in its order.
FULL_RUNS: list[tuple[str, str, list[str]]] = [
    ("core_federation", "core_federation.py", ["--seeds", "0", "1", "2"]),
    ("privacy", "privacy.py", ["--only", "heart", "--seeds", "0", "1", "2", "3", "4"]),
    ("privacy", "privacy.py", ["--only", "pneumonia", "sweep", "--seeds", "0", "1", "2", "3", "4"]),
    ("privacy", "privacy.py", ["--only", "epoch"]),
    ("secure_aggregation", "secure_aggregation.py", ["--seeds", "0", "1", "2"]),
    (
        "secure_aggregation",
        "secure_aggregation.py",
        ["--only", "timing", "--sites", "20", "50", "--num-shares", "11"],
    ),
    ("audit", "audit.py", []),
    ("private_evaluation", "evaluation_bins.py", []),
    ("private_evaluation", "private_evaluation.py", ["--only", "demo", "every_round"]),
    (
        "private_evaluation",
        "private_evaluation.py",
        ["--only", "pneumonia", "--seeds", "0", "1", "2"],
    ),
    ("imbalance", "imbalance.py", ["--seeds", "0", "1", "2", "3", "4"]),
    ("personalization", "personalization.py", ["--seeds", "0", "1", "2", "3", "4"]),
    ("explain", "explain.py", ["--seeds", "0", "1", "2", "3", "4"]),
    ("overhead", "overhead.py", []),
    ("scale", "scale.py", []),
    ("memory", "memory.py", []),
]
NAMES = sorted({name for name, _, _ in FULL_RUNS})


def planned(quick: bool, only: list[str] | None) -> list[tuple[str, list[str]]]:
    """The (script, arguments) to run: each RESULTS.md command, or each script once --quick."""
    chosen = [run for run in FULL_RUNS if only is None or run[0] in only]
    if not quick:
        return [(script, args) for _, script, args in chosen]
    scripts = list(dict.fromkeys(script for _, script, _ in chosen))
    return [(script, ["--quick"]) for script in scripts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, nothing written")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="these benchmarks only")
    args = parser.parse_args()
    failed = []
    for script, script_args in planned(args.quick, args.only):
        command = [sys.executable, str(HERE / script), *script_args]
        print(f"== {' '.join([script, *script_args])}", flush=True)
        started = time.perf_counter()
        returncode = subprocess.run(command, cwd=HERE.parent, check=False).returncode
        seconds = time.perf_counter() - started
        print(f"== {script}: exit {returncode} after {seconds:.0f} s", flush=True)
        if returncode != 0:
            failed.append(script)
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")
    print("all benchmarks ran")


if __name__ == "__main__":
    main()
