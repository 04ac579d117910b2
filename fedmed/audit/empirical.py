"""``fedmed audit empirical``: a lower bound on epsilon from one training run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023): m
canaries are each included with probability 1/2 at one site; the federation trains as
configured; every canary is scored on the final global model (``fedmed.models.canary``); the
auditor guesses "included" for the highest scores and "excluded" for the lowest, and the
number of correct guesses is turned into the largest epsilon that an (epsilon, delta)-DP
mechanism could have produced so many correct guesses with probability at most
1 - confidence (their Theorem 3.1 with the delta term of their Proposition 5.3). If the
lower bound exceeds the epsilon the site claims, the mechanism as run is not what the ledger
says.

The guesses are made at a few pre-set guess counts and the confidence is split among them
(Bonferroni), so reporting the best of them keeps the stated confidence.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binom

from fedmed.config.schema import FedMedConfig
from fedmed.data.canaries import draw_canaries
from fedmed.data.sources import audited_site
from fedmed.errors import FedMedError
from fedmed.privacy.accounting import cumulative_epsilon
from fedmed.privacy.budget import dp_config
from fedmed.privacy.ledger import load_public_key, read_entries
from fedmed.privacy.mechanisms import TRAIN

log = logging.getLogger(__name__)

DEFAULT_CANARIES = 1000
GUESS_FRACTIONS = (0.05, 0.1, 0.25, 0.5)  # guesses made, as a share of the canaries


def p_value(epsilon: float, delta: float, canaries: int, guesses: int, correct: int) -> float:
    """Probability bound on ``correct`` or more right guesses under (epsilon, delta)-DP."""
    if correct <= 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(binom.sf(correct - 1, guesses, q))
    # P[correct - i <= Binomial < correct] / i, worst case over i = 1..correct
    below = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))
    worst_ratio = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, tail + 2 * canaries * delta * worst_ratio)


def epsilon_lower_bound(
    delta: float, canaries: int, guesses: int, correct: int, significance: float
) -> float:
    """The largest epsilon rejected at ``significance`` (0 when none is)."""
    if p_value(0.0, delta, canaries, guesses, correct) > significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(high, delta, canaries, guesses, correct) <= significance and high < 100:
        low, high = high, high * 2
    for _ in range(50):
        mid = (low + high) / 2
        if p_value(mid, delta, canaries, guesses, correct) <= significance:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class GuessRound:
    """One guess count: how many guesses, how many right, and the bound they give."""

    guesses: int
    correct: int
    epsilon_lower_bound: float


def canary_scores(canary_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How much each canary's row favours its own label over the others (row 0 is not one)."""
    rows = canary_logits[1:]
    own = rows[np.arange(len(labels)), labels]
    others = (rows.sum(axis=1) - own) / (rows.shape[1] - 1)
    return np.asarray(own - others)


def guess_and_bound(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> list[GuessRound]:
    """Guess "in" for the top half of each guess count and "out" for the bottom half."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    significance = (1.0 - confidence) / len(GUESS_FRACTIONS)
    results = []
    for fraction in GUESS_FRACTIONS:
        half = max(1, int(m * fraction) // 2)
        correct = int(included[order[:half]].sum() + (~included[order[-half:]]).sum())
        bound = epsilon_lower_bound(delta, m, 2 * half, correct, significance)
        results.append(GuessRound(2 * half, correct, bound))
    return results


def formal_epsilon_of_run(ledger: Path, delta: float) -> float:
    """The audited site's training epsilon for this run's entries (the canaries' only run;
    canaries are training records) at ``delta``, from the mechanism parameters in its
    verified ledger, with its accountant."""
    entries = read_entries(ledger, load_public_key(ledger.with_suffix(".pub")))
    last = entries[-1]
    spent = [e.dp_steps for e in entries if e.run_id == last.run_id and e.split_name == TRAIN]
    return cumulative_epsilon(spent, delta, last.accountant_name)


def _canary_logits(output_dir: Path) -> np.ndarray:
    import torch

    from fedmed.coordinator.app import GLOBAL_MODEL_FILE

    state = torch.load(output_dir / GLOBAL_MODEL_FILE, map_location="cpu", weights_only=True)
    return np.asarray(state["canary_logits.weight"].numpy(), dtype=np.float64)


def run_empirical_audit(cfg: FedMedConfig, output_dir: Path) -> int:
    """Train with canaries, score them, print the bound beside the formal epsilon.

    Exit code 1 when the empirical lower bound exceeds the claimed epsilon (DP is broken).
    """
    from fedmed.runs.simulation import simulate

    if dp_config(cfg) is None:
        raise FedMedError("audit empirical measures DP-SGD: set privacy=dp")
    if cfg.audit.canaries == 0:
        cfg = dataclasses.replace(
            cfg, audit=dataclasses.replace(cfg.audit, canaries=DEFAULT_CANARIES)
        )
    site = audited_site(cfg)
    summary = simulate(cfg, output_dir)
    privacy = summary["sites"][site].get("privacy") or {}
    if summary["rounds_completed"] == 0 or "epsilon" not in privacy:
        raise FedMedError(f"the audited site {site} never trained; nothing to audit")
    audit_delta = cfg.audit.delta
    claimed = formal_epsilon_of_run(Path(privacy["ledger"]), audit_delta)
    logits = _canary_logits(output_dir)
    draw = draw_canaries(cfg.audit, logits.shape[1])
    scores = canary_scores(logits, draw.labels)
    results = guess_and_bound(scores, draw.included, audit_delta, cfg.audit.confidence)
    best = max(results, key=lambda r: r.epsilon_lower_bound)
    violated = best.epsilon_lower_bound > claimed
    report = {
        "site": site,
        "canaries": cfg.audit.canaries,
        "included": int(draw.included.sum()),
        "confidence": cfg.audit.confidence,
        "delta": audit_delta,
        "noise_disabled": cfg.audit.disable_noise,
        "formal_epsilon": claimed,
        "site_epsilon_at_site_delta": {"epsilon": privacy["epsilon"], "delta": privacy["delta"]},
        "epsilon_lower_bound": best.epsilon_lower_bound,
        "guesses": [dataclasses.asdict(r) for r in results],
        "verdict": "VIOLATION" if violated else "consistent",
        "rounds_completed": summary["rounds_completed"],
        "global_accuracy": summary["global"].get("accuracy"),
    }
    (output_dir / "empirical_audit.json").write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        log.info(
            f"  {r.guesses:>5} guesses: {r.correct:>5} right -> epsilon >= "
            f"{r.epsilon_lower_bound:.3f}",
        )
    log.info(
        f"empirical audit at {site}: {cfg.audit.canaries} canaries "
        f"({report['included']} included); epsilon lower bound {best.epsilon_lower_bound:.3f} "
        f"at {cfg.audit.confidence:.0%} confidence vs formal epsilon {claimed:.3f} at delta "
        f"{audit_delta:g} (the ledger's {privacy['epsilon']:.3f} at delta {privacy['delta']:g}): "
        + (
            "VIOLATION: the mechanism as run leaks more than its ledger claims"
            if violated
            else "consistent with the claim"
        ),
    )
    return 1 if violated else 0
