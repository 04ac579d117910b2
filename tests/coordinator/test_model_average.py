"""``strategy.average_decay``: the evaluated and saved model is the moving average of the
rounds' global models, while training continues from the plain global model (the real run
that checks the saved model is tests/explain/test_explain_e2e.py's heart run, which averages)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmed.coordinator.federated import moving_average
from fedmed.errors import ConfigError
from fedmed.runs.compose import compose_config


def test_the_average_starts_at_the_first_model_and_decays() -> None:
    first = moving_average(None, [np.array([2.0, 4.0])], 0.75)
    assert first[0].tolist() == [2.0, 4.0]
    second = moving_average(first, [np.array([6.0, 0.0])], 0.75)
    assert second[0].tolist() == [3.0, 3.0]  # 0.75 x [2, 4] + 0.25 x [6, 0]


def test_a_bad_decay_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.average_decay=1\.0"):
        compose_config(["strategy.average_decay=1.0"])
