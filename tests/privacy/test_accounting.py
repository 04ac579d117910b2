"""Accounting goes through Opacus' accountants; calibration hits its target under exactly the
function the sites' budget check uses, tightly and in bounded time."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmed.config.schema import MAX_TARGET_EPSILON, MIN_TARGET_EPSILON
from fedmed.errors import ConfigError
from fedmed.privacy import accounting
from fedmed.privacy.accounting import (
    CALIBRATION_MARGIN,
    CALIBRATION_TOLERANCE,
    PRV_RELATIVE_EPS_ERROR,
    DPSteps,
    calibrate_noise_multiplier,
    cumulative_epsilon,
)
from fedmed.privacy.budget import SitePolicy, decide
from fedmed.privacy.dp_sgd import calibrated_noise, poisson_plan

pytestmark = pytest.mark.cost(80)  # seconds, the file alone on 2 cores


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
    # Each step's RDP curve is computed once per (noise, rate) and reused: the result is
    # still exactly Opacus' own accountant's on the same (merged) history, call after call.
    merged = RDPAccountant()
    merged.history = [(1.1, 0.05, 80), (1.3, 0.04, 25)]
    for _ in range(2):
        assert cumulative_epsilon(records, 1e-3, "rdp") == merged.get_epsilon(delta=1e-3)


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


# ----------------------------------------------------------------------------- calibration
# The bundled heart hospitals' training records (batch 16, one local epoch: the defaults).
HEART_TRAIN_RECORDS = {"cleveland": 227, "hungary": 221, "switzerland": 92, "va": 150}
NOT_TIGHT = 0.997  # a noise multiplier 0.3% below the calibrated one must exceed the target


def _run_epsilon(sigma: float, plan: DPSteps, rounds: int, accountant: str) -> float:
    """The planned run's epsilon as the budget check composes it: one record per round."""
    records = [DPSteps(sigma, plan.sample_rate, plan.steps)] * rounds
    return cumulative_epsilon(records, 1e-3, accountant)


def test_heart_sites_calibrated_for_8_pass_every_round_of_their_budget_check() -> None:
    """`+epsilon=eps8` (10 rounds, budget = target): Opacus' own calibration gave cleveland
    7.5714 -> 8.0082 > 8 in round 10, and every site declined its last round."""
    for site, records in HEART_TRAIN_RECORDS.items():
        sigma = calibrated_noise(8.0, 1e-3, records, 16, 1, 10, "prv")
        plan = poisson_plan(records, 16, 1, sigma)
        policy = SitePolicy(site, 8.0, 1e-3, "prv", Path("unused.jsonl"), Path("unused.key"))
        spent: list[DPSteps] = []
        for server_round in range(1, 11):
            decision = decide(spent, plan, policy)
            assert decision.train, (site, server_round, decision.reason)
            spent.append(plan)
        assert 8.0 * (1 - CALIBRATION_TOLERANCE) <= decision.epsilon <= 8.0, (site, decision)
        assert _run_epsilon(sigma * NOT_TIGHT, plan, 10, "prv") > 8.0, site


@pytest.mark.parametrize(
    ("target", "records", "batch", "rounds", "accountant"),
    [
        (0.1, 227, 16, 10, "prv"),  # cleveland, the smallest supported target
        (0.5, 221, 16, 10, "prv"),  # hungary
        (2.0, 92, 16, 10, "prv"),  # switzerland: the largest sample rate, 1/6
        (20.0, 150, 16, 3, "prv"),  # va, the largest supported target
        (1.0, 607, 32, 10, "prv"),  # a pneumonia site (batch 32)
        (4.0, 607, 32, 50, "prv"),  # ... a long run
        (0.5, 227, 16, 10, "rdp"),
        (8.0, 92, 16, 10, "rdp"),
        (20.0, 607, 32, 1, "rdp"),
    ],
)
def test_calibration_reaches_at_most_the_target_and_is_tight(
    target: float, records: int, batch: int, rounds: int, accountant: str
) -> None:
    plan = poisson_plan(records, batch, 1, sigma=0.0)
    sigma = calibrate_noise_multiplier(
        target, 1e-3, plan.sample_rate, plan.steps, accountant, rounds=rounds
    )
    eps = _run_epsilon(sigma, plan, rounds, accountant)
    assert target * (1 - CALIBRATION_TOLERANCE) <= eps <= target * (1 - CALIBRATION_MARGIN)
    assert _run_epsilon(sigma * NOT_TIGHT, plan, rounds, accountant) > target


