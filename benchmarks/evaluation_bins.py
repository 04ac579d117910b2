"""How many margin bins a private evaluation should release: the error of the private
accuracy and AUC against the exact ones, per choice of `privacy.evaluation_margin_edges`.

One real DP run (heart, svm, epsilon 1) gives a global model; its exact margins on each
site's test split are binned as a site would bin them, and the release (Gaussian noise of one
evaluation at epsilon 1, noise multiplier as the sites calibrate it) is drawn many times per
choice of edges, the figures computed as the coordinator computes them. Usage:

    python benchmarks/evaluation_bins.py [--draws 4000]
    python benchmarks/evaluation_bins.py --quick
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import run_cli, write_results

from fedmed.data import data_schema, load_site, num_sites
from fedmed.metrics import EvalStats, released_counts, stats_from_counts
from fedmed.models import build_loss, build_model
from fedmed.privacy.evaluation import add_noise
from fedmed.runs.exact_evaluation import run_config
from fedmed.train import evaluate

EDGE_CHOICES = {
    "2 bins (0)": [0.0],
    "4 bins (-1, 0, 1)": [-1.0, 0.0, 1.0],
    "6 bins (-2..2)": [-2.0, -1.0, 0.0, 1.0, 2.0],
    "8 bins (-4..4)": [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0],
}
NOISE = 2.5822  # one evaluation at epsilon 1, delta 1e-3 (PRV), as the sites calibrate it


def _site_stats(run_dir: Path) -> list[EvalStats]:
    """Each site's exact evaluation of the run's global model."""
    cfg = run_config(run_dir)
    model = build_model(cfg.model.name, data_schema(cfg), cfg.seed, cfg.audit.canaries)
    model.load_state_dict(torch.load(run_dir / "global_model.pt", weights_only=True))
    loss_fn = build_loss(cfg.model.name)
    sites = [load_site(cfg, i) for i in range(num_sites(cfg))]
    return [evaluate(model, loss_fn, s.x_test, s.y_test, s.num_classes) for s in sites]


def _errors(stats: list[EvalStats], edges: list[float], draws: int) -> dict[str, Any]:
    exact = EvalStats.merge(stats)
    counts = [released_counts(s, edges) for s in stats]
    rng = np.random.default_rng(0)
    acc, auc = [], []
    for _ in range(draws):
        noisy = np.sum([add_noise(c, NOISE, rng) for c in counts], axis=0)
        figures = stats_from_counts(noisy, exact.num_examples, edges)
        acc.append(figures.accuracy - exact.accuracy)
        auc.append((figures.auc or 0.5) - (exact.auc or 0.5))
    binned = stats_from_counts(np.sum(counts, axis=0), exact.num_examples, edges).auc
    return {
        "accuracy_rmse": math.sqrt(float(np.mean(np.square(acc)))),
        "accuracy_bias": float(np.mean(acc)),
        "auc_rmse": math.sqrt(float(np.mean(np.square(auc)))),
        "auc_bias": float(np.mean(auc)),
        "auc_noiseless_binned_minus_exact": (binned or 0.5) - (exact.auc or 0.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 100 draws")
    args = parser.parse_args()
    draws = 100 if args.quick else args.draws
    rounds = 2 if args.quick else 10
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        overrides = ["dataset=heart", "model=svm", "privacy=dp", "privacy.target_epsilon=1.0"]
        overrides += [f"federation.rounds={rounds}", "seed=0", "privacy.noise_seed=0"]
        run_cli("simulate", [*overrides, f"hydra.run.dir={run_dir}"])
        stats = _site_stats(run_dir)
    results: dict[str, Any] = {"overrides": overrides, "draws": draws, "noise_multiplier": NOISE}
    for name, edges in EDGE_CHOICES.items():
        results[name] = _errors(stats, edges, draws)
        row = results[name]
        binned = row["auc_noiseless_binned_minus_exact"]
        print(f"{name:>20}: accuracy rmse {row['accuracy_rmse']:.3f} (bias "
              f"{row['accuracy_bias']:+.3f}), AUC rmse {row['auc_rmse']:.3f} (bias "
              f"{row['auc_bias']:+.3f}; binned, no noise {binned:+.3f})", flush=True)  # fmt: skip
    write_results("evaluation_bins.json", results, args.quick)


if __name__ == "__main__":
    main()
