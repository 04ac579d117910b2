"""A NaN, an infinity or a wrong shape never reaches the global model: the shared check, and the
coordinator's use of it on real Flower FitRes objects through the FedAvg strategy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedmed.coordinator.federated import FederatedStrategy
from fedmed.coordinator.recorder import RunRecorder
from fedmed.coordinator.strategies import build_strategy
from fedmed.protocol import FitReport
from fedmed.runs.compose import compose_config
from fedmed.secure.update_checks import update_problem

GLOBAL = [np.zeros((2, 3), dtype=np.float32), np.zeros(2, dtype=np.float32)]


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        ([np.ones((2, 3)), np.ones(2)], None),
        ([np.ones((2, 3))], "1 arrays, expected 2"),
        ([np.ones((3, 2)), np.ones(2)], "array 0 has shape (3, 2), expected (2, 3)"),
        ([np.ones((2, 3)), np.array([1.0, np.nan])], "array 1 holds 1 non-finite value"),
        ([np.full((2, 3), np.inf), np.ones(2)], "array 0 holds 6 non-finite value"),
        ([np.ones((2, 3)), np.array(["a", "b"])], "array 1 has dtype <U1"),
    ],
)
def test_update_problem_names_the_array_and_the_fault(update, problem) -> None:
    found = update_problem(update, GLOBAL)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


def _fit_res(site: str, arrays: list[np.ndarray], n: int) -> FitRes:
    metrics = FitReport(site, n, train_loss=0.5).to_metrics()
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)


def test_coordinator_drops_unsound_updates_and_averages_the_rest(tmp_path: Path) -> None:
    cfg = compose_config(["dataset=heart", "model=svm"])
    recorder = RunRecorder(cfg, tmp_path, 4)
    inner = build_strategy(cfg, 4, ndarrays_to_parameters(GLOBAL))
    strategy = FederatedStrategy(inner, recorder, min_sites=2, evaluation_rounds=[1])
    strategy.global_weights = [a.copy() for a in GLOBAL]
    good_a = [np.full((2, 3), 1.0, np.float32), np.full(2, 1.0, np.float32)]
    good_b = [np.full((2, 3), 4.0, np.float32), np.full(2, 4.0, np.float32)]
    results = [
        (None, _fit_res("cleveland", good_a, 100)),
        (None, _fit_res("hungary", good_b, 50)),
        (None, _fit_res("switzerland", [np.full((2, 3), np.nan, np.float32), GLOBAL[1]], 50)),
        (None, _fit_res("va", [np.ones((3, 3), np.float32), GLOBAL[1]], 50)),
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert parameters is not None
    aggregate = parameters_to_ndarrays(parameters)
    assert all(np.isfinite(a).all() for a in aggregate)
    np.testing.assert_allclose(aggregate[0], np.full((2, 3), 2.0), rtol=1e-6)  # (100*1+50*4)/150
    rejected = {f.site: f.error for f in recorder.failures}
    assert set(rejected) == {"switzerland", "va"}
    assert "non-finite" in rejected["switzerland"] and "shape (3, 3)" in rejected["va"]
