"""Accounting goes through Opacus' accountants; calibration hits its target."""

from __future__ import annotations

import tracemalloc

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmed.errors import ConfigError
from fedmed.privacy.accounting import (
    PRV_RELATIVE_EPS_ERROR,
    DPSteps,
    calibrate_noise_multiplier,
    cumulative_epsilon,
)


def test_recorded_steps_give_the_same_epsilon_as_a_stepped_accountant() -> None:
    records = [DPSteps(1.1, 0.05, 40), DPSteps(1.1, 0.05, 40), DPSteps(1.3, 0.04, 25)]
    for name, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        stepped = cls()
        for r in records:
            for _ in range(r.steps):
                stepped.step(noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate)
        extra = {}
        if name == "prv":  # the error bound is relative to the (RDP) epsilon
            rdp = RDPAccountant()
            rdp.history = stepped.history
            extra = {"eps_error": PRV_RELATIVE_EPS_ERROR * rdp.get_epsilon(delta=1e-3)}
        expected = stepped.get_epsilon(delta=1e-3, **extra)
        assert cumulative_epsilon(records, 1e-3, name) == pytest.approx(expected, rel=1e-6)


def test_prv_working_memory_of_a_long_run_stays_small() -> None:
    """A 10x longer run calibrated to the same epsilon: PRV's working memory stays bounded
    (an absolute eps_error made it grow with sqrt(steps) / eps_error; measured 6 -> 34 MB)."""
    peaks = []
    for steps in (35, 350):
        sigma = calibrate_noise_multiplier(1.0, 1e-3, 0.14, steps, "prv")
        tracemalloc.start()
        eps = cumulative_epsilon([DPSteps(sigma, 0.14, steps)], 1e-3, "prv")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert 0.97 < eps <= 1.0
    assert peaks[1] < 16 * 2**20, peaks


def test_epsilon_grows_with_steps_and_rdp_is_looser_than_prv() -> None:
    one = cumulative_epsilon([DPSteps(1.0, 0.1, 50)], 1e-3, "prv")
    two = cumulative_epsilon([DPSteps(1.0, 0.1, 50)] * 2, 1e-3, "prv")
    assert 0 < one < two
    assert cumulative_epsilon([DPSteps(1.0, 0.1, 100)], 1e-3, "rdp") > two
    assert cumulative_epsilon([], 1e-3, "prv") == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_reaches_the_target_epsilon(accountant: str) -> None:
    sigma = calibrate_noise_multiplier(1.0, 1e-3, 0.05, 200, accountant)
    eps = cumulative_epsilon([DPSteps(sigma, 0.05, 200)], 1e-3, accountant)
    assert 0.95 <= eps <= 1.0


def test_unknown_accountant_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.accountant='moments'.*prv, rdp, gdp"):
        cumulative_epsilon([DPSteps(1.0, 0.1, 1)], 1e-3, "moments")
