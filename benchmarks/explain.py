"""Issue-19 measurements: what the explanations of fedmed's global models say, and whether
they can be trusted.

Heart disease (4 hospitals, svm and logreg, without DP and at each site's epsilon 1): the
global model's weights by input column and its features ranked by effect, beside a pooled
logistic regression (scikit-learn, the same site-local preprocessing, every site's training
records pooled: the model no consortium could train without moving data). Spearman's rank
correlation of the column weights (over the columns some training record sets: a missing
indicator no record sets keeps its initial weight in fedmed and weight 0 in the pooled fit)
and of the feature effects; where the well-known predictors land.

Pneumonia (4 sites): each site's attribution maps (``fedmed explain RUN``), Integrated
Gradients' completeness error and the model-randomisation check (rank correlation of the
trained and randomised model's maps, 1 = unchanged), for the scatter model (without DP and
with the DP recipe at epsilon 3) and DiagnosisNet.

    python benchmarks/explain.py [--seeds 0 1 2 3 4] [--only heart pneumonia]
    python benchmarks/explain.py --quick   # tiny sizes, proves the script still works
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, mean_sd, quick_subset, run_cli, write_results
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from fedmed.data import load_site, num_sites
from fedmed.explain.linear import feature_effects, features_of
from fedmed.runs.compose import compose_config

HEART = ["dataset=heart"]
KNOWN_PREDICTORS = ("cp", "exang", "oldpeak", "ca", "thal")
HEART_PRIVACY = {
    "nonprivate": [],
    "dp_eps1": ["privacy=dp", "privacy.target_epsilon=1", "privacy.delta=1e-3"],
}
PNEUMONIA = ["dataset=pneumonia", "federation.num_sites=4"]
PNEUMONIA_MODELS = {
    "scatter_nonprivate": ["model=scatter"],
    "scatter_dp_eps3": [
        "privacy=dp",
        "privacy.target_epsilon=3",
        "privacy.delta=1e-4",
        "+recipe=dp_image",
    ],
    "cnn_nonprivate": ["model=cnn"],
}
EXPLAINED_SITE = "site-0"


def pooled_logistic_regression(overrides: list[str]) -> tuple[np.ndarray, Any]:
    """Coefficients of a logistic regression on every site's preprocessed training records."""
    cfg = compose_config(overrides)
    sites = [load_site(cfg, i) for i in range(num_sites(cfg))]
    x = np.concatenate([s.x_train for s in sites]).astype(np.float64)
    y = np.concatenate([s.y_train for s in sites])
    fit = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    prep = sites[0].preprocessing
    assert prep is not None
    informative = x.std(axis=0) > 0
    return fit.coef_[0], (prep.columns(), informative)


def ranks(names: list[str], scores: np.ndarray) -> dict[str, int]:
    order = np.argsort(-np.abs(scores), kind="stable")
    return {names[i]: rank for rank, i in enumerate(order, start=1)}


def heart(
    model: str, privacy: list[str], seeds: list[int], extra: list[str], workdir: Path
) -> dict[str, Any]:
    per_seed: dict[str, list[float]] = {"weights_spearman": [], "effects_spearman": []}
    feature_ranks: dict[str, dict[str, list[int]]] = {"federated": {}, "pooled": {}}
    for seed in seeds:
        out = Path(tempfile.mkdtemp(dir=workdir))
        overrides = [*HEART, f"model={model}", *privacy, f"seed={seed}", *extra]
        noise = [f"privacy.noise_seed={seed}"] if privacy else []
        run_cli("simulate", [*overrides, *noise, f"hydra.run.dir={out}"])
        run_cli("explain", [str(out)])  # the coordinator's view and every site's
        explained = json.loads((out / "global_explanation.json").read_text())
        pooled, (columns, informative) = pooled_logistic_regression(overrides)
        federated = np.array([explained["weights"][c.name] for c in columns])
        per_seed["weights_spearman"].append(
            float(spearmanr(federated[informative], pooled[informative]).statistic)
        )
        features = features_of(columns)
        fed_effects = feature_effects(federated, columns)
        pooled_effects = feature_effects(pooled, columns)
        per_seed["effects_spearman"].append(float(spearmanr(fed_effects, pooled_effects).statistic))
        for name, effects in (("federated", fed_effects), ("pooled", pooled_effects)):
            for feature, rank in ranks(features, effects).items():
                feature_ranks[name].setdefault(feature, []).append(rank)
        for site in ("cleveland", "hungary", "switzerland", "va"):
            numbers = json.loads((out / "sites" / site / "explanation.json").read_text())
            error = numbers["models"]["global"]["completeness_error"]
            per_seed.setdefault("completeness_error", []).append(error)
    return {
        "weights_spearman": mean_sd(per_seed["weights_spearman"]),
        "effects_spearman": mean_sd(per_seed["effects_spearman"]),
        "largest_completeness_error": max(per_seed["completeness_error"]),
        "feature_ranks": {
            name: {f: mean_sd([float(r) for r in v]) for f, v in table.items()}
            for name, table in feature_ranks.items()
        },
        "features": len(features_of(columns)),
        "per_seed": per_seed,
    }


