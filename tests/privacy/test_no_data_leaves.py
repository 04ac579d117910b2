"""No patient data leaves a site: every message the four heart-disease hospitals send in a real
simulated run (DP, then DP + SecAgg+) holds only model arrays of the global model's shapes, the
declared metric keys with scalar values or fixed-size histograms, and SecAgg+'s own protocol
fields. Nothing is sized by the number of records (no raw rows, no per-record predictions).
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import MessageType, RecordDict
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from flwr.superlink.grid import InMemoryGrid

from fedmed.data import load_site
from fedmed.metrics import HIST_BINS
from fedmed.models import build_model
from fedmed.protocol import FIT_METRIC_KEYS, PRIVACY_METRIC_KEYS, SITE_RECORD
from fedmed.runs.compose import compose_config
from fedmed.runs.simulation import simulate
from fedmed.train import get_weights

pytestmark = [pytest.mark.slow, pytest.mark.cost(55)]  # seconds, the file alone on 2 cores

EVALUATE_METRIC_KEYS = {"site", "num_examples", "loss_sum", "correct", "hist_pos", "hist_neg"}
# SecAgg+ replies: public keys, encrypted key shares, the masked vector, unmasking shares.
SECAGG_FIELDS = {"pk1", "pk2", "ctxts", "dsts", "masked_params", "nids", "shares"}


@pytest.fixture
def replies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, RecordDict]]:
    """(message type, content) of every reply any site sends, as the grid receives it (a
    copy: Flower's workflow moves the arrays out of the content as it reads them)."""
    captured: list[tuple[str, RecordDict]] = []
    pull_messages = InMemoryGrid.pull_messages

    def spy(grid: InMemoryGrid, message_ids: Any) -> Any:
        received = list(pull_messages(grid, message_ids))
        for message in received:
            assert not message.has_error(), message.error
            captured.append((message.metadata.message_type, copy.deepcopy(message.content)))
        return received

    monkeypatch.setattr(InMemoryGrid, "pull_messages", spy)
    return captured


def _check_metric_values(metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if isinstance(value, bytes):  # the margin histograms: fixed bins, int64 counts
            assert key in {"hist_pos", "hist_neg"}, key
            assert len(value) == HIST_BINS * 8, (key, len(value))
        else:
            assert isinstance(value, (int, float, str)), (key, type(value))
            if isinstance(value, str):
                assert len(value) < 300, (key, value)


def test_sites_send_only_model_arrays_counts_and_protocol_fields(
    tmp_path: Path, replies: list[tuple[str, RecordDict]]
) -> None:
    allowed_fit = set(FIT_METRIC_KEYS) | set(PRIVACY_METRIC_KEYS)
    for extra in (["privacy=dp"], ["privacy=dp", "secagg=secaggplus"]):
        cfg = compose_config(["dataset=heart", "model=svm", "federation.rounds=1", *extra])
        simulate(cfg, tmp_path / "-".join(extra))
    shapes = [
        a.shape for a in get_weights(build_model(cfg.model.name, load_site(cfg, 0).schema, 0))
    ]

    allowed_configs: dict[str, set[str]] = {
        "fitres.metrics": allowed_fit,
        "evaluateres.metrics": EVALUATE_METRIC_KEYS,
        "fitres.status": {"code", "message"},
        "evaluateres.status": {"code", "message"},
        "secaggplus_configs": SECAGG_FIELDS,
        SITE_RECORD: {"site"},
    }
    allowed_metric_records = {"fitres.num_examples", "evaluateres.loss", "evaluateres.num_examples"}
    kinds = {"model arrays": 0, "masked (no arrays)": 0, "evaluation": 0}
    for message_type, content in replies:
        for name, record in content.config_records.items():
            assert name in allowed_configs, name
            assert set(record) <= allowed_configs[name], (name, set(record))
            if name.endswith(".metrics"):
                _check_metric_values(dict(record))
        assert set(content.metric_records) <= allowed_metric_records, set(content.metric_records)
        assert set(content.array_records) <= {"fitres.parameters"}, set(content.array_records)
        secure = content.config_records.get("secaggplus_configs", {})
        arrays = []
        if "fitres.parameters" in content.array_records:
            fit = recorddict_to_fitres(content, keep_input=True)
            arrays = [np.load(io.BytesIO(t)) for t in fit.parameters.tensors]
        if message_type == MessageType.EVALUATE:
            kinds["evaluation"] += 1
        elif "masked_params" in secure:  # the masked vector travels as protocol integers
            assert arrays == []
            kinds["masked (no arrays)"] += 1
        elif arrays:
            assert [a.shape for a in arrays] == shapes
            kinds["model arrays"] += 1
    # 4 sites, 1 round each run: model arrays without SecAgg+, masked vectors with it.
    assert kinds == {"model arrays": 4, "masked (no arrays)": 4, "evaluation": 8}, kinds
    # The fit metrics (with the ledger entry's hash) reach the coordinator under SecAgg+ too:
    # it holds a receipt naming each site's new entry.
    for extra in (["privacy=dp"], ["privacy=dp", "secagg=secaggplus"]):
        run_dir = tmp_path / "-".join(extra)
        receipts = [json.loads(x) for x in (run_dir / "receipts.jsonl").read_text().splitlines()]
        heads = {
            p.name.split(".")[0]: json.loads(p.read_text().splitlines()[-1])["hash"]
            for p in (run_dir / "ledgers").glob("*.ledger.jsonl")
        }
        assert {r["site"]: r["ledger_entry"] for r in receipts} == heads, extra
