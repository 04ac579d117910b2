"""Epsilon from recorded DP-SGD steps, always computed by Opacus' own accountants.

A site's privacy spend is a list of (noise multiplier, sample rate, steps) records; the
cumulative epsilon of any prefix is recomputed from the records, never carried forward from a
log. Calibration searches the noise multiplier against ``cumulative_epsilon`` itself, the
function a site's budget check calls, so the planned run never exceeds its target there.

Opacus is imported inside the functions: it takes seconds to import (torch.distributed, scipy),
and the coordinator and the sites' light message handlers use this module without computing.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np

from fedmed.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp", "gdp")
# What a site's budget check may use: upper bounds on epsilon. GDP (the central limit
# theorem's Gaussian DP) is an asymptotic approximation that undercounts at the sizes of a
# hospital's run (about 2x on the heart sites); it stays readable in old ledger entries.
BUDGET_ACCOUNTANTS = ("prv", "rdp")
# PRV reports its estimate plus an error bound ``eps_error`` (an upper bound on epsilon), which
# Opacus takes as absolute (default 0.01: 2% at epsilon 0.5). We ask for this fraction of the
# epsilon itself (of its RDP upper bound, cheap once each step's RDP curve is cached), so the
# recorded epsilon stays within 0.3% of an independent PLD recomputation at every size. An
# absolute bound would have to be the finest one ever needed, and PRV's mesh grows as
# sqrt(steps) / eps_error: the working memory of a site's budget check grew 5x over a
# 50-round run (benchmarks/memory.py).
PRV_RELATIVE_EPS_ERROR = 0.0025


@dataclass(frozen=True)
class DPSteps:
    """``steps`` Poisson-sampled Gaussian steps at one noise multiplier and sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class _NumpyFFT:
    """A ``scipy.fft`` backend that runs ``numpy.fft``, which keeps no plan cache.

    PRV composes by FFT over meshes of millions of points whose length changes with every
    step count; scipy's pocketfft keeps a plan for each recent length, so a long-lived site
    process grew by up to ~1.5 GB (measured: benchmarks/memory.py). Same results, ~9% slower.
    """

    __ua_domain__ = "numpy.scipy.fft"

    @staticmethod
    def __ua_function__(method: Any, args: Any, kwargs: Any) -> Any:
        implementation = getattr(np.fft, method.__name__, None)
        return NotImplemented if implementation is None else implementation(*args, **kwargs)


@contextmanager
def _accountant_context() -> Iterator[None]:
    """Opacus' accountants as a long-lived process needs them: no FFT plan cache, and quiet
    (PRV bounds its domain with RDP, which warns when its best order is the largest one; at
    sample rate 1, an evaluation's Gaussian mechanism, PRV takes log(1 - q) = log 0 in a
    branch ``np.where`` then discards)."""
    import scipy.fft

    _memoise_opacus_rdp()
    with (
        warnings.catch_warnings(),
        scipy.fft.set_backend(_NumpyFFT),
        np.errstate(divide="ignore"),
    ):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


@functools.lru_cache(maxsize=256)
def _rdp_curve(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> Any:
    """Opacus' own RDP curve of one step, computed once per (rate, noise, orders)."""
    curve = _OPACUS_COMPUTE_RDP[0](
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)
    )
    curve.setflags(write=False)
    return curve


def _memoised_compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders: Any) -> Any:
    """``opacus...rdp.compute_rdp`` with the same result to the last bit: Opacus computes the
    one-step curve order by order and returns it times ``steps``; so does this, from a cache."""
    if isinstance(orders, float):
        return _OPACUS_COMPUTE_RDP[0](
            q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders
        )
    return _rdp_curve(q, noise_multiplier, tuple(orders)) * steps


# Opacus' compute_rdp, kept once _memoise_opacus_rdp has put the memoised one in its place.
_OPACUS_COMPUTE_RDP: list[Any] = []


def _memoise_opacus_rdp() -> None:
    """Let Opacus' accountants reuse each step's RDP curve (idempotent).

    PRV bounds its mesh with RDP (``compute_safe_domain_size``) and recomputes, series by
    series over 60+ fractional orders, the same one-step curve for every epsilon it is asked
    for: two thirds of a heart site's budget checks and calibration (measured, cProfile of
    ``fedmed dry-run``). The curve depends on the rate, the noise and the orders alone.
    """
    from opacus.accountants.analysis import rdp

    if not _OPACUS_COMPUTE_RDP:
        _OPACUS_COMPUTE_RDP.append(rdp.compute_rdp)
        rdp.compute_rdp = _memoised_compute_rdp


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError("privacy.accountant", name, f"one of {', '.join(ACCOUNTANTS)}")


