"""Issue-16 measurements: what private evaluation costs, and that every release is accounted.

Every number comes from real `fedmed simulate` runs (Ray, bundled real data, the sites' own
DP-SGD, noisy evaluation counts and ledgers). For each run the figures the coordinator
reports (from the sum of the sites' noisy counts) are set beside the exact evaluation of the
same global model on the union of the test splits (the researcher's, who holds the data in a
simulation), and every ledger entry is recomputed independently (dp-accounting), per
mechanism. Usage:

    python benchmarks/private_evaluation.py [--seeds 0 1 2 3 4] [--only demo every_round pneumonia]
    python benchmarks/private_evaluation.py --quick     # tiny sizes, proves the script works
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    mean_sd,
    quick_subset,
    run_cli,
    with_exact_evaluation,
    write_results,
)

from fedmed.audit.verify import ledger_paths, verify_all

OUT = "private_evaluation.json"
# `make demo`: heart kits, svm, DP at epsilon 1 with SecAgg+ (evaluation after the last round).
DEMO = ["dataset=heart_kits", "model=svm", "privacy=dp", "privacy.target_epsilon=1.0"]
DEMO += ["secagg=secaggplus"]
CASES = {
    "demo": DEMO,
    # The same, evaluated after every round: ten evaluations share the test records' epsilon.
    "every_round": [*DEMO, "federation.evaluate_every=1"],
    "pneumonia": [
        "dataset=pneumonia", "model=cnn", "federation.num_sites=4", "dataset.partition=iid",
        "privacy=dp", "privacy.target_epsilon=3", "privacy.delta=1e-4", "model.lr=0.02",
    ],
}  # fmt: skip


def _one_run(overrides: list[str], seed: int, workdir: Path) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(dir=workdir))
    run_cli("simulate", [*overrides, f"seed={seed}", f"privacy.noise_seed={seed}",
                         f"hydra.run.dir={out}"])  # fmt: skip
    summary = with_exact_evaluation(out)
    private, exact = summary["global"], summary["exact"]
    sites = summary["sites"].values()
    audits = verify_all(ledger_paths([str(out)]))
    assert all(a.ok for a in audits), [f.message for a in audits for f in a.findings]
    return {
        "seed": seed,
        "private": {k: private[k] for k in ("accuracy", "auc")},
        "exact": {k: exact[k] for k in ("accuracy", "auc")},
        "evaluations": len(summary["history"]),
        "evaluation_epsilon": max(s["privacy"]["evaluation_epsilon"] for s in sites),
        "evaluation_noise": max(s["privacy"]["evaluation_noise_multiplier"] for s in sites),
        "training_epsilon": max(s["privacy"]["epsilon"] for s in sites),
        "recomputation": [
            {"mechanism": e.mechanism, "relative_gap": e.relative_gap}
            for audit in audits
            for e in audit.entries
        ],
    }


def _case(overrides: list[str], seeds: list[int], workdir: Path) -> dict[str, Any]:
    runs = [_one_run(overrides, seed, workdir) for seed in seeds]
    row: dict[str, Any] = {"overrides": overrides, "runs": runs}
    for metric in ("accuracy", "auc"):
        errors = [r["private"][metric] - r["exact"][metric] for r in runs]
        row[metric] = {
            "private": mean_sd([r["private"][metric] for r in runs]),
            "exact": mean_sd([r["exact"][metric] for r in runs]),
            "error_mean": statistics.fmean(errors),
            "error_rmse": math.sqrt(statistics.fmean([e * e for e in errors])),
            "error_max_abs": max(abs(e) for e in errors),
        }
    gaps: dict[str, list[float]] = {}
    for r in runs:
        for check in r["recomputation"]:
            gaps.setdefault(check["mechanism"], []).append(check["relative_gap"])
    # relative_gap > 0: recorded below the independent value (the direction that matters).
    row["recomputation"] = {
        mechanism: {"entries": len(values), "max_below": max(values), "max_above": -min(values)}
        for mechanism, values in gaps.items()
    }
    print(f"{overrides}: {({k: row[k] for k in ('accuracy', 'auc', 'recomputation')})}",
          flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, nothing written")
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    extra = ["federation.rounds=2"] if args.quick else []
    path = RESULTS / OUT
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in quick_subset(args.only, args.quick):
            results[name] = {"seeds": seeds, **_case([*CASES[name], *extra], seeds, Path(tmp))}
    write_results(OUT, results, args.quick)


if __name__ == "__main__":
    main()
