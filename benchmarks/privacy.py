"""Issue-3 measurements: DP-SGD utility at each site's epsilon, utility vs epsilon, DP step cost.

Every federated number comes from a real `fedmed simulate` run (Ray simulation engine, bundled
real data, the site's own Opacus DP-SGD and ledger). Usage:

    python benchmarks/privacy.py [--seeds 0 1 2] [--only heart pneumonia sweep epoch]
    python benchmarks/privacy.py --quick        # tiny sizes, proves the script still works
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS,
    mean_sd,
    model_utility,
    quick_subset,
    run,
    run_cli,
    with_exact_evaluation,
)

HEART_DP = ["dataset=heart", "privacy=dp", "privacy.target_epsilon=1.0", "privacy.delta=1e-3"]
HEART_DP += ["secagg=off"]
PNEUMONIA = ["dataset=pneumonia", "model=cnn", "federation.num_sites=4", "dataset.partition=iid"]
PNEUMONIA_DP = ["privacy=dp", "privacy.target_epsilon=3", "privacy.delta=1e-4", "model.lr=0.02"]
# the DP image recipe (conf/recipe/dp_image.yaml: scattering features, a linear classifier)
SCATTER = [o if o != "model=cnn" else "model=scatter" for o in PNEUMONIA]
SCATTER_DP = ["privacy=dp", "privacy.target_epsilon=3", "privacy.delta=1e-4", "+recipe=dp_image"]
FIGURES = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")
SWEEP_EPSILON = {"eps0_5": 0.5, "eps1": 1.0, "eps2": 2.0, "eps4": 4.0, "eps8": 8.0}


def _max_epsilon(summary: dict[str, Any]) -> float | None:
    values = [s["privacy"]["epsilon"] for s in summary["sites"].values() if s.get("privacy")]
    return max(values) if values else None


def _federated(overrides: list[str], seeds: list[int], workdir: Path) -> dict[str, Any]:
    per_seed: dict[str, list[float]] = {figure: [] for figure in FIGURES}
    eps = []
    for seed in seeds:
        summary, _ = run("simulate", [*overrides, f"seed={seed}"], workdir)
        for figure in FIGURES:
            per_seed[figure].append(model_utility(summary)[figure])
        eps.append(_max_epsilon(summary))
    row: dict[str, Any] = {figure: mean_sd(values) for figure, values in per_seed.items()}
    row.update({f"per_seed_{figure}": values for figure, values in per_seed.items()})
    row["max_site_epsilon"] = eps
    text = " ".join(f"{f} {row[f]['mean']:.3f}±{row[f]['sd']:.3f}" for f in FIGURES)
    print(f"{overrides}: {text} eps {eps}", flush=True)
    return row


def heart(seeds: list[int], extra: list[str], workdir: Path, quick: bool) -> dict[str, Any]:
    return {
        m: _federated([*HEART_DP, f"model={m}", *extra], seeds, workdir)
        for m in quick_subset(["svm", "logreg"], quick)
    }


def pneumonia(seeds: list[int], extra: list[str], workdir: Path, quick: bool) -> dict[str, Any]:
    cases = {
        "dp_eps3_recipe": [*SCATTER, *SCATTER_DP],
        "dp_eps3": [*PNEUMONIA, *PNEUMONIA_DP],
        "non_private": PNEUMONIA,
        "non_private_scatter": [*SCATTER, "evaluation.threshold=youden"],
    }
    return {
        name: _federated([*cases[name], *extra], seeds, workdir)
        for name in quick_subset(list(cases), quick)
    }


@dataclass(frozen=True)
class Sweep:
    """One task's utility-vs-epsilon multirun."""

    overrides: list[str]
    key: str  # the swept key: +epsilon (its presets), or privacy.target_epsilon
    reference_levels: list[str]  # levels beyond the DP ones
    title: str
    plot: str

    def value(self, level: str) -> str:
        return level if self.key == "+epsilon" else f"{SWEEP_EPSILON[level]:g}"


