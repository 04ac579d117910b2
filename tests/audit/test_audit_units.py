"""The auditor's arithmetic and canaries, on small inputs: the one-run bound, the canary head,
and the window an honest recorded epsilon lies in (real Opacus writer, real dp-accounting)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch

from fedmed.audit.empirical import canary_scores, epsilon_lower_bound, guess_and_bound
from fedmed.audit.independent import cumulative_epsilons
from fedmed.audit.verify import Window, allowed_window
from fedmed.data.canaries import canary_inputs
from fedmed.models.canary import CanaryHead
from fedmed.privacy.accounting import DPSteps, accountant_record, cumulative_epsilon
from fedmed.privacy.ledger import LedgerEntry
from fedmed.privacy.mechanisms import DP_SGD

SIGNIFICANCE = 0.05


def test_chance_guessing_bounds_nothing_and_more_right_guesses_bound_more() -> None:
    assert epsilon_lower_bound(1e-5, 1000, 500, 250, SIGNIFICANCE) == 0.0
    bounds = [epsilon_lower_bound(1e-5, 1000, 500, c, SIGNIFICANCE) for c in (300, 400, 480, 500)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    # 500 of 500 right: eps-DP randomized response would need accuracy e^eps/(1+e^eps) with
    # q^500 > 0.05, so the bound sits near ln(q / (1 - q)) for q = 0.05 ** (1 / 500).
    q = 0.05 ** (1 / 500)
    assert abs(bounds[-1] - np.log(q / (1 - q))) < 0.05


def test_the_delta_term_weakens_the_bound_as_canaries_times_delta_grows() -> None:
    small = epsilon_lower_bound(1e-6, 1000, 500, 490, SIGNIFICANCE)
    large = epsilon_lower_bound(1e-3, 1000, 500, 490, SIGNIFICANCE)
    assert large < small


def test_the_bound_is_sound_for_a_mechanism_that_is_exactly_one_dp() -> None:
    """Randomized response with epsilon = 1 on each inclusion bit: the 95% lower bound may
    exceed 1 in at most about 5% of audits."""
    rng = np.random.default_rng(0)
    m, epsilon = 400, 1.0
    accuracy = np.exp(epsilon) / (1 + np.exp(epsilon))
    exceed = 0
    for _ in range(100):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < accuracy
        scores = np.where(included == truthful, 1.0, -1.0) + 1e-3 * rng.standard_normal(m)
        rounds = guess_and_bound(scores, included, delta=1e-5, confidence=0.95)
        exceed += max(r.epsilon_lower_bound for r in rounds) > epsilon
    assert exceed <= 0.1 * 100


def test_a_canarys_gradient_lies_only_on_its_own_row() -> None:
    base = torch.nn.Linear(4, 2)
    head = CanaryHead(base, canaries=5, num_classes=2)
    x = torch.from_numpy(canary_inputs((4,), np.array([3])))
    torch.nn.functional.cross_entropy(head(x), torch.tensor([1])).backward()
    assert all(p.grad is None or not p.grad.any() for p in base.parameters())
    rows_touched = head.canary_logits.weight.grad.abs().sum(dim=1).nonzero().flatten().tolist()
    assert rows_touched == [4]  # canary 3 owns row 4; row 0 belongs to the real records


def test_real_records_never_touch_a_canary_row_and_see_the_plain_model() -> None:
    base = torch.nn.Linear(4, 2)
    head = CanaryHead(base, canaries=5, num_classes=2)
    x = torch.randn(8, 4)
    assert torch.allclose(head(x), base(x))  # canary rows start at zero
    torch.nn.functional.cross_entropy(head(x), torch.randint(0, 2, (8,))).backward()
    assert not head.canary_logits.weight.grad[1:].any()


def test_scores_favour_a_canarys_own_label() -> None:
    logits = np.array([[0.0, 0.0], [2.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])
    assert canary_scores(logits, np.array([0, 1, 1])).tolist() == [3.0, 0.0, 2.0]


# ------------------------------------------------- recorded epsilon against its own fields
def _entry(steps: tuple[DPSteps, ...], accountant: str) -> list[LedgerEntry]:
    """Ledger entries as a site writes them: each epsilon from the site's own accountant."""
    return list(_written(steps, accountant))


