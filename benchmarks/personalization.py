"""Issue-18 measurements: each hospital's own test patients under the global, a local-only
and a personalised model, without DP and at each site's epsilon 1.

Every figure is a site's own exact report (``<site>.personal/personal_report.json``, written
at the site on its test split) from a real ``fedmed simulate`` run. Local-only is
``personalization=mrmtl personalization.lam=0``: each site's own model, trained only on its
records for the same rounds, steps and budget as the federation (nothing pulls it to the
global model), so the comparison spends the same privacy. Beside them, what the coordinator
saw of the personal models (``summary.json`` ``personal_models``: exact counts without DP, the
final evaluation's noisy counts with DP) against the sites' exact reports merged.

    python benchmarks/personalization.py [--seeds 0 1 2 3 4] [--only heart]
    python benchmarks/personalization.py --quick   # tiny sizes, proves the script still works
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import RESULTS, mean_sd, quick_subset, run_cli, write_results

TASKS = {
    "heart": ["dataset=heart", "model=svm"],
    "pneumonia_dirichlet": ["dataset=pneumonia", "model=scatter", "federation.num_sites=4",
                            "dataset.partition=dirichlet", "dataset.alpha=0.3"],
}  # fmt: skip
PRIVACY = {
    "heart": {"nonprivate": [], "dp_eps1": ["privacy=dp", "privacy.target_epsilon=1",
                                             "privacy.delta=1e-3"]},
    "pneumonia_dirichlet": {"nonprivate": [], "dp_eps3": ["privacy=dp",
                            "privacy.target_epsilon=3", "privacy.delta=1e-4", "+recipe=dp_image",
                            "evaluation.threshold=0"]},
}  # fmt: skip
METHODS = {
    "local": ["personalization=mrmtl", "personalization.lam=0"],
    "finetune": ["personalization=finetune"],
    "mrmtl": ["personalization=mrmtl"],
    "fedper": ["personalization=fedper"],  # images only (a linear model has no body)
}
FIGURE = "accuracy"


def methods(task: str) -> dict[str, list[str]]:
    """The methods compared on ``task``: FedPer needs a model with a body (not svm)."""
    return {m: o for m, o in METHODS.items() if m != "fedper" or task != "heart"}


def site_reports(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each site's own report of the run, by site (its models' figures, its test size)."""
    reports = {}
    for path in sorted((run_dir / "ledgers").glob("*.personal/personal_report.json")):
        report = json.loads(path.read_text())
        reports[report["site"]] = {**report["models"], "test_records": report["test_records"]}
    return reports


def coordinator_view(run_dir: Path, reports: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """(the personal models' accuracy as the coordinator saw it (summary.json; under DP from
    the final evaluation's noisy counts), the same merged exactly from the sites' reports)."""
    seen = json.loads((run_dir / "summary.json").read_text())["personal_models"]
    sizes = [r["test_records"] for r in reports.values()]
    exact = sum(r["personal"][FIGURE] * n for r, n in zip(reports.values(), sizes, strict=True))
    return seen[FIGURE], exact / sum(sizes)


def measure(task: str, privacy: list[str], seeds: list[int], extra: list[str],
            workdir: Path) -> dict[str, Any]:  # fmt: skip
    """Per site and seed: the global model's, local-only's and each method's figure."""
    table: dict[str, dict[str, list[float]]] = {}
    seen: dict[str, list[tuple[float, float]]] = {}
    for seed in seeds:
        for method, overrides in methods(task).items():
            out = Path(tempfile.mkdtemp(dir=workdir))
            seeded = [f"seed={seed}"] + (["privacy.noise_seed=" + str(seed)] if privacy else [])
            args = [*TASKS[task], *privacy, *overrides, *seeded, *extra, f"hydra.run.dir={out}"]
            run_cli("simulate", args)
            reports = site_reports(out)
            if method != "fedper":  # FedPer's evaluation is of its personal models already
                seen.setdefault(method, []).append(coordinator_view(out, reports))
            for site, models in reports.items():
                row = table.setdefault(site, {})
                if method == "finetune":  # its global model is plain FedAvg (mrmtl: the mean)
                    row.setdefault("global", []).append(models["global"][FIGURE])
                row.setdefault(method, []).append(models["personal"][FIGURE])
    summary: dict[str, Any] = {site: {m: mean_sd(v) for m, v in row.items()}
                               for site, row in table.items()}  # fmt: skip
    columns = ["global", *methods(task)]
    summary["mean over sites"] = {
        m: mean_sd([sum(table[s][m][i] for s in table) / len(table) for i in range(len(seeds))])
        for m in columns
    }
    summary["coordinator_view"] = {
        method: {
            "coordinator": mean_sd([c for c, _ in pairs]),
            "sites_exact_merged": mean_sd([e for _, e in pairs]),
            "largest_abs_difference": max(abs(c - e) for c, e in pairs),
        }
        for method, pairs in seen.items()
    }
    summary["per_seed"] = table
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--only", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seeds = quick_subset(args.seeds, args.quick)
    extra = ["federation.rounds=2"] if args.quick else []
    results: dict[str, Any] = {"figure": FIGURE, "seeds": seeds}
    if not args.quick and (RESULTS / "personalization.json").is_file():  # keep other tasks
        results = {**json.loads((RESULTS / "personalization.json").read_text()), **results}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.only:
            for name, privacy in quick_subset(list(PRIVACY[task].items()), args.quick):
                row = measure(task, privacy, seeds, extra, Path(tmp))
                results[f"{task}/{name}"] = row
                print(f"{task} {name} ({FIGURE}, mean ± sd over seeds {seeds})")
                for site, cells in row.items():
                    if site not in ("per_seed", "coordinator_view"):
                        text = "  ".join(f"{m} {c['mean']:.3f}±{c['sd']:.3f}"
                                         for m, c in cells.items())  # fmt: skip
                        print(f"  {site:>16}: {text}", flush=True)
                for method, view in row["coordinator_view"].items():
                    print(f"  coordinator saw {method}: {view['coordinator']['mean']:.3f}, "
                          f"exact {view['sites_exact_merged']['mean']:.3f}, largest difference "
                          f"{view['largest_abs_difference']:.3f}", flush=True)  # fmt: skip
    write_results("personalization.json", results, args.quick)


if __name__ == "__main__":
    main()