def pneumonia(
    name: str, overrides: list[str], seeds: list[int], extra: list[str], workdir: Path
) -> dict[str, Any]:
    first_stage, last_stage, errors = [], [], []
    for seed in seeds:
        out = Path(tempfile.mkdtemp(dir=workdir))
        noise = [f"privacy.noise_seed={seed}"] if "privacy=dp" in overrides else []
        run_cli(
            "simulate",
            [*PNEUMONIA, *overrides, f"seed={seed}", *noise, *extra, f"hydra.run.dir={out}"],
        )
        run_cli("explain", [str(out), "--site", EXPLAINED_SITE])
        [numbers] = json.loads((out / "sites" / EXPLAINED_SITE / "explanation.json").read_text())[
            "models"
        ].values()
        stages = numbers["randomisation"]
        first_stage.append(stages[0]["integrated_gradients"][0])
        last_stage.append(stages[-1]["integrated_gradients"][0])
        errors.append(numbers["ig_completeness_error"]["max_relative"])
        if seed == seeds[0]:
            grids = out / "sites" / EXPLAINED_SITE
            print(f"  seed {seed}: grids in {grids} (copied to results/)", flush=True)
            for png in grids.glob("*.png"):
                target = RESULTS / f"explain_{name}_{png.name}"
                if not extra:  # a --quick run writes nothing
                    RESULTS.mkdir(exist_ok=True)
                    target.write_bytes(png.read_bytes())
    return {
        "ig_top_layer_randomised": mean_sd(first_stage),
        "ig_all_layers_randomised": mean_sd(last_stage),
        "ig_largest_relative_completeness_error": max(errors),
        "layers": [s["randomised"][-1] for s in stages],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--only", nargs="+", choices=["heart", "pneumonia"], default=["heart", "pneumonia"]
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seeds = quick_subset(args.seeds, args.quick)
    extra = ["federation.rounds=2"] if args.quick else []
    results: dict[str, Any] = {"seeds": seeds}
    if not args.quick and (RESULTS / "explain.json").is_file():  # keep the other task
        results = {**json.loads((RESULTS / "explain.json").read_text()), **results}
    with tempfile.TemporaryDirectory() as tmp:
        if "heart" in args.only:
            for model in quick_subset(["svm", "logreg"], args.quick):
                for name, privacy in quick_subset(list(HEART_PRIVACY.items()), args.quick):
                    row = heart(model, privacy, seeds, extra, Path(tmp))
                    results[f"heart/{model}/{name}"] = row
                    fed = {
                        f: round(v["mean"], 1)
                        for f, v in row["feature_ranks"]["federated"].items()
                        if f in KNOWN_PREDICTORS
                    }
                    print(
                        f"heart {model} {name}: weights rho {row['weights_spearman']['mean']:.3f}"
                        f"±{row['weights_spearman']['sd']:.3f}, effects rho "
                        f"{row['effects_spearman']['mean']:.3f}±{row['effects_spearman']['sd']:.3f},"
                        f" ranks {fed}",
                        flush=True,
                    )
        if "pneumonia" in args.only:
            for name, overrides in quick_subset(list(PNEUMONIA_MODELS.items()), args.quick):
                row = pneumonia(name, overrides, seeds, extra, Path(tmp))
                results[f"pneumonia/{name}"] = row
                print(
                    f"pneumonia {name}: IG rank correlation, top layer re-initialised "
                    f"{row['ig_top_layer_randomised']['mean']:.3f}, all "
                    f"{row['ig_all_layers_randomised']['mean']:.3f}; completeness "
                    f"{row['ig_largest_relative_completeness_error']:.2e}",
                    flush=True,
                )
    write_results("explain.json", results, args.quick)


if __name__ == "__main__":
    main()
