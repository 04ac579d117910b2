"""``strategy.average_decay``: the evaluated and saved model is the moving average of the
rounds' global models, while training continues from the plain global model."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.coordinator.checkpoint import CHECKPOINT_FILE
from fedmed.coordinator.federated import moving_average
from fedmed.errors import ConfigError
from fedmed.runs.compose import compose_config
from fedmed.runs.simulation import simulate

pytestmark = [pytest.mark.slow, pytest.mark.cost(15)]


def test_the_average_starts_at_the_first_model_and_decays() -> None:
    first = moving_average(None, [np.array([2.0, 4.0])], 0.75)
    assert first[0].tolist() == [2.0, 4.0]
    second = moving_average(first, [np.array([6.0, 0.0])], 0.75)
    assert second[0].tolist() == [3.0, 3.0]  # 0.75 x [2, 4] + 0.25 x [6, 0]


def test_a_bad_decay_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.average_decay=1\.0"):
        compose_config(["strategy.average_decay=1.0"])


def test_the_saved_model_is_the_average_of_a_real_run(tmp_path: Path) -> None:
    cfg = compose_config(["dataset=heart", "model=svm", "federation.rounds=3",
                          "strategy.average_decay=0.5"])  # fmt: skip
    summary = simulate(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["failures"] == [], summary
    with (tmp_path / CHECKPOINT_FILE).open("rb") as handle:
        state = pickle.load(handle)
    saved = [t.numpy() for t in torch.load(tmp_path / "global_model.pt").values()]
    assert state.averaged_weights is not None
    assert all(np.allclose(s, a) for s, a in zip(saved, state.averaged_weights, strict=True))
    assert not all(np.allclose(s, g) for s, g in zip(saved, state.global_weights, strict=True))
