"""Epsilon recomputed from ledger entries with Google's dp-accounting, not with Opacus.

The sites account with Opacus (PRV by default). An auditor should not have to trust that
code path, so every entry is recomputed here with a second, independent implementation:
dp-accounting's privacy-loss-distribution (PLD) accountant, which is tight and is the value
PRV-accounted epsilons are checked against, and its RDP accountant, a looser classic upper
bound reported beside it and the value RDP-accounted epsilons are checked against. The RDP
accountant evaluates the same orders as Opacus' (``OPACUS_RDP_ORDERS``, a published list of
numbers, not Opacus code), so both minimise over the same orders. Each entry's DP-SGD run is
one Poisson-subsampled Gaussian mechanism composed ``steps`` times; an evaluation release is
one Gaussian mechanism. The entries of a ledger compose in order within their split (training
or evaluation records: disjoint sets, each with its own composition).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version

import dp_accounting
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedmed.privacy.ledger import LedgerEntry
from fedmed.privacy.mechanisms import EVALUATION_COUNTS

LIBRARY = "dp-accounting"
# Opacus 1.6 RDPAccountant.DEFAULT_ALPHAS: 1.1 to 10.9 in steps of 0.1, then 12 to 63.
OPACUS_RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


@dataclass(frozen=True)
class IndependentEpsilon:
    """The cumulative epsilon after one ledger entry, by each independent accountant."""

    pld: float
    rdp: float


def independent_accountants() -> dict[str, str]:
    """Names and version of the accountants used, for reports."""
    return {
        "library": LIBRARY,
        "version": version(LIBRARY),
        "reference": "pld",
        "also": "rdp",
        "rdp_orders": "Opacus' default orders (1.1-10.9 by 0.1, 12-63)",
    }


class _DropRdpConvergenceNoise(logging.Filter):
    """dp-accounting logs a warning for each fractional RDP order it cannot evaluate and then
    excludes that order (a valid, slightly looser bound); the lines say nothing to an auditor."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextmanager
def _quiet_rdp() -> Iterator[None]:
    noise = _DropRdpConvergenceNoise()
    absl = logging.getLogger("absl")  # dp-accounting logs through absl
    absl.addFilter(noise)
    try:
        yield
    finally:
        absl.removeFilter(noise)


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """``steps`` DP-SGD steps: a Poisson-subsampled Gaussian mechanism, self-composed."""
    step = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def entry_event(entry: LedgerEntry) -> dp_accounting.DpEvent | None:
    """The mechanism an entry records, as a dp-accounting event (None: no step was taken)."""
    run = entry.dp_steps
    if run.steps <= 0:
        return None
    if entry.mechanism == EVALUATION_COUNTS:  # one Gaussian release of the whole split
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(run.noise_multiplier), run.steps
        )
    return dp_sgd_event(run.noise_multiplier, run.sample_rate, run.steps)


def cumulative_epsilons(entries: Sequence[LedgerEntry]) -> list[IndependentEpsilon]:
    """Epsilon of each entry's split after it (composing it with every entry of the same
    split before it), at its own delta."""
    accountants: dict[str, tuple[PLDAccountant, RdpAccountant]] = {}
    out = []
    with _quiet_rdp():
        for entry in entries:
            pld, rdp = accountants.setdefault(
                entry.split_name, (PLDAccountant(), RdpAccountant(orders=list(OPACUS_RDP_ORDERS)))
            )
            event = entry_event(entry)
            if event is not None:
                pld.compose(event)
                rdp.compose(event)
            delta = float(entry.delta)
            out.append(IndependentEpsilon(pld.get_epsilon(delta), rdp.get_epsilon(delta)))
    return out
