"""Framework overhead (issue 7): `fedmed simulate` against the same local training, plainly.

For each case (10 sites x R rounds: synthetic heart svm, pneumonia cnn; non-private and DP) the
same sites, data, models, seeds, rounds and local epochs are trained twice:
- `fedmed simulate` (Flower + Ray): the coordinator's time per round (training requests to
  the last evaluation reply), from summary.json;
- one plain Python process: load each site's data once, then per round and site set the
  global weights, train (fedmed.train / Opacus DP-SGD, as the site does), average the
  deltas, evaluate every site; each round timed the same way.
The steady-state ratio compares the mean round time over rounds 2..R (round 1 carries the
one-off work on both sides: Ray's workers importing torch and loading data, the noise
calibration). With DP the plain loop is also timed with the site's budget check added (the
accountant's epsilon after the round, one call per site and round, as every site must
compute before it trains). The one-off start-up is the simulate process's wall time minus
its rounds 2..R (engine start and shutdown, imports, data loading, calibration, round 1).
Beside each case, flower_floor.py runs the same federation with sites that do no work: its
round time is Flower and Ray's own cost for the round's messages, and simulate minus that
floor is what fedmed's sites and coordinator take per round, compared with the plain loop.

Usage: .venv/bin/python benchmarks/overhead.py [--rounds 10] [--cases heart-svm ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import quick_subset, run_cli, write_results

CASES = {
    "heart-svm": ["dataset=synthetic_heart", "model=svm"],
    "pneumonia-cnn": ["dataset=pneumonia", "model=cnn"],
}
PRIVACY = {"none": ["privacy=none"], "dp": ["privacy=dp"]}


def plain_loop(overrides: list[str], account: bool = False) -> list[float]:
    """The same local training as the federation, back to back here; seconds per round.

    ``account``: also compute each site's epsilon after the round, as its budget check does.
    """
    from fedmed.data import load_site, num_sites
    from fedmed.models import build_loss, build_model
    from fedmed.privacy.accounting import cumulative_epsilon
    from fedmed.privacy.budget import dp_config, site_policy
    from fedmed.privacy.dp_sgd import DpSgdSettings, calibrated_noise, poisson_plan, train_private
    from fedmed.runs.compose import compose_config
    from fedmed.site.policy import SiteRuntime, site_setup
    from fedmed.train import (
        TrainSettings,
        evaluate,
        get_weights,
        make_loader,
        round_seed,
        set_weights,
        train_local,
    )

    cfg = compose_config(overrides)
    settings = TrainSettings.from_config(cfg)
    dp = dp_config(cfg)
    sites = [load_site(cfg, i) for i in range(num_sites(cfg))]
    loss_fn = build_loss(cfg.model.name)
    global_weights = get_weights(build_model(cfg.model.name, sites[0].schema, cfg.seed))
    spent: dict[int, list[Any]] = {i: [] for i in range(len(sites))}
    # Each site's delta and accountant come from its kit (generated from the run when it has
    # none), exactly as the site takes them; nothing is written.
    runtime = SiteRuntime("plain-loop", Path(tempfile.mkdtemp()), False)
    policies = (
        [site_policy(site_setup(cfg, i, runtime).kit) for i in range(len(sites))] if dp else []
    )
    seconds = []
    for server_round in range(1, cfg.federation.rounds + 1):
        started = time.perf_counter()
        deltas, counts = [], []
        for index, site in enumerate(sites):
            model = build_model(cfg.model.name, site.schema, cfg.seed)
            set_weights(model, global_weights)
            n = len(site.y_train)
            if dp is None:
                seed = round_seed(cfg.seed, server_round)
                loader = make_loader(site.x_train, site.y_train, settings.batch_size, seed)
                train_local(model, loss_fn, loader, settings)
            else:
                policy = policies[index]
                sigma = calibrated_noise(
                    dp.target_epsilon or 1.0,
                    policy.delta,
                    n,
                    settings.batch_size,
                    settings.epochs,
                    cfg.federation.rounds,
                    policy.accountant,
                )
                plan = poisson_plan(n, settings.batch_size, settings.epochs, sigma)
                if account:
                    spent[index].append(plan)
                    cumulative_epsilon(spent[index], policy.delta, policy.accountant)
                mechanism = DpSgdSettings(
                    sigma, dp.max_grad_norm, dp.clipping.value, policy.accountant
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
        seconds.append(time.perf_counter() - started)
    return seconds


def simulate_rounds(overrides: list[str], workdir: Path) -> tuple[list[float], float]:
    """Seconds per round (the coordinator's clock) and the wall time of the whole process.

    Every round evaluates, as the plain loop does (with DP the default is the last round
    only; the round's clock starts at its training and stops after its evaluation).
    """
    out = Path(tempfile.mkdtemp(dir=workdir))
    every_round = "federation.evaluate_every=1"
    _, wall = run_cli("simulate", [*overrides, every_round, f"hydra.run.dir={out}"])
    history = json.loads((out / "summary.json").read_text())["history"]
    return [float(h["seconds"]) for h in history], wall


def flower_floor_rounds(overrides: list[str]) -> list[float]:
    """Seconds per round of the same federation with sites that train nothing."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("flower_floor.py")), *overrides],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"flower_floor.py {overrides} failed:\n{proc.stderr[-2000:]}")
    rounds: list[float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument(
        "--quick", action="store_true", help="first case, 3 sites, 2 rounds; writes nothing"
    )
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds = 3, 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in quick_subset(args.cases, args.quick):
            floor_rounds = flower_floor_rounds(
                [
                    *CASES[case],
                    f"federation.num_sites={args.sites}",
                    f"federation.rounds={args.rounds}",
                ]
            )
            floor = statistics.fmean(floor_rounds[1:])
            print(f"{case}: Flower alone (sites that do no work) {floor:.3f}s per round")
            for privacy, privacy_args in PRIVACY.items():
                overrides = [
                    *CASES[case],
                    *privacy_args,
                    f"federation.num_sites={args.sites}",
                    f"federation.rounds={args.rounds}",
                ]
                plain_loop([*overrides[:-1], "federation.rounds=1"])  # warm: imports, data
                sim_rounds, sim_wall = simulate_rounds(overrides, Path(tmp))
                plain_rounds = plain_loop(overrides)
                row: dict[str, Any] = {
                    "case": case,
                    "privacy": privacy,
                    "overrides": overrides,
                    "simulate_round_seconds": sim_rounds,
                    "plain_round_seconds": plain_rounds,
                    "per_round_simulate": statistics.fmean(sim_rounds[1:]),
                    "per_round_plain": statistics.fmean(plain_rounds[1:]),
                    "simulate_wall_seconds": sim_wall,
                    "startup_seconds": sim_wall - sum(sim_rounds[1:]),
                    "flower_floor_round_seconds": floor_rounds,
                    "per_round_flower_floor": floor,
                }
                row["ratio"] = row["per_round_simulate"] / row["per_round_plain"]
                row["ratio_above_flower_floor"] = (row["per_round_simulate"] - floor) / row[
                    "per_round_plain"
                ]
                line = (
                    f"{case} {privacy}: per round {row['per_round_simulate']:.3f}s vs plain "
                    f"{row['per_round_plain']:.3f}s = {row['ratio']:.2f}x; above Flower's "
                    f"floor {row['ratio_above_flower_floor']:.2f}x"
                )
                if privacy == "dp":
                    accounted = plain_loop(overrides, account=True)
                    row["plain_with_accounting_round_seconds"] = accounted
                    row["per_round_plain_with_accounting"] = statistics.fmean(accounted[1:])
                    row["ratio_with_accounting"] = (
                        row["per_round_simulate"] / row["per_round_plain_with_accounting"]
                    )
                    line += (
                        f"; plain + budget check {row['per_round_plain_with_accounting']:.3f}s"
                        f" = {row['ratio_with_accounting']:.2f}x"
                    )
                rows.append(row)
                print(f"{line}; start-up {row['startup_seconds']:.1f}s", flush=True)
    write_results("overhead.json", rows, args.quick)


if __name__ == "__main__":
    main()