def accountant_record(name: str) -> dict[str, str]:
    """Accountant name, library and version, as recorded in ledger entries."""
    _check_accountant(name)
    record = {"name": name, "library": "opacus", "version": version("opacus")}
    if name == "prv":
        return {**record, "eps_error": f"{PRV_RELATIVE_EPS_ERROR:g} x RDP epsilon"}
    return record


def _merged(records: Sequence[DPSteps]) -> list[tuple[float, float, int]]:
    """Opacus history: steps summed per (noise multiplier, sample rate), the same composition."""
    steps: dict[tuple[float, float], int] = {}
    for r in records:
        if r.steps > 0:
            key = (r.noise_multiplier, r.sample_rate)
            steps[key] = steps.get(key, 0) + r.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float, name: str) -> float:
    """Opacus' accountant ``name`` over ``history``; PRV's error bound a fraction of the
    RDP epsilon of the same history (see PRV_RELATIVE_EPS_ERROR)."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=name)
    accountant.history = list(history)
    if name != "prv":
        return float(accountant.get_epsilon(delta=delta))
    eps_error = PRV_RELATIVE_EPS_ERROR * _epsilon_of(history, delta, "rdp")
    return float(accountant.get_epsilon(delta=delta, eps_error=eps_error))


@functools.lru_cache(maxsize=256)
def _opacus_epsilon(
    history: tuple[tuple[float, float, int], ...], delta: float, accountant: str
) -> float:
    """Cached: a budget check, the calibration and a dry run ask for the same histories."""
    with _accountant_context():
        return _epsilon_of(history, delta, accountant)


def cumulative_epsilon(records: Sequence[DPSteps], delta: float, accountant: str) -> float:
    """Epsilon after composing all ``records`` at ``delta``; 0 for no records."""
    _check_accountant(accountant)
    history = _merged(records)
    return _opacus_epsilon(tuple(history), delta, accountant) if history else 0.0


# Calibration. The planned run is ``rounds`` records of ``steps`` steps, composed by
# ``cumulative_epsilon`` exactly as the budget check composes a run's rounds. The result's
# epsilon lies in [target * (1 - CALIBRATION_TOLERANCE), target * (1 - CALIBRATION_MARGIN)]:
# a noise multiplier 0.3% smaller already exceeds the target. The margin absorbs the last
# digits in which two processes' PRV results differ (the dry run and a Ray worker calibrated
# noise multipliers 4.5e-13 apart, relative), so no site's check lands above the target.
# The search raises a ConfigError after CALIBRATION_DEADLINE_S (checked between accountant
# evaluations; one evaluation took 0.1-5 s in the supported range on the bundled sites).
CALIBRATION_TOLERANCE = 1e-3
CALIBRATION_MARGIN = 1e-6
CALIBRATION_DEADLINE_S = 60.0
# The search's noise range: outside it the target is out of any reasonable range anyway.
MIN_NOISE_MULTIPLIER = 0.05
MAX_NOISE_MULTIPLIER = 1e4
# While looking for a bracket: at most 16x more, or 4x less, noise per step.
_MAX_STEP_UP = math.log(16.0)
_MAX_STEP_DOWN = math.log(4.0)


@dataclass
class _Probe:
    """One evaluated noise multiplier: ``log_sigma`` and log(epsilon / ceiling), where the
    ceiling is the target less the margin (``excess <= 0``: within the target)."""

    log_sigma: float
    excess: float


class _Calibration:
    """The search state: the planned run, the accountant, the deadline, and the bracket."""

    def __init__(
        self,
        target_epsilon: float,
        delta: float,
        plan: tuple[float, int, int],
        accountant: str,
        deadline_s: float,
    ) -> None:
        self.target = target_epsilon
        self.ceiling = target_epsilon * (1 - CALIBRATION_MARGIN)
        self.delta = delta
        self.sample_rate, self.steps, self.rounds = plan
        self.accountant = accountant
        self.deadline_s = deadline_s
        self.started = time.monotonic()
        self.evaluations = 0

    def epsilon(self, sigma: float) -> float:
        """The planned run's epsilon at noise ``sigma``, as the budget check computes it."""
        if time.monotonic() - self.started >= self.deadline_s:
            raise self.refusal(
                f"calibration did not finish within {self.deadline_s:g} s "
                f"({self.evaluations} accountant evaluations)"
            )
        self.evaluations += 1
        records = [DPSteps(sigma, self.sample_rate, self.steps)] * self.rounds
        return cumulative_epsilon(records, self.delta, self.accountant)

    def probe(self, log_sigma: float) -> _Probe:
        eps = self.epsilon(math.exp(log_sigma))
        excess = math.log(eps / self.ceiling) if eps > 0 else -math.inf
        return _Probe(log_sigma, excess)

    def refusal(self, problem: str) -> ConfigError:
        return ConfigError(
            "privacy.target_epsilon",
            self.target,
            f"a target the {self.accountant} accountant can calibrate: {problem} for "
            f"{self.rounds} round(s) x {self.steps} steps at sample rate "
            f"{self.sample_rate:.4g}, delta={self.delta:g}",
        )


