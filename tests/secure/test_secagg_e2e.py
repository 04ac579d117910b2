"""SecAgg+ end to end on Flower's Ray simulation with real data, instrumented at the coordinator.

The coordinator's strategy and every message that reaches it are recorded; each round's
aggregate is compared with the exact weighted mean of the surviving sites' deltas, which the
test recomputes offline by running the same (deterministic, non-private) site code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Message, MessageType, parameters_to_ndarrays

from fedmed.config.schema import FedMedConfig
from fedmed.coordinator.federated import FederatedStrategy
from fedmed.coordinator.grid import ObservedGrid
from fedmed.runs.compose import compose_config
from fedmed.runs.exact_evaluation import exact_evaluation
from fedmed.runs.simulation import simulate
from fedmed.secure.params import resolve_secagg
from fedmed.site.client import HospitalSite, SiteRuntime
from tests.e2e import read_summary, run_fedmed

pytestmark = [pytest.mark.slow, pytest.mark.cost(130)]  # seconds, the file alone on 2 cores


class Instrumented:
    """What the coordinator's strategy received per round, and every reply it was sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rounds: dict[int, dict[str, Any]] = {}
        self.replies: list[Message] = []
        aggregate_fit = FederatedStrategy.aggregate_fit
        send_and_receive = ObservedGrid.send_and_receive

        def spy_aggregate(
            strategy: FederatedStrategy, server_round: int, results: list, failures: list
        ) -> Any:
            assert strategy.global_weights is not None
            self.rounds[server_round] = {
                "global": [w.copy() for w in strategy.global_weights],
                "parameters": [parameters_to_ndarrays(r.parameters) for _, r in results],
                "sites": {str(r.metrics["site"]): r.num_examples for _, r in results},
            }
            return aggregate_fit(strategy, server_round, results, failures)

        def spy_send(grid: ObservedGrid, messages: Any, *args: Any, **kwargs: Any) -> Any:
            replies = send_and_receive(grid, messages, *args, **kwargs)
            self.replies.extend(replies)
            return replies

        monkeypatch.setattr(FederatedStrategy, "aggregate_fit", spy_aggregate)
        monkeypatch.setattr(ObservedGrid, "send_and_receive", spy_send)


def _exact_mean_delta(
    cfg: FedMedConfig, global_weights: list[np.ndarray], server_round: int, sites: set[int]
) -> tuple[list[np.ndarray], list[int]]:
    """The weighted mean of the sites' deltas, by running the site code offline."""
    deltas, weights = [], []
    for index in sorted(sites):
        site = HospitalSite(cfg, index, SiteRuntime("offline", Path("/nonexistent"), False))
        delta, n, _ = site.fit(global_weights, {"server_round": server_round})
        deltas.append(delta)
        weights.append(n)
    total = sum(weights)
    mean = [sum(d[k] * w for d, w in zip(deltas, weights, strict=True)) / total
            for k in range(len(global_weights))]  # fmt: skip
    return mean, weights


