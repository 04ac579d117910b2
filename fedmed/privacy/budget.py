"""A site's lifetime privacy budget, enforced by the site itself against its own ledger.

The site's policy (budget, delta, ledger and key files) comes from its kit, falling back to
the run's ``privacy`` config. Before each round the site projects the epsilon it would reach
after that round's steps, counting every entry already in its ledger (earlier rounds and
earlier runs), and declines when the projection exceeds its budget. Nothing the coordinator
sends can change that decision.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from fedmed.config import DpConfig, FedMedConfig
from fedmed.data import site_kit, site_names
from fedmed.errors import ConfigError, SiteError
from fedmed.privacy.accounting import DPSteps, accountant_record, cumulative_epsilon
from fedmed.privacy.ledger import (
    GENESIS_HASH,
    LedgerError,
    append_entry,
    ensure_writable,
    load_or_create_signing_key,
    read_verified,
)

MECHANISM = "dp_sgd_poisson_gaussian"
LEDGER_SUFFIX = ".ledger.jsonl"


@dataclass(frozen=True)
class SitePolicy:
    """What one site enforces: its lifetime (epsilon, delta) budget and where it keeps records."""

    site: str
    budget_epsilon: float
    delta: float
    accountant: str
    ledger: Path
    signing_key: Path

    @property
    def public_key(self) -> Path:
        """The public key sits beside the ledger, for auditors."""
        return self.ledger.with_suffix(".pub")


def dp_config(cfg: FedMedConfig) -> DpConfig | None:
    """The run's DP settings, or None for ``privacy=none``."""
    return cfg.privacy if isinstance(cfg.privacy, DpConfig) else None


def site_policy(
    cfg: FedMedConfig, index: int, run_ledger_dir: Path, use_kit_ledger: bool
) -> SitePolicy:
    """The policy of site ``index``: its kit's values first, then the run's ``privacy`` config.

    Ledger location: ``privacy.ledger_dir`` when set (budgets persist across runs), else the
    kit's ledger when ``use_kit_ledger`` (deployment), else ``run_ledger_dir`` (simulation).
    """
    dp = dp_config(cfg)
    assert dp is not None, "site_policy is only used with privacy=dp"
    name = site_names(cfg)[index]
    kit = site_kit(cfg, index)
    kit_privacy = kit.privacy if kit is not None else None
    budget = (
        (kit_privacy.budget_epsilon if kit_privacy else None)
        or dp.budget_epsilon
        or dp.target_epsilon
    )
    if budget is None:
        raise ConfigError(
            "privacy.budget_epsilon",
            None,
            f"a number > 0: site '{name}' has no lifetime budget in its kit, and "
            "privacy.noise_multiplier is explicit (no target_epsilon to fall back on)",
        )
    delta = (kit_privacy.delta if kit_privacy else None) or dp.delta
    if dp.ledger_dir is not None:
        ledger = Path(dp.ledger_dir).expanduser().resolve() / f"{name}{LEDGER_SUFFIX}"
    elif use_kit_ledger and kit_privacy and kit_privacy.ledger:
        ledger = Path(kit_privacy.ledger)
    else:
        ledger = run_ledger_dir / f"{name}{LEDGER_SUFFIX}"
    key = (
        Path(kit_privacy.signing_key)
        if use_kit_ledger and kit_privacy and kit_privacy.signing_key
        else ledger.with_suffix(".key")
    )
    return SitePolicy(name, float(budget), float(delta), dp.accountant.value, ledger, key)


def check_delta(site: str, delta: float, dataset_size: int) -> None:
    """Refuse a delta above 1/n: it would allow publishing one whole record outright."""
    if dataset_size < 1 or delta > 1.0 / dataset_size:
        raise SiteError(
            site,
            f"delta={delta:g} is larger than 1/{dataset_size} (1 / this site's training "
            f"records); set privacy.delta (or the kit's privacy.delta) to at most "
            f"{1.0 / max(dataset_size, 1):.3g}",
        )


@dataclass(frozen=True)
class RoundDecision:
    """Whether the site trains this round, and its lifetime epsilon after the decision.

    ``epsilon`` is the epsilon after this round when the site trains, and the unchanged
    current epsilon when it declines (``reason`` then says why).
    """

    train: bool
    epsilon: float
    reason: str = ""


def decide(spent: Sequence[DPSteps], planned: DPSteps, policy: SitePolicy) -> RoundDecision:
    """Train only if the epsilon after ``planned`` stays within the site's lifetime budget."""
    after = cumulative_epsilon([*spent, planned], policy.delta, policy.accountant)
    if after <= policy.budget_epsilon:
        return RoundDecision(True, after)
    now = cumulative_epsilon(spent, policy.delta, policy.accountant)
    return RoundDecision(
        False,
        now,
        f"privacy budget: this round would take epsilon from {now:.4f} to {after:.4f}, "
        f"above the site's lifetime budget {policy.budget_epsilon:g} (delta={policy.delta:g})",
    )


class PrivacyAccount:
    """One site's verified ledger, signing key and budget; the only way to spend privacy."""

    def __init__(self, policy: SitePolicy) -> None:
        self.policy = policy
        ensure_writable(policy.ledger)
        self._key = load_or_create_signing_key(policy.signing_key, policy.public_key)
        self._check_public_key()
        self.entries = read_verified(policy.ledger, self._key.public_key())

    def _check_public_key(self) -> None:
        published = serialization.load_pem_public_key(self.policy.public_key.read_bytes())
        if published.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ) != self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ):
            raise LedgerError(
                self.policy.public_key, None, "does not match this site's signing key"
            )

    def spent(self) -> list[DPSteps]:
        """Every mechanism run recorded so far, in ledger order."""
        return [
            DPSteps(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            for e in self.entries
        ]

    def epsilon(self, planned: DPSteps | None = None) -> float:
        """Lifetime epsilon at the site's delta, after ``planned`` steps if given."""
        records = self.spent() + ([planned] if planned is not None else [])
        return cumulative_epsilon(records, self.policy.delta, self.policy.accountant)

    def decide(self, planned: DPSteps) -> RoundDecision:
        """Train only if the epsilon after this round stays within the lifetime budget."""
        return decide(self.spent(), planned, self.policy)

    def record(
        self,
        planned: DPSteps,
        epsilon: float,
        *,
        run_id: str,
        server_round: int,
        dataset_size: int,
        max_grad_norm: float,
        config_hash: str,
        code_version: str,
    ) -> dict[str, Any]:
        """Durably append this round's entry; call it before the update leaves the site."""
        fields = {
            "site": self.policy.site,
            "run_id": run_id,
            "round": server_round,
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
            "mechanism": MECHANISM,
            "dataset_size": dataset_size,
            "sample_rate": planned.sample_rate,
            "noise_multiplier": planned.noise_multiplier,
            "max_grad_norm": max_grad_norm,
            "steps": planned.steps,
            "delta": self.policy.delta,
            "accountant": accountant_record(self.policy.accountant),
            "epsilon": epsilon,
            "budget_epsilon": self.policy.budget_epsilon,
            "config_hash": config_hash,
            "code_version": code_version,
        }
        prev = self.entries[-1]["hash"] if self.entries else GENESIS_HASH
        entry = append_entry(self.policy.ledger, fields, self._key, prev)
        self.entries.append(entry)
        return entry

    def noise_multiplier_of_run(self, run_id: str, config_hash: str) -> float | None:
        """The noise this site already calibrated for this run, read back from its ledger."""
        for entry in reversed(self.entries):
            if entry.get("run_id") == run_id and entry.get("config_hash") == config_hash:
                return float(entry["noise_multiplier"])
        return None
