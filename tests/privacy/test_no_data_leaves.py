"""Nothing leaves a site outside the privacy guarantee: every value of every message the four
heart-disease hospitals send in real simulated runs (DP, DP + SecAgg+) is declared in the
protocol's inventory (``fedmed.protocol.RELEASES``) as public metadata, a protocol field, a
model update or a private statistic; under DP no exact statistic leaves, and every model
update and private statistic names its ledger entry, which the site wrote first with the
mechanism its kind allows. The coordinator's own record of the traffic (``releases.jsonl``)
agrees, and its outputs hold no per-site statistic of any record. Without DP the exact
per-site figures stay (privacy=none claims nothing).
"""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from flwr.superlink.grid import InMemoryGrid

from fedmed.coordinator.recorder import ALL_SITES
from fedmed.coordinator.releases import ReleaseLog, ledger_entry, read_releases, reply_values
from fedmed.data import load_site
from fedmed.metrics import CLINICAL_METRICS, RELEASED_MARGIN_EDGES, released_size
from fedmed.models import build_model
from fedmed.operating_point import OPERATING_POINT_FILE
from fedmed.protocol import MECHANISMS_OF, NOISY_COUNTS_KEY, FitReport, Release, declared
from fedmed.runs.compose import compose_config
from fedmed.runs.exact_evaluation import exact_evaluation
from fedmed.runs.simulation import simulate
from fedmed.train import get_weights

pytestmark = [pytest.mark.slow, pytest.mark.cost(70)]  # seconds, the file alone on 2 cores

# With an operating-point rule each site also has a validation split: its counts travel too
# (exactly without DP; in the one noisy vector, after the test split's, with DP).
HEART = ["dataset=heart", "model=svm", "federation.rounds=1", "evaluation.threshold=youden"]
# Seeded: SecAgg+ and plain runs draw the same DP noise (simulation only).
DP_RUNS = {
    "dp": ["privacy=dp", "privacy.noise_seed=0"],
    "dp-secagg": ["privacy=dp", "privacy.noise_seed=0", "secagg=secaggplus"],
}
Reply = tuple[str, RecordDict]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[Reply]:
    """(message type, content) of every reply any site sends, as the grid receives it (a
    copy: Flower's workflow moves the arrays out of the content as it reads them)."""
    captured: list[Reply] = []
    pull_messages = InMemoryGrid.pull_messages

    def spy(grid: InMemoryGrid, message_ids: Any) -> Any:
        received = list(pull_messages(grid, message_ids))
        for message in received:
            assert not message.has_error(), message.error
            captured.append((message.metadata.message_type, copy.deepcopy(message.content)))
        return received

    monkeypatch.setattr(InMemoryGrid, "pull_messages", spy)
    return captured


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Reply]]]:
    """One real 1-round run per setting, with every reply it received."""
    out: dict[str, tuple[Path, list[Reply]]] = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, extra in {**DP_RUNS, "none": ["privacy=none"]}.items():
            captured = _spy(monkeypatch)
            run_dir = tmp_path_factory.mktemp(name)
            simulate(compose_config([*HEART, *extra]), run_dir)
            out[name] = (run_dir, captured)
            monkeypatch.undo()
    return out


