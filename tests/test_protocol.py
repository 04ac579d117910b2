"""The wire between site and coordinator: typed reports send exactly the keys and values the
dictionaries they replaced sent (through Flower's own record serialisation), read back whole,
and a reply that is not a report is refused by the coordinator, naming the site."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, ConfigRecord, FitRes, Status, ndarrays_to_parameters
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from fedmed.config.schema import FAULT_STAGES
from fedmed.coordinator.federated import FederatedStrategy
from fedmed.coordinator.recorder import RunRecorder
from fedmed.coordinator.strategies import build_strategy
from fedmed.metrics import EvalStats
from fedmed.protocol import (
    FIT_METRIC_KEYS,
    PRIVACY_METRIC_KEYS,
    EvaluateReport,
    FitReport,
    PrivacyReport,
    RecordError,
    Release,
    Stage,
    declared,
)
from fedmed.runs.compose import compose_config

ACCOUNTING = PrivacyReport(
    epsilon=0.34, budget_epsilon=1.0, delta=1e-3, noise_multiplier=1.98,
    sample_rate=16 / 227, steps=15, ledger="/hospital/va.ledger.jsonl", accountant="prv",
)  # fmt: skip
# The dictionaries the site sent before the reports existed (fedmed 29c18e6, site/client.py).
COMMON = {
    "budget_epsilon": 1.0, "delta": 1e-3, "accountant": "prv", "noise_multiplier": 1.98,
    "sample_rate": 16 / 227, "ledger": "/hospital/va.ledger.jsonl",
}  # fmt: skip
SENT_BEFORE = {
    "plain": {"site": "va", "num_examples": 227, "train_loss": 0.4},
    "trained": {
        "site": "va", "num_examples": 227, "train_loss": 0.4, "epsilon": 0.34, "steps": 15,
        "ledger_entry": "a" * 64, **COMMON,
    },
    "declined": {
        "site": "va", "num_examples": 0, "epsilon": 0.34, "steps": 0,
        "declined": "privacy budget: ...", **COMMON,
    },
}  # fmt: skip
REPORTS = {
    "plain": FitReport("va", 227, 0.4),
    "trained": FitReport("va", 227, 0.4, dataclasses.replace(ACCOUNTING, ledger_entry="a" * 64)),
    "declined": FitReport(
        "va", 0, privacy=dataclasses.replace(ACCOUNTING, steps=0, declined="privacy budget: ...")
    ),
}


def _over_the_wire(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics as the other side gets them: a ConfigRecord through Flower's protobuf."""
    return dict(config_record_from_proto(config_record_to_proto(ConfigRecord(metrics))))


@pytest.mark.parametrize("kind", sorted(REPORTS))
def test_a_report_sends_what_the_site_sent_before_and_reads_back_whole(kind: str) -> None:
    sent = REPORTS[kind].to_metrics()
    assert sent == SENT_BEFORE[kind]
    assert {k: type(v) for k, v in sent.items()} == {
        k: type(v) for k, v in SENT_BEFORE[kind].items()
    }
    received = _over_the_wire(sent)
    assert received == sent
    assert FitReport.from_metrics(received) == REPORTS[kind]
    assert set(sent) <= set(FIT_METRIC_KEYS) | set(PRIVACY_METRIC_KEYS)


def test_a_declined_report_says_so_and_a_trained_one_does_not() -> None:
    assert REPORTS["declined"].declined == "privacy budget: ..."
    assert REPORTS["trained"].declined is None and REPORTS["plain"].declined is None


def test_an_evaluate_report_reads_back_its_counts() -> None:
    stats = EvalStats(50, 12.5, 40, np.arange(4, dtype=np.int64), np.ones(4, dtype=np.int64))
    sent = EvaluateReport("va", stats).to_metrics()
    assert set(sent) == {"site", "num_examples", "loss_sum", "correct", "hist_pos", "hist_neg"}
    back = EvaluateReport.from_metrics(_over_the_wire(sent))
    assert back.site == "va" and (back.stats.num_examples, back.stats.correct) == (50, 40)
    assert back.stats.hist_pos is not None and back.stats.hist_pos.tolist() == [0, 1, 2, 3]
    with pytest.raises(RecordError, match="evaluate report: unreadable counts"):
        EvaluateReport.from_metrics({"site": "va", "num_examples": 50})