SWEEPS = {
    "heart": Sweep(["dataset=heart", "model=svm"], "+epsilon", ["none"],
                   "heart disease, svm, 4 hospitals", "utility_vs_epsilon.png"),
    # the recipe needs privacy=dp when it is composed (a multirun composes the swept key
    # last), so the sweep is over the target; the non-private reference is the pneumonia
    # benchmark's non_private_scatter row
    "pneumonia": Sweep([*SCATTER, "privacy=dp", "+recipe=dp_image", "privacy.delta=1e-4"],
                       "privacy.target_epsilon", [],
                       "pneumonia, scatter + dp_image recipe, 4 sites",
                       "utility_vs_epsilon_pneumonia.png"),
}  # fmt: skip


def sweep(
    task: str, seeds: list[int], extra: list[str], workdir: Path, quick: bool
) -> dict[str, Any]:
    """One ``--multirun`` over epsilon (and seeds) for ``task``."""
    sweep_dir = workdir / f"sweep-{task}"
    seed_list = ",".join(str(s) for s in seeds)
    plan = SWEEPS[task]
    chosen = [*quick_subset(list(SWEEP_EPSILON), quick), *plan.reference_levels]
    levels = ",".join(plan.value(level) for level in chosen)
    args = ["--multirun", *plan.overrides, f"{plan.key}={levels}", f"seed={seed_list}", *extra]
    run_cli("simulate", [*args, f"hydra.sweep.dir={sweep_dir}"])
    by_level: dict[str, dict[str, list[Any]]] = {}
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        overrides = (summary_path.parent / ".hydra" / "overrides.yaml").read_text()
        level = next(lv for lv in chosen if f"{plan.key}={plan.value(lv)}\n" in overrides)
        summary = with_exact_evaluation(summary_path.parent)
        cell = by_level.setdefault(level, {f: [] for f in [*FIGURES, "max_site_epsilon"]})
        for figure in FIGURES:
            cell[figure].append(model_utility(summary)[figure])
        cell["max_site_epsilon"].append(_max_epsilon(summary))
    rows = {
        level: {
            "target_epsilon": SWEEP_EPSILON.get(level),
            **{figure: mean_sd(cell[figure]) for figure in FIGURES},
            "max_site_epsilon": None if level == "none" else max(cell["max_site_epsilon"]),
            "runs": len(cell["accuracy"]),
        }
        for level, cell in by_level.items()
    }
    print(json.dumps(rows, indent=1), flush=True)
    return {"command": f"fedmed simulate {' '.join(args)}", "levels": rows}


def plot_sweep(
    rows: dict[str, Any], title: str, path: Path, reference: dict[str, Any] | None = None
) -> None:
    """Accuracy, balanced accuracy and AUC vs epsilon; dashed: the non-private reference
    (the sweep's own ``none`` level, else ``reference``)."""
    from fedmed.plots import chart

    levels = [lv for lv in SWEEP_EPSILON if lv in rows]
    xs = [SWEEP_EPSILON[lv] for lv in levels]
    reference = rows.get("none", reference)
    with chart(
        path, xlabel="target epsilon per site", ylabel="global test metric", title=title
    ) as ax:
        for metric, marker in (("accuracy", "o"), ("balanced_accuracy", "^"), ("auc", "s")):
            ys = [rows[lv][metric]["mean"] for lv in levels]
            err = [rows[lv][metric]["sd"] for lv in levels]
            line = ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=metric)
            if reference is not None:
                ax.axhline(
                    reference[metric]["mean"],
                    linestyle="--",
                    color=line[0].get_color(),
                    label=f"{metric}, no DP",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])


