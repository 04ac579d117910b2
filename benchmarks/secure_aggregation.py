"""Issue-4 measurements: SecAgg+ accuracy and error, quantization error on real CNN deltas,
and the round-time cost of SecAgg+ from 5 to 50 sites.

Federated rows come from real `fedmed simulate` runs (Ray simulation engine, bundled real
data). The quantization sweep pushes real CNN deltas (4 PneumoniaMNIST sites, one round of
local training) through Flower's own SecAgg+ quantization and weighting. Usage:

    python benchmarks/secure_aggregation.py [--seeds 0 1 2] [--only accuracy quantization timing]
    python benchmarks/secure_aggregation.py --quick        # tiny sizes, proves the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS, mean_sd, model_utility, run, run_cli

HEART_DP = ["dataset=heart", "model=svm", "privacy=dp", "privacy.target_epsilon=1.0"]
PNEUMONIA = ["dataset=pneumonia", "model=cnn", "dataset.partition=iid"]
CLIPPING_RANGES = [0.01, 0.03, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
QUANTIZATION_RANGES = [2**16, 2**18, 2**20, 2**22, 2**24]


def accuracy(seeds: list[int], extra: list[str], workdir: Path) -> dict[str, Any]:
    """Heart, svm, DP at epsilon 1, SecAgg+ on vs off with the same (seeded) DP noise."""
    rows: dict[str, Any] = {"per_seed": []}
    for seed in seeds:
        same_noise = [*HEART_DP, f"seed={seed}", f"privacy.noise_seed={seed}", *extra]
        off, _ = run("simulate", [*same_noise, "secagg=off"], workdir)
        on, _ = run("simulate", [*same_noise, "secagg=secaggplus"], workdir)
        rows["per_seed"].append(
            {
                "seed": seed,
                "accuracy_off": model_utility(off)["accuracy"],
                "accuracy_secagg": model_utility(on)["accuracy"],
                "difference": model_utility(on)["accuracy"] - model_utility(off)["accuracy"],
                "error_bound": on["secure_aggregation"]["max_quantization_error"],
            }
        )
        print(rows["per_seed"][-1], flush=True)
    # One round, same noise: the global models differ only by SecAgg+'s quantization.
    one_round = [*HEART_DP, "seed=0", "privacy.noise_seed=0", "federation.rounds=1"]
    models = {}
    for mode in ("off", "secaggplus"):
        out = Path(tempfile.mkdtemp(dir=workdir))
        run_cli("simulate", [*one_round, f"secagg={mode}", f"hydra.run.dir={out}"])
        models[mode] = torch.load(out / "global_model.pt")
    rows["measured_max_error_one_round"] = max(
        float((models["off"][k] - models["secaggplus"][k]).abs().max()) for k in models["off"]
    )
    rows["accuracy_off"] = mean_sd([r["accuracy_off"] for r in rows["per_seed"]])
    rows["accuracy_secagg"] = mean_sd([r["accuracy_secagg"] for r in rows["per_seed"]])
    return rows


def _real_cnn_deltas(private: bool, quick: bool) -> tuple[list[list[np.ndarray]], list[int]]:
    """One round of local training at each of 4 pneumonia sites, from the initial model."""
    from fedmed.data import load_site
    from fedmed.models import build_model
    from fedmed.runs.compose import compose_config
    from fedmed.site.client import HospitalSite, SiteRuntime
    from fedmed.train import get_weights

    overrides = [*PNEUMONIA, "federation.num_sites=4"]
    if private:
        overrides += ["privacy=dp", "privacy.target_epsilon=3", "privacy.delta=1e-4"]
    cfg = compose_config(overrides)
    initial = get_weights(build_model(cfg.model.name, load_site(cfg, 0).schema, cfg.seed))
    deltas, weights = [], []
    with tempfile.TemporaryDirectory() as ledgers:
        for index in range(1 if quick else 4):
            site = HospitalSite(cfg, index, SiteRuntime("bench", Path(ledgers), False))
            delta, n, _ = site.fit(initial, {"server_round": 1})
            deltas.append(delta)
            weights.append(n)
    return deltas, weights


def _secure_mean(
    deltas: list[list[np.ndarray]], weights: list[int], clip: float, levels: int, max_weight: float
) -> tuple[list[np.ndarray], float]:
    """Flower's SecAgg+ arithmetic without the masks (they cancel exactly modulo 2^32)."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    total: list[np.ndarray] | None = None
    q_total, clipped, values = 0, 0, 0
    for delta, n in zip(deltas, weights, strict=True):
        q_ratio = round(n / max_weight * levels)
        weighted = [d * (q_ratio / levels) for d in delta]
        clipped += sum(int((np.abs(w) > clip).sum()) for w in weighted)
        values += sum(w.size for w in weighted)
        quantized = quantize(weighted, clip, levels)
        total = (
            quantized if total is None else [a + b for a, b in zip(total, quantized, strict=True)]
        )
        q_total += q_ratio
    assert total is not None
    offset = -(len(deltas) - 1) * clip
    mean = [(v + offset) * (levels / q_total) for v in dequantize(total, clip, levels)]
    return mean, clipped / values