def test_a_personal_models_exact_counts_travel_prefixed_without_dp() -> None:
    stats = EvalStats(50, 12.5, 40, np.arange(4, dtype=np.int64), np.ones(4, dtype=np.int64))
    own = EvalStats(50, 10.0, 45, np.ones(4, dtype=np.int64), np.arange(4, dtype=np.int64))
    sent = EvaluateReport("va", stats, personal_stats=own).to_metrics()
    assert sent["personal_model_correct"] == 45 and sent["correct"] == 40
    assert all(declared("evaluateres.metrics", key) is Release.EXACT
               for key in sent if key.startswith("personal_model_"))  # fmt: skip
    back = EvaluateReport.from_metrics(_over_the_wire(sent))
    assert back.personal_stats is not None and back.personal_stats.correct == 45
    assert back.stats is not None and back.stats.correct == 40 and back.personal is None


def test_a_fine_tuning_s_accounting_travels_prefixed_beside_a_private_evaluation() -> None:
    personal = dataclasses.replace(ACCOUNTING, steps=30, ledger_entry="b" * 64)
    report = EvaluateReport(
        "va", num_examples=50, noisy_counts=np.array([1.5, 2.5]),
        privacy=dataclasses.replace(ACCOUNTING, ledger_entry="c" * 64), personal=personal,
    )  # fmt: skip
    sent = report.to_metrics()
    assert sent["personal_steps"] == 30 and sent["personal_ledger_entry"] == "b" * 64
    assert sent["steps"] == 15  # the evaluation's own accounting is untouched
    assert all(declared("evaluateres.metrics", key) is Release.PUBLIC
               for key in sent if key.startswith("personal_"))  # fmt: skip
    back = EvaluateReport.from_metrics(_over_the_wire(sent))
    assert back.personal == personal and back.privacy == report.privacy
    without = {k: v for k, v in sent.items() if not k.startswith("personal_")}
    assert EvaluateReport.from_metrics(_over_the_wire(without)).personal is None


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({"num_examples": 5}, "fit report lacks site"),
        ({"site": "va", "num_examples": "5"}, "fit report field 'num_examples' is '5', not an"),
        ({**SENT_BEFORE["trained"], "epsilon": "0.3"}, "field 'epsilon' is '0.3', not a number"),
        ({**SENT_BEFORE["plain"], "epsilon": 0.3}, "fit report lacks budget_epsilon, delta,"),
    ],
)
def test_a_reply_that_is_no_report_names_the_key(metrics: dict[str, Any], problem: str) -> None:
    with pytest.raises(RecordError, match=problem):
        FitReport.from_metrics(metrics)


def test_the_coordinator_refuses_an_unreadable_report_and_names_the_site(tmp_path: Path) -> None:
    weights = [np.zeros(3, dtype=np.float32)]
    cfg = compose_config(["dataset=heart", "model=svm"])
    recorder = RunRecorder(cfg, tmp_path, 3)
    inner = build_strategy(cfg, 3, ndarrays_to_parameters(weights))
    strategy = FederatedStrategy(inner, recorder, min_sites=2, evaluation_rounds=[1])
    strategy.global_weights = weights

    def reply(metrics: dict[str, Any]) -> tuple[None, FitRes]:
        update = ndarrays_to_parameters([np.ones(3, dtype=np.float32)])
        return None, FitRes(Status(Code.OK, ""), update, 10, metrics)

    results = [
        reply(FitReport("cleveland", 10, 0.4).to_metrics()),
        reply(FitReport("hungary", 10, 0.4).to_metrics()),
        reply({"site": "va", "num_examples": 10, "train_loss": "low"}),
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert parameters is not None
    [failure] = recorder.failures
    assert (failure.site, failure.stage) == ("va", "fit")
    assert "unreadable fit report (fit report field 'train_loss' is 'low'" in failure.error


def test_the_fault_stages_a_site_can_be_given_are_flowers_own_secaggplus_stages() -> None:
    """The config cannot import Flower; its SecAgg+ stage names must still be Flower's."""
    assert set(Stage.all()) <= set(FAULT_STAGES)
    assert [s for s in FAULT_STAGES if s in Stage.all()] == list(Stage.all())