def _bracket(search: _Calibration) -> tuple[_Probe, _Probe]:
    """Two noise multipliers, one above the target (``high``), one within it (``low``).

    Steps in log sigma from sigma 1. Where more noise is needed, by the log excess:
    epsilon falls at least as fast as 1 / sigma, so one step usually crosses the target.
    Where less is needed, by half of it: epsilon grows about as 1 / sigma^2 or faster as
    the noise falls, and PRV's arithmetic overflows (infinity) at very small noise.
    """
    probe = search.probe(0.0)
    other = probe
    while (probe.excess > 0) == (other.excess > 0):
        step = probe.excess if probe.excess > 0 else probe.excess / 2
        step = max(-_MAX_STEP_DOWN, min(_MAX_STEP_UP, step))
        step = step if abs(step) >= 0.05 else math.copysign(0.05, step)
        log_sigma = probe.log_sigma + step
        if log_sigma > math.log(MAX_NOISE_MULTIPLIER):
            raise search.refusal(
                f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon above it"
            )
        if log_sigma < math.log(MIN_NOISE_MULTIPLIER):
            raise search.refusal(
                f"even noise multiplier {MIN_NOISE_MULTIPLIER:g} stays below it (no privacy "
                "worth the name)"
            )
        probe, other = search.probe(log_sigma), probe
    return (probe, other) if probe.excess > 0 else (other, probe)


# ``low`` is accepted from this excess up: its epsilon is at least target * (1 - tolerance).
_ACCEPT = math.log((1 - CALIBRATION_TOLERANCE) / (1 - CALIBRATION_MARGIN))
# The secant aims at the middle of the accepted band, so that it lands in it from either side.
_AIM = _ACCEPT / 2


def _done(high: _Probe, low: _Probe) -> bool:
    """``low`` is within the tolerance of the target, or the bracket cannot shrink further."""
    return low.excess >= _ACCEPT or low.log_sigma - high.log_sigma < 1e-9


def _refine(search: _Calibration, high: _Probe, low: _Probe) -> _Probe:
    """Secant steps on log epsilon over log sigma (nearly linear) through the two latest
    probes, kept inside the bracket (else regula falsi on the bracket, else bisection)."""
    last, previous = low, high
    while not _done(high, low):
        log_sigma = _secant(last, previous)
        if not high.log_sigma < log_sigma < low.log_sigma:
            log_sigma = _secant(high, low)
        if not high.log_sigma < log_sigma < low.log_sigma:
            log_sigma = (high.log_sigma + low.log_sigma) / 2
        probe = search.probe(log_sigma)
        if probe.excess > 0:
            high = probe
        else:
            low = probe
        last, previous = probe, last
    return low


def _secant(a: _Probe, b: _Probe) -> float:
    """Where the line through ``a`` and ``b`` reaches the aim (NaN if it cannot)."""
    if not (math.isfinite(a.excess) and math.isfinite(b.excess)) or a.excess == b.excess:
        return math.nan
    slope = (a.log_sigma - b.log_sigma) / (a.excess - b.excess)
    return a.log_sigma + (_AIM - a.excess) * slope


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    *,
    rounds: int = 1,
    deadline_s: float = CALIBRATION_DEADLINE_S,
) -> float:
    """The (nearly) smallest noise multiplier whose planned run, ``rounds`` rounds of
    ``steps`` steps, stays within ``target_epsilon`` under ``cumulative_epsilon``.

    Raises ConfigError naming ``privacy.target_epsilon`` when no noise multiplier in
    [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER] reaches the target, when the accountant
    is not one a budget check may use, or when ``deadline_s`` has passed.
    """
    if accountant not in BUDGET_ACCOUNTANTS:
        raise ConfigError(
            "privacy.accountant",
            accountant,
            f"one of {', '.join(BUDGET_ACCOUNTANTS)} (an upper bound on epsilon)",
        )
    import opacus.accountants  # noqa: F401  (seconds on first use: not the search's time)

    search = _Calibration(
        target_epsilon, delta, (sample_rate, steps, rounds), accountant, deadline_s
    )
    high, low = _bracket(search)
    return math.exp(_refine(search, high, low).log_sigma)
