"""Epsilon from recorded DP-SGD steps, always computed by Opacus' own accountants.

A site's privacy spend is a list of (noise multiplier, sample rate, steps) records; the
cumulative epsilon of any prefix is recomputed from the records, never carried forward from a
log. Calibration is done once per run with Opacus' ``get_noise_multiplier``.

Opacus is imported inside the functions: it takes seconds to import (torch.distributed, scipy),
and the coordinator and the sites' light message handlers use this module without computing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np

from fedmed.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp", "gdp")
# PRV reports its estimate plus an error bound ``eps_error`` (an upper bound on epsilon), which
# Opacus takes as absolute (default 0.01: 2% at epsilon 0.5). We ask for this fraction of the
# epsilon itself (of its RDP upper bound, which is cheap), so the recorded epsilon stays within
# 0.3% of an independent PLD recomputation at every size. An absolute bound would have to be
# the finest one ever needed, and PRV's mesh grows as sqrt(steps) / eps_error: the working
# memory of a site's budget check grew 5x over a 50-round run (benchmarks/memory.py).
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
    (PRV bounds its domain with RDP, which warns when its best order is the largest one)."""
    import scipy.fft

    with warnings.catch_warnings(), scipy.fft.set_backend(_NumpyFFT):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


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


def _opacus_epsilon(
    history: list[tuple[float, float, int]], delta: float, accountant: str
) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = history
    with _accountant_context():
        if accountant != "prv":
            return float(acc.get_epsilon(delta=delta))
        eps_error = PRV_RELATIVE_EPS_ERROR * _opacus_epsilon(history, delta, "rdp")
        return float(acc.get_epsilon(delta=delta, eps_error=eps_error))


def cumulative_epsilon(records: Sequence[DPSteps], delta: float, accountant: str) -> float:
    """Epsilon after composing all ``records`` at ``delta``; 0 for no records."""
    _check_accountant(accountant)
    history = _merged(records)
    return _opacus_epsilon(history, delta, accountant) if history else 0.0


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest noise multiplier reaching ``target_epsilon`` after ``steps`` steps."""
    _check_accountant(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    with _accountant_context():
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    return float(sigma)
