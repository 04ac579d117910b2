"""Memory over rounds (issue 7): a long run's peak memory against a short run's.

The same federation is run for a few and for many rounds; the peak resident memory of the
whole process tree (driver, Ray, its workers) must not grow with the number of rounds: the
target is peak(long) <= 1.10 x peak(short). Cases: the pneumonia CNN with DP-SGD (where Ray
workers used to keep every round's Opacus-wrapped model alive) and heart svm with DP and
SecAgg+. The memory of the long run at its first and last quarter is reported beside the peak,
so a slow leak shows even when start-up dominates the peak.

Usage: .venv/bin/python benchmarks/memory.py [--rounds 5 50] [--cases CASE ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import RESULTS, MeasuredRun, measured_run, write_results

CASES = {
    "pneumonia-cnn-dp": [
        "dataset=pneumonia",
        "model=cnn",
        "privacy=dp",
        "privacy.delta=1e-4",
        "federation.num_sites=4",
    ],
    "heart-svm-dp-secagg": ["dataset=heart", "model=svm", "privacy=dp", "secagg=secaggplus"],
}
TARGET_RATIO = 1.10


def _quarter_means(run: MeasuredRun) -> tuple[float, float]:
    """Mean tree memory (GiB) over the second and the last quarter of a run's samples."""
    rss = [value / 2**30 for _, value in run.rss_samples]
    quarter = max(len(rss) // 4, 1)
    return statistics.fmean(rss[quarter : 2 * quarter]), statistics.fmean(rss[-quarter:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, nargs=2, default=[5, 50], metavar=("SHORT", "LONG"))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--quick", action="store_true", help="1 vs 2 rounds; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.cases = [1, 2], ["heart-svm-dp-secagg"]
    short, long = args.rounds
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            runs = {}
            for rounds in (short, long):
                out = Path(tmp) / f"{case}-{rounds}"
                overrides = [*CASES[case], f"federation.rounds={rounds}"]
                runs[rounds] = measured_run(["simulate", *overrides, f"hydra.run.dir={out}"])
                summary = json.loads((out / "summary.json").read_text())
                if summary["rounds_completed"] != rounds:
                    raise SystemExit(f"{case}: {summary['rounds_completed']} of {rounds} rounds")
            early, late = _quarter_means(runs[long])
            row = {
                "case": case,
                "overrides": CASES[case],
                "rounds": [short, long],
                "peak_gib": {str(r): runs[r].peak / 2**30 for r in (short, long)},
                "wall_seconds": {str(r): runs[r].wall for r in (short, long)},
                "ratio": runs[long].peak / runs[short].peak,
                "long_run_second_quarter_gib": early,
                "long_run_last_quarter_gib": late,
            }
            rows.append(row)
            verdict = "met" if row["ratio"] <= TARGET_RATIO else "NOT met"
            print(
                f"{case}: peak {row['peak_gib'][str(short)]:.2f} GiB ({short} rounds) vs "
                f"{row['peak_gib'][str(long)]:.2f} GiB ({long} rounds) = {row['ratio']:.3f}x "
                f"(target <= {TARGET_RATIO}: {verdict}); long run {early:.2f} -> {late:.2f} GiB",
                flush=True,
            )
    # Keep the other cases' rows from earlier runs: `--cases X` re-measures X only.
    earlier = RESULTS / "memory.json"
    kept = json.loads(earlier.read_text()) if earlier.exists() else []
    measured = {row["case"] for row in rows}
    rows = [row for row in kept if row["case"] not in measured] + rows
    write_results("memory.json", rows, args.quick or (short, long) != (5, 50))


if __name__ == "__main__":
    main()