def _epoch_case(overrides: list[str], repeats: int, quick: bool) -> dict[str, Any]:
    """Median epoch time of plain SGD and DP-SGD at one site, alternating, in every per-sample
    gradient mode Opacus offers (ghost clipping, hooks, ExpandedWeights, functorch) and in
    fedmed's book-keeping clipping."""
    from fedmed.data import load_site
    from fedmed.models import build_loss, build_model
    from fedmed.privacy.dp_sgd import DpSgdSettings, make_private_training
    from fedmed.runs.compose import compose_config
    from fedmed.train import TrainSettings, make_loader, train_local

    cfg = compose_config(overrides)
    site = load_site(cfg, 0)
    x, y = (site.x_train[:64], site.y_train[:64]) if quick else (site.x_train, site.y_train)
    settings = TrainSettings.from_config(cfg)
    loss_fn = build_loss(cfg.model.name)

    def one_epoch(mode: str | None) -> float:
        model = build_model(cfg.model.name, site.schema, 0)
        started = time.perf_counter()
        if mode is None:
            train_local(model, loss_fn, make_loader(x, y, settings.batch_size, 0), settings)
        else:
            dp = DpSgdSettings(1.0, 1.0, mode, "prv")
            p = make_private_training(model, loss_fn, x, y, settings, dp)
            train_local(p.model, p.loss_fn, p.loader, settings, p.optimizer, private=True)
        return time.perf_counter() - started

    modes = {
        "plain": None,
        "dp ghost": "ghost",
        "dp hooks": "hooks",
        "dp ew": "ew",
        "dp functorch": "functorch",
        "dp bookkeeping": "bookkeeping",  # fedmed's single-backward clipping
    }
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, mode in modes.items():
            seconds[name].append(one_epoch(mode))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "records": len(y),
        "batch_size": settings.batch_size,
        "median_seconds": medians,
        "ratio_to_plain": {n: medians[n] / medians["plain"] for n in medians},
    }


def epoch_times(repeats: int, quick: bool) -> dict[str, Any]:
    """DP-SGD vs non-private epoch time, side by side in this process.

    Same data, model, batch size and optimiser; the runs alternate so both see the same
    machine state. One torch thread, as in a simulated site (Ray gives each one CPU). The
    DP time includes Opacus' wrapping of the model, as every round pays it.
    """
    torch.set_num_threads(1)
    dp_first = [o if o != "model=cnn" else "model=dpcnn" for o in PNEUMONIA]
    cases = {
        "pneumonia cnn": PNEUMONIA,
        "pneumonia dpcnn": dp_first,
        "pneumonia scatter": SCATTER,
        "heart svm": ["dataset=heart", "model=svm"],
    }
    results = {label: _epoch_case(o, repeats, quick) for label, o in cases.items()}
    print(json.dumps(results, indent=1), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--only", nargs="+", default=["heart", "pneumonia", "sweep", "epoch"],
        choices=["heart", "pneumonia", "sweep", "epoch"],
    )  # fmt: skip
    parser.add_argument("--sweeps", nargs="+", choices=["heart", "pneumonia"],
                        default=["heart", "pneumonia"], help="the tasks --only sweep runs")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 seed, first cases")
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    extra = ["federation.rounds=2"] if args.quick else []
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}

    def save() -> None:  # after every part: a later part's failure loses nothing measured
        if not args.quick:
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "heart" in args.only:
            results["heart_eps1"] = {"seeds": seeds, **heart(seeds, extra, workdir, args.quick)}
            save()
        if "pneumonia" in args.only:
            results["pneumonia"] = {"seeds": seeds, **pneumonia(seeds, extra, workdir, args.quick)}
            save()
        if "sweep" in args.only:
            sweeps: dict[str, Any] = results.setdefault("utility_vs_epsilon", {})
            for task in quick_subset(args.sweeps, args.quick):
                sweeps[task] = {"seeds": seeds, **sweep(task, seeds, extra, workdir, args.quick)}
                save()
                reference = results.get("pneumonia", {}).get("non_private_scatter")
                plot = workdir if args.quick else RESULTS  # a quick run draws, keeps nothing
                plan = SWEEPS[task]
                plot_sweep(sweeps[task]["levels"], plan.title, plot / plan.plot, reference)
        if "epoch" in args.only:
            results["epoch_time"] = epoch_times(1 if args.quick else 5, args.quick)
            save()


if __name__ == "__main__":
    main()