def quantization(quick: bool) -> dict[str, Any]:
    """Aggregate error vs (clipping_range, quantization_range) on real CNN deltas."""
    results: dict[str, Any] = {}
    for label, private in (("non-private", False), ("dp eps=3", True)):
        deltas, weights = _real_cnn_deltas(private, quick)
        exact = [
            sum(d[k] * n for d, n in zip(deltas, weights, strict=True)) / sum(weights)
            for k in range(len(deltas[0]))
        ]
        peak = max(float(np.abs(a).max()) for d in deltas for a in d)
        rows = []
        for clip in CLIPPING_RANGES:
            for levels in QUANTIZATION_RANGES:
                mean, clipped = _secure_mean(deltas, weights, clip, levels, 1000.0)
                errors = np.concatenate(
                    [np.abs(m - e).ravel() for m, e in zip(mean, exact, strict=True)]
                )
                rows.append(
                    {
                        "clipping_range": clip,
                        "quantization_range": levels,
                        "max_error": float(errors.max()),
                        "rms_error": float(np.sqrt((errors**2).mean())),
                        "fraction_clipped": clipped,
                    }
                )
        results[label] = {"max_abs_delta": peak, "weights": weights, "grid": rows}
        print(label, f"max |delta| {peak:.3g}", flush=True)
    return results


def _round_seconds(summary: dict[str, Any]) -> float:
    """Median round time, the first round (engine start-up) excluded."""
    return statistics.median(h["seconds"] for h in summary["history"][1:])


def timing(
    sites_list: list[int], rounds: int, workdir: Path, secagg_extra: list[str]
) -> dict[str, Any]:
    """Per-round time with and without SecAgg+, pneumonia CNN, side by side per site count."""
    rows = {}
    for sites in sites_list:
        base = [*PNEUMONIA, f"federation.num_sites={sites}", f"federation.rounds={rounds}"]
        plain, _ = run("simulate", [*base, "secagg=off"], workdir)
        secure, _ = run("simulate", [*base, "secagg=secaggplus", *secagg_extra], workdir)
        rows[str(sites)] = {
            "round_seconds_plain": _round_seconds(plain),
            "round_seconds_secagg": _round_seconds(secure),
            "ratio": _round_seconds(secure) / _round_seconds(plain),
            "secagg_overhead_seconds": _round_seconds(secure) - _round_seconds(plain),
        }
        print(sites, rows[str(sites)], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--only", nargs="+", default=["accuracy", "quantization", "timing"],
        choices=["accuracy", "quantization", "timing"],
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed")
    parser.add_argument(
        "--sites", type=int, nargs="+", default=[5, 10, 20, 50], help="site counts to time"
    )
    parser.add_argument(
        "--num-shares", type=int, default=None, help="time with secagg.num_shares fixed"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "secure_aggregation.json")
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "accuracy" in args.only:
            extra = ["federation.rounds=2"] if args.quick else []
            results["heart_dp_eps1"] = {"seeds": seeds, **accuracy(seeds, extra, workdir)}
        if "quantization" in args.only:
            results["quantization_cnn"] = quantization(args.quick)
        if "timing" in args.only:
            sites_list = [5] if args.quick else args.sites
            shares = [] if args.num_shares is None else [f"secagg.num_shares={args.num_shares}"]
            key = "round_time" + ("" if args.num_shares is None else f"_shares_{args.num_shares}")
            results[key] = timing(sites_list, 2 if args.quick else 4, workdir, shares)
    if not args.quick:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
