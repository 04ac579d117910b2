"""The auditor's arithmetic and canaries, on small inputs: the one-run bound and the canary head."""

from __future__ import annotations

import numpy as np
import torch

from fedmed.audit.canaries import canary_inputs
from fedmed.audit.empirical import canary_scores, epsilon_lower_bound, guess_and_bound
from fedmed.models.canary import CanaryHead

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