def test_aggregate_is_exact_under_dropouts_and_the_coordinator_sees_only_the_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # 10 sites, 10 shares, threshold 7. Round 1: one site drops after sending its keys;
    # round 2: three drop before sending their masked input; round 3: one drops after
    # sending it; round 4: four drop (6 left < 7): the round fails; round 5: one site drops
    # before sending its keys.
    faults = ["site-1:share_keys:1"]
    faults += [f"site-{i}:collect_masked_vectors:2" for i in (2, 3, 4)]
    faults += ["site-5:unmask:3"]
    faults += [f"site-{i}:share_keys:4" for i in (0, 1, 2, 3)]
    faults += ["site-6:setup:5"]
    cfg = compose_config(
        ["dataset=breast_cancer", "model=logreg", "federation.num_sites=10",
         "federation.rounds=5", "secagg=secaggplus", f"inject_faults=[{','.join(faults)}]"]
    )  # fmt: skip
    spy = Instrumented(monkeypatch)
    with caplog.at_level("INFO", logger="fedmed.coordinator.recorder"):
        summary = simulate(cfg, tmp_path)

    assert summary["status"] == "completed", summary["stop_reason"]
    secure = summary["secure_aggregation"]
    assert secure["protocol"] == "secaggplus"
    assert (secure["num_shares"], secure["reconstruction_threshold"]) == (10, 7)
    dropped = {(d["round"], d["site"], d["stage"]) for d in secure["dropped"]}
    assert dropped == {
        (1, "site-1", "share_keys"),
        (2, "site-2", "collect_masked_vectors"),
        (2, "site-3", "collect_masked_vectors"),
        (2, "site-4", "collect_masked_vectors"),
        (3, "site-5", "unmask"),
        *((4, f"site-{i}", "share_keys") for i in (0, 1, 2, 3)),
        (5, "site-6", "setup"),
    }
    assert [f["round"] for f in secure["failed_rounds"]] == [4]
    assert "below the reconstruction threshold 7" in secure["failed_rounds"][0]["reason"]
    # Each dropout is one failure, named, in its stage (Flower also hands the unmask
    # stage's errors to aggregate_fit: they were recorded a second time, as "fit").
    failures = sorted((f["round"], f["site"], f["stage"]) for f in summary["failures"])
    assert failures == sorted(dropped), summary["failures"]
    # The progress line counts the sites whose update is in the aggregate (site-5 dropped
    # at unmask after sending its masked update: it is in round 3's sum), not those sampled.
    progress = re.findall(r"round +(\d)/5 .*\| sites trained (\d+), evaluated (\d+)",
                          "\n".join(caplog.messages))  # fmt: skip
    assert progress == [("1", "9", "10"), ("2", "7", "10"), ("3", "10", "10"),
                        ("4", "0", "10"), ("5", "9", "10")]  # fmt: skip

    # The strategy never saw round 4 and the global model did not move in it.
    assert sorted(spy.rounds) == [1, 2, 3, 5]
    for a, b in zip(spy.rounds[5]["global"], _global_after(spy.rounds[3]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    params = resolve_secagg(cfg, 10)
    assert params is not None
    contributing = {1: set(range(10)) - {1}, 2: set(range(10)) - {2, 3, 4}, 3: set(range(10)),
                    5: set(range(10)) - {6}}  # fmt: skip
    for server_round, record in spy.rounds.items():
        # Every result handed to the strategy carries the same array: the aggregate.
        first = record["parameters"][0]
        for other in record["parameters"][1:]:
            for a, b in zip(first, other, strict=True):
                np.testing.assert_array_equal(a, b)
        assert set(record["sites"]) == {f"site-{i}" for i in contributing[server_round]}
        aggregate = first  # the sites send deltas; SecAgg+ returns their weighted mean
        exact, weights = _exact_mean_delta(
            cfg, record["global"], server_round, contributing[server_round]
        )
        bound = params.max_quantization_error(weights)
        error = max(float(np.abs(a - e).max()) for a, e in zip(aggregate, exact, strict=True))
        assert error <= bound + 1e-6, (server_round, error, bound)
        assert error > 0.0  # it really went through quantization
    assert secure["max_quantization_error"] == pytest.approx(
        max(params.max_quantization_error(_weights(r)) for r in spy.rounds.values())
    )

    # No reply to a training request carried model arrays: only masked integers as bytes.
    train_replies = [m for m in spy.replies if m.metadata.message_type == MessageType.TRAIN]
    assert len(train_replies) > 40
    for reply in train_replies:
        if not reply.has_error():
            assert all(len(rec) == 0 for rec in reply.content.array_records.values())


def _global_after(record: dict[str, Any]) -> list[np.ndarray]:
    return [g + d for g, d in zip(record["global"], record["parameters"][0], strict=True)]


def _weights(record: dict[str, Any]) -> list[int]:
    return list(record["sites"].values())


def test_dp_with_secagg_matches_the_sites_ledgers_and_never_clips_silently(
    tmp_path: Path,
) -> None:
    # Hungary's training diverges to NaN in round 2: its own check keeps the update from
    # being masked and sent (no ledger entry: nothing left the site), the round goes on
    # with the other three, and Hungary trains again in round 3. VA drops out at its very
    # first message (round 1 setup), before the coordinator has heard its name.
    run = tmp_path / "dp"
    proc = run_fedmed(
        "simulate", "dataset=heart", "model=svm", "privacy=dp", "secagg=secaggplus",
        "federation.rounds=3", "inject_faults=[hungary:nan_update:2,va:setup:1]",
        "privacy.noise_seed=0",  # reproducible: the accuracy check sees the same run each time
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run)
    assert summary["secure_aggregation"]["protocol"] == "secaggplus"
    assert [(d["round"], d["site"]) for d in summary["secure_aggregation"]["dropped"]] == [
        (1, "va"), (2, "hungary")
    ]  # fmt: skip
    assert [(f["site"], f["round"]) for f in summary["failures"]] == [("va", 1), ("hungary", 2)]
    assert "update not sent: array 0 holds" in summary["failures"][1]["error"]
    trained = re.findall(r"round +\d/3 .*\| sites trained (\d)", proc.stdout)
    assert trained == ["3", "3", "4"], proc.stdout[-3000:]
    assert "sites trained 4, evaluated 4" in proc.stdout  # through SecAgg+ too, after round 3
    assert summary["rounds_completed"] == 3
    exact = exact_evaluation(run)  # the model itself; the coordinator saw the noisy sum only
    assert exact.accuracy >= 0.7
    assert abs(summary["global"]["accuracy"] - exact.accuracy) < 0.2  # noise sd about 0.04
    for site in ("cleveland", "hungary", "switzerland", "va"):
        assert summary["sites"][site]["privacy"]["record_epsilon"] <= 1.0
        entries = [json.loads(line) for line in
                   (run / "ledgers" / f"{site}.ledger.jsonl").read_text().splitlines()]  # fmt: skip
        rounds = [e["round"] for e in entries if e["split"] == "train"]
        assert rounds == {"hungary": [1, 3], "va": [2, 3]}.get(site, [1, 2, 3])
        assert [e["round"] for e in entries if e["split"] == "evaluation"] == [3]

    # A clipping range no update fits: every site refuses to send, nothing is clipped, the
    # round fails below the threshold and the run stops (fewer than min_sites remain).
    tight = tmp_path / "tight"
    proc = run_fedmed(
        "simulate", "dataset=heart", "model=svm", "secagg=secaggplus",
        "secagg.clipping_range=0.0001", "federation.rounds=2", f"hydra.run.dir={tight}",
    )  # fmt: skip
    assert proc.returncode == 1
    summary = read_summary(tight)
    assert summary["status"] == "stopped"
    errors = {f["site"]: f["error"] for f in summary["failures"]}
    assert set(errors) == {"cleveland", "hungary", "switzerland", "va"}
    assert all("outside secagg.clipping_range=0.0001" in e for e in errors.values())
    assert summary["secure_aggregation"]["failed_rounds"][0]["round"] == 1
    assert summary["rounds_completed"] == 0


def test_a_kit_that_requires_secure_aggregation_refuses_a_plain_run(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    kits.mkdir()
    names = ["cleveland", "hungary", "switzerland", "va"]
    repo_sites = Path(__file__).resolve().parents[2] / "sites"
    for name in names:
        # privacy=none below: these kits opt out of requiring DP (the examples require it)
        text = (repo_sites / f"{name}.yaml").read_text()
        text = text.replace("require_privacy: true", "require_privacy: false")
        if name == "va":
            text += "require_secure_aggregation: true\n"
        (kits / f"{name}.yaml").write_text(text)
    kit_list = ",".join(str(kits / f"{n}.yaml") for n in names)
    proc = run_fedmed(
        "simulate", "dataset=heart_kits", f"dataset.site_kits=[{kit_list}]",
        "federation.rounds=1", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = read_summary(tmp_path / "run")
    assert [(f["site"], f["stage"]) for f in summary["failures"]] == [("va", "fit")]
    assert "refuses a plain training request" in summary["failures"][0]["error"]
    assert summary["sites"]["va"].get("num_train") is None  # it never trained