def test_calibration_gives_up_at_its_deadline_with_one_line() -> None:
    # Epsilons are memoised per history: a test before this one in the same process may have
    # asked for these very ones, and the search would then end well within its deadline.
    accounting._opacus_epsilon.cache_clear()
    accounting._rdp_curve.cache_clear()
    started = time.monotonic()
    # A deadline no search can meet (an accountant evaluation takes milliseconds): with 0.5 s
    # an idle machine, helped by Opacus' memoised RDP curves, sometimes finished in time.
    with pytest.raises(ConfigError) as info:
        calibrate_noise_multiplier(0.5, 1e-3, 1 / 15, 15, "prv", rounds=10, deadline_s=0.001)
    message = str(info.value)
    assert message.startswith("config error: privacy.target_epsilon=0.5 ")
    assert "did not finish within 0.001 s" in message and "\n" not in message
    assert time.monotonic() - started < 15  # the deadline plus at most one evaluation


def test_a_target_no_noise_can_reach_is_refused_quickly() -> None:
    """RDP cannot certify less than about 0.10 at delta 1e-5, whatever the noise."""
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"privacy\.target_epsilon=0\.1 .*even noise"):
        calibrate_noise_multiplier(0.1, 1e-5, 1 / 15, 15, "rdp", rounds=10)
    assert time.monotonic() - started < 10


def test_gdp_is_refused_for_budgets_but_old_gdp_entries_still_read(compose) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.accountant='gdp'.*prv, rdp"):
        calibrate_noise_multiplier(1.0, 1e-3, 0.1, 100, "gdp")
    with pytest.raises(ConfigError) as info:
        compose("privacy=dp", "privacy.accountant=gdp")
    message = str(info.value)
    assert "privacy.accountant='gdp'" in message and "not an upper bound" in message
    assert "\n" not in message
    with pytest.warns(UserWarning, match="can underestimate"):  # Opacus says so itself
        assert cumulative_epsilon([DPSteps(1.0, 0.1, 100)], 1e-3, "gdp") > 0


@pytest.mark.parametrize("target", ["1e9", "100", "20.5", "0.09", "0.001"])
def test_unreasonable_targets_are_refused_at_config_validation(compose, target: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose("privacy=dp", f"privacy.target_epsilon={target}")
    message = str(info.value)
    assert message.startswith("config error: privacy.target_epsilon=")
    assert f"[{MIN_TARGET_EPSILON:g}, {MAX_TARGET_EPSILON:g}]" in message
    assert "\n" not in message


def test_the_supported_targets_limits_are_accepted(compose) -> None:
    for target in (MIN_TARGET_EPSILON, MAX_TARGET_EPSILON):
        cfg = compose("privacy=dp", f"privacy.target_epsilon={target}")
        assert cfg.privacy.target_epsilon == target


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_memoised_rdp_curves_give_opacus_own_epsilons_to_the_last_bit(
    accountant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached one-step RDP curves (PRV's domain bound and the RDP accountant) change
    nothing: the epsilon of each history equals Opacus' own, computed without the cache."""
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp

    histories = [
        [DPSteps(1.1, 16 / 227, 15)] * 10,  # a heart site's run
        [DPSteps(0.9, 32 / 607, 19), DPSteps(1.4, 32 / 607, 19)],  # noise changed mid-run
        [DPSteps(2.0, 1.0, 1), DPSteps(0.7, 0.05, 200)],  # an evaluation and a long round
    ]
    mine = []
    for records in histories:
        accounting._opacus_epsilon.cache_clear()
        mine.append(cumulative_epsilon(records, 1e-3, accountant))
    assert rdp.compute_rdp is accounting._memoised_compute_rdp
    monkeypatch.setattr(rdp, "compute_rdp", accounting._OPACUS_COMPUTE_RDP[0])
    for records, epsilon in zip(histories, mine, strict=True):
        history = accounting._merged(records)  # the history fedmed gives Opacus
        rdp_only = create_accountant(mechanism="rdp")
        rdp_only.history = list(history)
        opacus = create_accountant(mechanism=accountant)
        opacus.history = list(history)
        with accounting._accountant_context():
            if accountant == "rdp":
                expected = opacus.get_epsilon(delta=1e-3)
            else:
                error = accounting.PRV_RELATIVE_EPS_ERROR * rdp_only.get_epsilon(delta=1e-3)
                expected = opacus.get_epsilon(delta=1e-3, eps_error=error)
        assert epsilon == expected
