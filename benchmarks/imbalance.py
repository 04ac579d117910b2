"""Issue-17 measurements: fedmed on an imbalanced PneumoniaMNIST cohort, with and without DP.

The cohort (``imbalanced_cohort.py``: 9 pneumonia : 1 normal in training, 5 : 3 in test,
drawn from the bundled real images) is split over 4 sites. Each variant is a real
``fedmed simulate`` run per seed; the figures are the exact evaluation of its global model on
the union of the sites' test splits (a DP run's own, private figures are noisy estimates), with
balanced accuracy, sensitivity and specificity beside accuracy and AUC. A model whose
sensitivity or specificity is below 0.05 is counted as a constant classifier.

    python benchmarks/imbalance.py [--seeds 0 1 2 3 4] [--only dp dp_recipe]
    python benchmarks/imbalance.py --quick        # tiny sizes, proves the script still works

The DP weights are public: n / (2 n_c) from the cohort's declared 9:1 ratio, not from any
site's records (``model.class_weight=balanced`` would read them, and is refused under DP).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import RESULTS, mean_sd, model_utility, quick_subset, run, write_results
from imbalanced_cohort import derive

TRAIN_RATIO = (9, 1)  # pneumonia : normal
TEST_RATIO = (5, 3)
FIGURES = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")
CONSTANT_BELOW = 0.05


def public_weights(ratio: tuple[int, int]) -> list[float]:
    """Balanced weights [normal, pneumonia] from a declared pneumonia : normal ratio."""
    pneumonia, normal = ratio
    total = pneumonia + normal
    return [round(total / (2 * normal), 4), round(total / (2 * pneumonia), 4)]


def variants(cohort: Path) -> dict[str, list[str]]:
    """The settings compared: today's defaults, the scattering model, and the DP recipe
    ``+recipe=dp_image`` tuned on the tuning cohort (``imbalanced_cohort.py --tuning``: its
    test split is drawn from the bundled validation images), with the private operating point.
    ``dp_cnn_recipe`` is the best DiagnosisNet recipe found on that cohort, kept for the
    comparison."""
    base = [
        "dataset=medmnist",
        f"dataset.path={cohort}",
        "dataset.num_classes=2",
        "dataset.channels=1",
        "model=cnn",
        "federation.num_sites=4",
        "secagg=off",
    ]
    dp = ["privacy=dp", "privacy.target_epsilon=3", "privacy.delta=1e-4"]
    cnn_recipe = [
        "model.batch_size=64",
        "model.lr=0.02",
        "privacy.max_grad_norm=5",
        "federation.rounds=20",
        "evaluation.threshold=youden",
        "privacy.evaluation_margin_edges=[-8,-6,-4,-2,0,2,4,6,8]",
    ]
    weights = "model.class_weight=[{},{}]".format(*public_weights(TRAIN_RATIO))
    scatter = [o if o != "model=cnn" else "model=scatter" for o in base]
    return {
        "nonprivate": base,
        "nonprivate_youden": [*base, "evaluation.threshold=youden"],
        "nonprivate_scatter_youden": [*scatter, "evaluation.threshold=youden"],
        "dp": [*base, *dp],
        "dp_cnn_recipe": [*base, *dp, *cnn_recipe],
        "dp_cnn_recipe_weighted": [*base, *dp, *cnn_recipe, weights],
        "dp_recipe": [*scatter, *dp, "+recipe=dp_image"],
    }


def measure(overrides: list[str], seeds: list[int], workdir: Path) -> dict[str, Any]:
    per_seed: dict[str, list[float]] = {figure: [] for figure in FIGURES}
    for seed in seeds:
        seeded = [f"seed={seed}"]
        if "privacy=dp" in overrides:
            seeded.append(f"privacy.noise_seed={seed}")
        summary, _ = run("simulate", [*overrides, *seeded], workdir)
        utility = model_utility(summary)
        for figure in FIGURES:
            per_seed[figure].append(float(utility[figure]))
    constant = [
        seed
        for seed, sens, spec in zip(
            seeds, per_seed["sensitivity"], per_seed["specificity"], strict=True
        )
        if min(sens, spec) < CONSTANT_BELOW
    ]
    row: dict[str, Any] = {figure: mean_sd(values) for figure, values in per_seed.items()}
    row["per_seed"] = per_seed
    row["constant_classifier_seeds"] = constant
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="variants to run (default: all)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cohort = workdir / "pneumonia_9to1.npz"
        counts = derive(cohort, TRAIN_RATIO, TEST_RATIO, seed=0)
        chosen = {k: v for k, v in variants(cohort).items() if not args.only or k in args.only}
        if args.quick:
            chosen = {k: [*v, "federation.rounds=1"] for k, v in chosen.items() if k == "dp_recipe"}
        seeds = quick_subset(args.seeds, args.quick)
        results: dict[str, Any] = {"cohort_counts": counts, "seeds": seeds, "variants": {}}
        if args.only and (RESULTS / "imbalance.json").is_file():  # keep the other variants
            earlier = json.loads((RESULTS / "imbalance.json").read_text())
            results["variants"] = earlier["variants"]
        for name, overrides in chosen.items():
            row = measure(overrides, seeds, workdir)
            results["variants"][name] = row
            text = " ".join(f"{f} {row[f]['mean']:.3f}±{row[f]['sd']:.3f}" for f in FIGURES)
            constant = row["constant_classifier_seeds"]
            print(f"{name}: {text}; constant classifier in seeds {constant}", flush=True)
    write_results("imbalance.json", results, args.quick)


if __name__ == "__main__":
    main()
