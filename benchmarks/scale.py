"""Scale (issue 7): wall time and peak memory of one `fedmed simulate` at 10, 100, 1,000 sites.

SYNTHETIC heart-disease sites (`dataset=synthetic_heart`, ~100 records each), 10% of the sites
sampled per round for training and 10% for evaluation (at least 3, the SecAgg+ minimum), svm,
DP on, SecAgg+ over the sampled sites with num_shares = 2*ceil(log2(sampled)) + 1 (all
sampled sites for small rounds), 3 rounds. Peak memory is the largest sum of RSS over the
whole process tree (driver, Ray's processes, its workers), sampled every 0.2 s from /proc.

Usage: .venv/bin/python benchmarks/scale.py [--sites 10 100 1000] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from common import measured_run, model_utility, with_exact_evaluation, write_results


def scale_overrides(sites: int, rounds: int) -> list[str]:
    sampled = max(3, math.ceil(0.1 * sites))
    shares = min(sampled, 2 * math.ceil(math.log2(sampled)) + 1)
    return [
        "dataset=synthetic_heart",
        f"federation.num_sites={sites}",
        "federation.fraction=0.1",
        "federation.evaluate_fraction=0.1",
        "federation.min_sites=3",
        "model=svm",
        "privacy=dp",
        "secagg=secaggplus",
        f"secagg.num_shares={shares}",
        f"federation.rounds={rounds}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10 sites, 1 round; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds = [10], 1
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for sites in args.sites:
            out = Path(tmp) / f"sites{sites}"
            overrides = scale_overrides(sites, args.rounds)
            run = measured_run(["simulate", *overrides, f"hydra.run.dir={out}"])
            proc, wall, peak = run.proc, run.wall, run.peak
            summary = with_exact_evaluation(out)  # the model's accuracy, not the noisy estimate
            round_lines = [line for line in proc.stdout.splitlines() if line.startswith("round")]
            row = {
                "sites": sites,
                "overrides": overrides,
                "wall_seconds": wall,
                "peak_rss_gib": peak / 2**30,
                "status": summary["status"],
                "rounds_completed": summary["rounds_completed"],
                "accuracy": model_utility(summary)["accuracy"],
                "round_lines": round_lines,
            }
            rows.append(row)
            print(
                f"{sites:>5} sites: {wall:7.1f} s, peak {row['peak_rss_gib']:.2f} GiB, "
                f"{summary['status']}, accuracy {row['accuracy']:.3f}",
                flush=True,
            )
    write_results("scale.json", rows, args.quick)


if __name__ == "__main__":
    main()
