"""Framework overhead (issue 7): `fedmed simulate` against the same local training, plainly.

For each case (10 sites x R rounds: synthetic heart svm, pneumonia cnn; non-private and DP) the
same sites, data, models, seeds, rounds and local epochs are trained twice:
- `fedmed simulate` (Flower + Ray), wall time of the whole process;
- one plain Python process: load each site's data once, then per round and site set the
  global weights, train (fedmed.train / Opacus DP-SGD, as the site does), average the
  deltas, evaluate every site.
Both are run with R and with 1 round. The per-round cost (time(R) - time(1)) / (R - 1)
excludes every one-off cost on both sides (imports, Ray start-up, data loading, calibration)
and gives the steady-state overhead ratio; the plain loop is warmed once first (imports, data
and calibration cached in-process). The one-off start-up is reported separately as time(1)
of simulate minus time(1) of the warm plain loop (so it includes fedmed's own imports and
data loading in the Ray workers, not only the engine).

Usage: .venv/bin/python benchmarks/overhead.py [--rounds 5] [--cases heart-svm ...] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import run_cli, write_results

CASES = {
    "heart-svm": ["dataset=synthetic_heart", "model=svm"],
    "pneumonia-cnn": ["dataset=pneumonia", "model=cnn", "privacy.delta=1e-4"],
}
PRIVACY = {"none": ["privacy=none"], "dp": ["privacy=dp"]}


def plain_loop(overrides: list[str]) -> float:
    """The same local training as the federation, back to back in this process."""
    from fedmed.configure import compose_config
    from fedmed.data import load_site, num_sites
    from fedmed.models import build_loss, build_model
    from fedmed.privacy.accounting import DPSteps
    from fedmed.privacy.budget import dp_config
    from fedmed.privacy.dp_sgd import DpSgdSettings, calibrated_noise, poisson_plan, train_private
    from fedmed.train import (
        TrainSettings,
        evaluate,
        get_weights,
        make_loader,
        set_weights,
        train_local,
    )

    started = time.perf_counter()
    cfg = compose_config(overrides)
    settings = TrainSettings.from_config(cfg)
    dp = dp_config(cfg)
    sites = [load_site(cfg, i) for i in range(num_sites(cfg))]
    loss_fn = build_loss(cfg.model.name)
    global_weights = get_weights(build_model(cfg.model.name, sites[0].schema, cfg.seed))
    for server_round in range(1, cfg.federation.rounds + 1):
        deltas, counts = [], []
        for site in sites:
            model = build_model(cfg.model.name, site.schema, cfg.seed)
            set_weights(model, global_weights)
            n = len(site.y_train)
            if dp is None:
                loader = make_loader(
                    site.x_train,
                    site.y_train,
                    settings.batch_size,
                    cfg.seed * 100_003 + server_round,
                )
                train_local(model, loss_fn, loader, settings)
            else:
                sigma = calibrated_noise(
                    dp.target_epsilon or 1.0,
                    dp.delta,
                    n,
                    settings.batch_size,
                    settings.epochs,
                    cfg.federation.rounds,
                    dp.accountant.value,
                )
                plan: DPSteps = poisson_plan(n, settings.batch_size, settings.epochs, sigma)
                mechanism = DpSgdSettings(
                    sigma, dp.max_grad_norm, dp.clipping.value, dp.accountant.value
                )
                train_private(model, loss_fn, site.x_train, site.y_train, settings, mechanism, plan)
            deltas.append([a - b for a, b in zip(get_weights(model), global_weights, strict=True)])
            counts.append(n)
        total = sum(counts)
        global_weights = [
            g + sum(c / total * d[i] for c, d in zip(counts, deltas, strict=True))
            for i, g in enumerate(global_weights)
        ]
        for site in sites:
            model = build_model(cfg.model.name, site.schema, cfg.seed)
            set_weights(model, global_weights)
            evaluate(model, loss_fn, site.x_test, site.y_test, site.num_classes)
    return time.perf_counter() - started


def simulate_wall(overrides: list[str], workdir: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=workdir))
    _, wall = run_cli("simulate", [*overrides, f"hydra.run.dir={out}"])
    return wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 sites, 2 rounds; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds = 3, 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            for privacy, privacy_args in PRIVACY.items():
                base = [*CASES[case], *privacy_args, f"federation.num_sites={args.sites}"]
                times = {}
                plain_loop([*base, "federation.rounds=1"])  # warm: imports, data, calibration
                for rounds in (1, args.rounds):
                    overrides = [*base, f"federation.rounds={rounds}"]
                    times[("simulate", rounds)] = simulate_wall(overrides, Path(tmp))
                    times[("plain", rounds)] = plain_loop(overrides)
                per_round = {
                    k: (times[(k, args.rounds)] - times[(k, 1)]) / (args.rounds - 1)
                    for k in ("simulate", "plain")
                }
                row = {
                    "case": case,
                    "privacy": privacy,
                    "rounds": args.rounds,
                    "simulate_seconds": {str(r): times[("simulate", r)] for r in (1, args.rounds)},
                    "plain_seconds": {str(r): times[("plain", r)] for r in (1, args.rounds)},
                    "per_round_simulate": per_round["simulate"],
                    "per_round_plain": per_round["plain"],
                    "ratio": per_round["simulate"] / per_round["plain"],
                    "startup_seconds": times[("simulate", 1)] - times[("plain", 1)],
                }
                rows.append(row)
                print(
                    f"{case} {privacy}: per round {per_round['simulate']:.2f}s vs plain "
                    f"{per_round['plain']:.2f}s = {row['ratio']:.2f}x; start-up "
                    f"{row['startup_seconds']:.1f}s",
                    flush=True,
                )
    write_results("overhead.json", rows, args.quick)


if __name__ == "__main__":
    main()
