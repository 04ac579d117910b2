"""Issue-2 measurements: pooled vs federated vs local accuracy/AUC over seeds, and the demo time.

Every number comes from a real `fedmed simulate` / `fedmed baseline` run (Ray simulation engine,
bundled real data). Usage:

    python benchmarks/core_federation.py [--seeds 0 1 2] [--out FILE.json]
    python benchmarks/core_federation.py --quick        # tiny sizes, proves the script still works
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, mean_sd, quick_subset, run

# (label, dataset/model overrides)
COMPARISONS = [
    ("heart svm", ["dataset=heart", "model=svm"]),
    ("heart logreg", ["dataset=heart", "model=logreg"]),
    ("pneumonia cnn (4 sites, iid)", ["dataset=pneumonia", "model=cnn", "federation.num_sites=4"]),
]
PARTITIONS = [
    (
        "pneumonia cnn iid",
        ["dataset=pneumonia", "model=cnn", "federation.num_sites=4", "dataset.partition=iid"],
    ),
    (
        "pneumonia cnn dirichlet(0.5)",
        [
            "dataset=pneumonia",
            "model=cnn",
            "federation.num_sites=4",
            "dataset.partition=dirichlet",
            "dataset.alpha=0.5",
        ],
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, 1 seed, first case of each table: checks the script runs",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "core_federation.json"
    )
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    extra = ["federation.rounds=2"] if args.quick else []
    results: dict[str, Any] = {"seeds": seeds, "comparisons": {}, "partitions": {}}

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        demo, demo_wall = run("simulate", ["dataset=heart", "model=svm", *extra], workdir)
        results["demo"] = {
            "wall_seconds_process": demo_wall,
            "wall_seconds_run": demo["wall_seconds"],
            "accuracy": demo["global"]["accuracy"],
            "auc": demo["global"]["auc"],
        }
        print(f"demo: accuracy {demo['global']['accuracy']:.4f} in {demo_wall:.1f}s", flush=True)
        for label, overrides in quick_subset(COMPARISONS, args.quick):
            row: dict[str, Any] = {}
            for kind, command, mode in (
                ("pooled", "baseline", ["mode=pooled"]),
                ("federated", "simulate", []),
                ("local", "baseline", ["mode=local"]),
            ):
                accs, aucs = [], []
                for seed in seeds:
                    summary, _ = run(command, [*overrides, *mode, *extra, f"seed={seed}"], workdir)
                    accs.append(summary["global"]["accuracy"])
                    aucs.append(summary["global"]["auc"])
                row[kind] = {
                    "accuracy": mean_sd(accs),
                    "auc": mean_sd(aucs),
                    "per_seed_accuracy": accs,
                }
                print(
                    f"{label} {kind}: acc {row[kind]['accuracy']} auc {row[kind]['auc']}",
                    flush=True,
                )
            results["comparisons"][label] = row
        for label, overrides in quick_subset(PARTITIONS, args.quick):
            aucs, accs = [], []
            for seed in seeds:
                summary, _ = run("simulate", [*overrides, *extra, f"seed={seed}"], workdir)
                aucs.append(summary["global"]["auc"])
                accs.append(summary["global"]["accuracy"])
            results["partitions"][label] = {
                "auc": mean_sd(aucs),
                "accuracy": mean_sd(accs),
                "per_seed_auc": aucs,
            }
            print(f"{label}: auc {results['partitions'][label]['auc']}", flush=True)

    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