def _ledgers(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every entry of the run's site ledgers, by hash."""
    entries = {}
    for ledger in (run_dir / "ledgers").glob("*.ledger.jsonl"):
        for line in ledger.read_text().splitlines():
            entry = json.loads(line)
            entries[entry["hash"]] = entry
    return entries


def _model_shapes() -> list[tuple[int, ...]]:
    cfg = compose_config(HEART)
    model = build_model(cfg.model.name, load_site(cfg, 0).schema, 0)
    return [a.shape for a in get_weights(model)]


def _check_value_sizes(content: RecordDict, shapes: list[tuple[int, ...]]) -> None:
    """Nothing is sized by the number of records: scalars, short strings, the model's
    arrays, the fixed released counts; SecAgg+'s protocol bytes aside."""
    for name, record in content.config_records.items():
        for key, value in record.items():
            if name == "secaggplus_configs":
                continue
            if key == NOISY_COUNTS_KEY:
                assert isinstance(value, bytes)
                # test split, then validation split: one count per bin and class each
                assert len(value) == 2 * released_size(2, RELEASED_MARGIN_EDGES) * 8
            else:
                assert isinstance(value, (int, float, str)), (name, key, type(value))
                assert not isinstance(value, str) or len(value) < 300, (name, key)
    if "fitres.parameters" in content.array_records and len(content["fitres.parameters"]):
        fit = recorddict_to_fitres(content, keep_input=True)
        arrays = [np.load(io.BytesIO(t)) for t in fit.parameters.tensors]
        assert [a.shape for a in arrays] == shapes


@pytest.mark.parametrize("run", list(DP_RUNS))
def test_every_value_a_site_sends_is_declared_and_every_private_one_is_in_its_ledger(
    runs: dict[str, tuple[Path, list[Reply]]], run: str
) -> None:
    run_dir, replies = runs[run]
    entries = _ledgers(run_dir)
    shapes = _model_shapes()
    kinds_seen: set[Release] = set()
    ledgered = 0
    for _, content in replies:
        kinds = {(r, k): declared(r, k) for r, k in reply_values(content)}
        assert None not in kinds.values(), [v for v, kind in kinds.items() if kind is None]
        assert Release.EXACT not in kinds.values(), kinds
        kinds_seen |= set(kinds.values())  # type: ignore[arg-type]
        _check_value_sizes(content, shapes)
        private = {kind for kind in kinds.values() if kind in MECHANISMS_OF}
        if private:
            entry = entries[ledger_entry(content)]  # type: ignore[index]
            assert all(entry["mechanism"] in MECHANISMS_OF[kind] for kind in private), entry
            ledgered += 1
    # 4 sites: a DP update each, then a private evaluation each (a masked one with SecAgg+).
    assert ledgered == 8 == len(entries)
    expected = {Release.PUBLIC, Release.PROTOCOL}
    if run == "dp":
        expected |= {Release.MODEL_UPDATE, Release.PRIVATE_STATISTIC}
        assert {t for t, _ in replies} == {MessageType.TRAIN, MessageType.EVALUATE}
    else:  # nothing leaves a SecAgg+ site unmasked: no plain update, no plain evaluation
        expected |= {Release.MASKED}
        assert {t for t, _ in replies} == {MessageType.TRAIN}
    assert kinds_seen == expected
    # The coordinator's own record of the traffic: one line per reply, none out of line.
    logged = read_releases(run_dir)
    assert len(logged) == len(replies) and not any("problems" in line for line in logged)
    assert {line["ledger_entry"] for line in logged} - {None} == set(entries)
    # An evaluation entry counts every held-out record: the test and the validation split.
    cfg = compose_config([*HEART, *DP_RUNS[run]])
    held_out = {load_site(cfg, i).name: load_site(cfg, i).held_out_records for i in range(4)}
    evaluations = [e for e in entries.values() if e["mechanism"] == "gaussian_evaluation_counts"]
    assert {e["site"]: e["dataset_size"] for e in evaluations} == held_out
    assert all("then validation records" in e["released"] for e in evaluations)


@pytest.mark.parametrize("run", list(DP_RUNS))
def test_the_coordinator_keeps_no_per_site_statistic_of_any_record(
    runs: dict[str, tuple[Path, list[Reply]]], run: str
) -> None:
    run_dir, _ = runs[run]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    statistics = ("train_loss", "test_loss", "accuracy", *CLINICAL_METRICS, "auc")
    for row in rows:
        if row["site"] != ALL_SITES:
            assert not any(row[column] for column in statistics), row
    [global_row] = [row for row in rows if row["site"] == ALL_SITES]
    assert 0.5 < float(global_row["accuracy"]) <= 1.0
    # from the noisy bins, at the threshold chosen on the noisy validation bins (an edge)
    assert 0.5 < float(global_row["balanced_accuracy"]) <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global"]["evaluation"] == "private" and summary["global"]["loss"] is None
    assert summary["global"]["threshold"] in RELEASED_MARGIN_EDGES
    assert summary["global"]["threshold_rule"].startswith("youden")
    for site in summary["sites"].values():
        assert set(site) == {"num_train", "num_test", "privacy"}, site
        assert site["privacy"]["record_epsilon"] <= site["privacy"]["budget_epsilon"]


def test_the_secure_evaluation_unmasks_the_same_sum_as_the_plain_one(
    runs: dict[str, tuple[Path, list[Reply]]],
) -> None:
    """Same DP noise (seeded), so the two runs' global models differ only by SecAgg+'s
    quantization of the updates and their noisy counts by its quantization of the counts."""
    plain, secure = (json.loads((runs[r][0] / "summary.json").read_text()) for r in DP_RUNS)
    for metric in ("accuracy", "auc"):
        assert secure["global"][metric] == pytest.approx(plain["global"][metric], abs=0.01)


def test_without_dp_the_sites_report_exact_figures(
    runs: dict[str, tuple[Path, list[Reply]]],
) -> None:
    run_dir, replies = runs["none"]
    exact = {
        (r, k) for _, c in replies for r, k in reply_values(c) if declared(r, k) is Release.EXACT
    }
    assert ("fitres.metrics", "train_loss") in exact and (
        "evaluateres.metrics",
        "hist_pos",
    ) in exact
    assert ("evaluateres.metrics", "validation_hist_pos") in exact
    # The threshold chosen on the exact validation histograms is saved with the model, and the
    # saved model read at it gives the reported test figures exactly.
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = json.loads((run_dir / OPERATING_POINT_FILE).read_text())
    assert saved["threshold"] == summary["global"]["threshold"]
    recomputed = exact_evaluation(run_dir, compose_config([*HEART, "privacy=none"]))
    assert recomputed.threshold == saved["threshold"]
    for metric in ("accuracy", *CLINICAL_METRICS, "auc"):
        assert getattr(recomputed, metric) == pytest.approx(summary["global"][metric], abs=1e-12)
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["site"] != ALL_SITES]
    assert len(rows) == 4 and all(float(r["accuracy"]) > 0 and r["train_loss"] for r in rows)


def test_a_value_outside_the_inventory_is_the_sites_failure(tmp_path: Path) -> None:
    """What the coordinator does with a reply from a site that adds a metric of its own."""
    report = FitReport("va", 150).to_metrics()
    content = RecordDict()
    content["fitres.metrics"] = ConfigRecord({**report, "mean_age": 57.3})
    log = ReleaseLog(tmp_path, private=True)
    assert log.record(1, "va", "train", content) == ["undeclared value fitres.metrics/mean_age"]
    content["fitres.metrics"] = ConfigRecord({**report, "train_loss": 0.4})
    assert log.record(2, "va", "train", content) == [
        "exact statistic fitres.metrics/train_loss under DP"
    ]
    assert ReleaseLog(tmp_path / "none", private=False).record(2, "va", "train", content) == []
    assert [line["values"]["fitres.metrics/mean_age"] for line in read_releases(tmp_path)[:1]] == [
        "UNDECLARED"
    ]