@functools.cache
def _written(steps: tuple[DPSteps, ...], accountant: str) -> tuple[LedgerEntry, ...]:
    return tuple(
        LedgerEntry(
            site="cleveland",
            run_id="units",
            round=n,
            mechanism=DP_SGD,
            dataset_size=227,
            noise_multiplier=steps[n - 1].noise_multiplier,
            sample_rate=steps[n - 1].sample_rate,
            steps=steps[n - 1].steps,
            delta=1e-3,
            epsilon=cumulative_epsilon(steps[:n], 1e-3, accountant),
            budget_epsilon=10.0,
            accountant=accountant_record(accountant),
        )
        for n in range(1, len(steps) + 1)
    )


def _with(entry: LedgerEntry, **changes: Any) -> LedgerEntry:
    return dataclasses.replace(entry, **changes)


def _outside(entries: list[LedgerEntry]) -> list[str]:
    """The side ("above"/"below") of each entry outside its window ("" when inside)."""
    sides = []
    for entry, eps in zip(entries, cumulative_epsilons(entries), strict=True):
        window = allowed_window(entry, eps.pld, eps.rdp)
        assert isinstance(window, Window), window
        recorded = entry.epsilon
        sides.append(
            "below" if recorded < window.low else "above" if recorded > window.high else ""
        )
    return sides


HEART = (DPSteps(1.99, 16 / 227, 15),) * 3  # Cleveland's real per-round plan at epsilon 1
PNEUMONIA = (DPSteps(0.97, 64 / 2428, 38),) * 2


def test_honest_prv_and_rdp_entries_lie_inside_their_windows() -> None:
    for steps in (HEART, PNEUMONIA):
        assert _outside(_entry(steps, "prv")) == [""] * len(steps)
        assert _outside(_entry(steps, "rdp")) == [""] * len(steps)


def test_a_recorded_epsilon_its_fields_do_not_explain_fails_in_both_directions() -> None:
    """The re-signed `steps` edit: steps set to 1 keeps the epsilon, now 2.5x its fields'."""
    entries = _entry(HEART, "prv")
    lowered = [_with(e, steps=1) for e in entries]
    assert _outside(lowered) == ["above"] * 3
    raised = [_with(e, steps=e.steps * 2) for e in entries]
    assert _outside(raised) == ["below"] * 3
    # just beyond PRV's stated error, either way
    first, eps = entries[0], cumulative_epsilons(entries[:1])[0]
    error = 0.0025 * eps.rdp
    assert _outside([_with(first, epsilon=eps.pld + 2.2 * error)]) == ["above"]
    assert _outside([_with(first, epsilon=eps.pld - 1.2 * error)]) == ["below"]
    # an RDP entry checked against PLD would always look 20% high; against RDP it is exact
    rdp = _entry(HEART, "rdp")
    assert _outside([_with(rdp[0], epsilon=rdp[0].epsilon * 1.02)]) == ["above"]
    assert _outside([_with(rdp[0], epsilon=rdp[0].epsilon * 0.98)]) == ["below"]


def _opacus_prv(steps: tuple[DPSteps, ...], eps_error: float) -> list[float]:
    """What fedmed recorded before its relative eps_error: Opacus PRV at an absolute one."""
    from opacus.accountants import PRVAccountant

    out = []
    for n in range(1, len(steps) + 1):
        acc = PRVAccountant()
        acc.history = [(steps[0].noise_multiplier, steps[0].sample_rate, steps[0].steps * n)]
        out.append(float(acc.get_epsilon(delta=1e-3, eps_error=eps_error)))
    return out


def test_entries_from_before_the_accountant_record_use_opacus_default_error() -> None:
    """Old ledgers verify unchanged: no ``accountant`` field means Opacus PRV at its default
    absolute eps_error 0.01; an absolute eps_error string (fedmed before 2026-11) reads as is.
    Each epsilon here is what Opacus gave at that error."""
    entries = _entry(HEART, "prv")
    default = [
        _with(e, accountant=None, epsilon=eps)
        for e, eps in zip(entries, _opacus_prv(HEART, 0.01), strict=True)
    ]
    assert _outside(default) == [""] * 3
    absolute = [
        _with(e, accountant={**(e.accountant or {}), "eps_error": "0.001"}, epsilon=eps)
        for e, eps in zip(entries, _opacus_prv(HEART, 0.001), strict=True)
    ]
    assert _outside(absolute) == [""] * 3
    assert _outside([_with(absolute[2], epsilon=absolute[2].epsilon + 0.003)]) == ["above"]
    huge = _with(entries[0], accountant={**(entries[0].accountant or {}), "eps_error": "5"})
    eps = cumulative_epsilons([huge])[0]
    assert "larger than any fedmed writes" in str(allowed_window(huge, eps.pld, eps.rdp))
