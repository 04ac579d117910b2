"""Tune a training recipe without looking at any test split (issue 17).

Each candidate is a real ``fedmed simulate`` run with ``evaluation.threshold=youden``, so that
every site carves a validation split from its training records; the candidate's saved global
model is then scored exactly on the union of those validation splits (the researcher holds
the simulated sites' data; nothing here is part of a federation). The test splits are never
read. Pick the recipe here, then measure it once on the test splits with the other scripts.

    python benchmarks/tune_on_validation.py --base dataset=heart privacy=dp \\
        privacy.target_epsilon=1 --candidate "strategy=fedavg" --candidate "strategy=fedadam" \\
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import mean_sd, run_cli

FIGURES = ("accuracy", "balanced_accuracy", "auc")


def validation_figures(run_dir: Path) -> dict[str, float]:
    """The run's global model on every site's validation split, exactly, at threshold 0
    (a threshold chosen on these same records would flatter them)."""
    from fedmed.coordinator.app import GLOBAL_MODEL_FILE
    from fedmed.data import data_schema, load_site, num_sites
    from fedmed.metrics import EvalStats
    from fedmed.models import build_loss, build_model
    from fedmed.runs.exact_evaluation import run_config
    from fedmed.train import evaluate

    cfg = run_config(run_dir)
    model = build_model(cfg.model.name, data_schema(cfg), cfg.seed)
    model.load_state_dict(torch.load(run_dir / GLOBAL_MODEL_FILE, weights_only=True))
    loss_fn = build_loss(cfg.model.name)
    parts = []
    for index in range(num_sites(cfg)):
        site = load_site(cfg, index)
        assert site.x_val is not None and site.y_val is not None
        parts.append(evaluate(model, loss_fn, site.x_val, site.y_val, site.num_classes))
    merged = EvalStats.merge(parts)
    return {name: float(getattr(merged, name)) for name in FIGURES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", nargs="+", required=True, help="overrides of every run")
    parser.add_argument("--candidate", action="append", required=True,
                        help="one recipe: space-separated overrides (repeat the flag)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args()
    table: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for candidate in args.candidate:
            per_seed: dict[str, list[float]] = {name: [] for name in FIGURES}
            for seed in args.seeds:
                out = Path(tmp) / f"{len(table)}-{seed}"
                overrides = [*args.base, *candidate.split(), "evaluation.threshold=youden"]
                run_cli("simulate", [*overrides, f"seed={seed}", f"hydra.run.dir={out}"])
                for name, value in validation_figures(out).items():
                    per_seed[name].append(value)
            table[candidate] = {name: mean_sd(values) for name, values in per_seed.items()}
            row = table[candidate].items()
            text = " ".join(f"{n} {v['mean']:.3f}±{v['sd']:.3f}" for n, v in row)
            print(f"{candidate}: {text}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"base": args.base, "seeds": args.seeds, "table": table},
                                       indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
