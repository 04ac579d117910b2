"""A site's lifetime privacy budget, enforced by the site itself against its own ledger.

The budget bounds epsilon for one record of the site. Its training and evaluation records
are disjoint splits, each composing its own mechanisms (``fedmed.privacy.mechanisms``), so
every release is checked against its split's lifetime epsilon, and the record guarantee is
the worse of the two. The site's policy (budget, delta, accountant, ledger and key files,
floors and caps) comes from its kit alone (``site_policy``); a simulated site without a kit
gets one generated from the run (``fedmed.site.policy``). Before each release the site
projects the epsilon its split would reach after it, counting every entry of that split
already in its ledger (earlier rounds and earlier runs), and declines when the projection
exceeds its budget (or this run's spend would exceed the kit's cap for one run). Nothing
the coordinator sends can change that decision.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fedmed.config.schema import DpConfig, FedMedConfig
from fedmed.errors import REFUSES, SiteError
from fedmed.kits.site import SiteKit
from fedmed.privacy.accounting import DPSteps, accountant_record, cumulative_epsilon
from fedmed.privacy.ledger import (
    LedgerEntry,
    LedgerError,
    append_marked,
    ensure_writable,
    load_or_create_signing_key,
    mark_path,
    open_ledger,
    parse_entries,
)
from fedmed.privacy.mechanisms import DP_SGD, SPLITS, TRAIN, record_epsilon

LEDGER_SUFFIX = ".ledger.jsonl"


@dataclass(frozen=True)
class SitePolicy:
    """What one site enforces: its lifetime (epsilon, delta) budget and where it keeps records.

    ``min_noise_multiplier`` and ``max_run_epsilon`` (None: no floor, no cap) bound what one
    run may ask of the site.
    """

    site: str
    budget_epsilon: float
    delta: float
    accountant: str
    ledger: Path
    signing_key: Path
    require_privacy: bool = True
    min_noise_multiplier: float | None = None
    max_run_epsilon: float | None = None

    @property
    def public_key(self) -> Path:
        """The public key sits beside the ledger, for auditors."""
        return self.ledger.with_suffix(".pub")


def dp_config(cfg: FedMedConfig) -> DpConfig | None:
    """The run's DP settings, or None for ``privacy=none``."""
    return cfg.privacy if isinstance(cfg.privacy, DpConfig) else None


def site_policy(kit: SiteKit) -> SitePolicy:
    """The privacy policy a site enforces, from its kit alone (never from the run's config).

    A simulated site's kit already points its ledger into the run (``fedmed.site.policy``).
    """
    p = kit.privacy
    if p.budget_epsilon is None:
        raise SiteError(
            kit.name,
            f"{REFUSES}: its kit states no lifetime budget; set privacy.budget_epsilon "
            "in the site's kit",
        )
    if p.ledger is None:
        raise SiteError(
            kit.name,
            f"{REFUSES}: its kit names no privacy ledger; set privacy.ledger in the "
            "site's kit",
        )
    ledger = Path(p.ledger)
    key = Path(p.signing_key) if p.signing_key else ledger.with_suffix(".key")
    return SitePolicy(
        kit.name,
        float(p.budget_epsilon),
        float(p.delta),
        p.accountant.value,
        ledger,
        key,
        p.require_privacy,
        p.min_noise_multiplier,
        p.max_run_epsilon,
    )


def check_delta(site: str, delta: float, dataset_size: int, records: str = "training") -> None:
    """Refuse a delta above 1/n: it would allow publishing one whole record outright."""
    if dataset_size < 1 or delta > 1.0 / dataset_size:
        raise SiteError(
            site,
            f"delta={delta:g} is larger than 1/{dataset_size} (1 / this site's {records} "
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


def decide(
    spent: Sequence[DPSteps],
    planned: DPSteps,
    policy: SitePolicy,
    run_spent: Sequence[DPSteps] = (),
    split: str = TRAIN,
) -> RoundDecision:
    """Release only if the epsilon of ``split`` after ``planned`` (``spent``: that split's
    entries) stays within the site's lifetime budget, and, when the kit caps one run, this
    run's own epsilon of the split (``run_spent``, a subset of ``spent``) within
    ``max_run_epsilon``. The other split is not touched by the release: its epsilon, already
    within the budget, stays as it is."""
    after = cumulative_epsilon([*spent, planned], policy.delta, policy.accountant)
    what = "this round" if split == TRAIN else f"this {split}"
    if after > policy.budget_epsilon:
        now = cumulative_epsilon(spent, policy.delta, policy.accountant)
        return RoundDecision(
            False,
            now,
            f"privacy budget: {what} would take the {split} records' epsilon from {now:.4f} "
            f"to {after:.4f}, above the site's lifetime budget {policy.budget_epsilon:g} "
            f"(delta={policy.delta:g})",
        )
    cap = policy.max_run_epsilon
    if cap is not None:
        run_after = cumulative_epsilon([*run_spent, planned], policy.delta, policy.accountant)
        if run_after > cap:
            run_now = cumulative_epsilon(run_spent, policy.delta, policy.accountant)
            return RoundDecision(
                False,
                cumulative_epsilon(spent, policy.delta, policy.accountant),
                f"run cap: {what} would take this run's {split} epsilon from {run_now:.4f} to "
                f"{run_after:.4f}, above what the site's kit lets one run spend "
                f"(privacy.max_run_epsilon: {cap:g}, delta={policy.delta:g})",
            )
    return RoundDecision(True, after)


class PrivacyAccount:
    """One site's verified ledger, signing key and budget; the only way to spend privacy.

    Opening it refuses, before any training, a ledger that is missing, shorter than the
    site's signed high-water mark (``<signing key>.mark``) or has another head
    (``fedmed.privacy.ledger.open_ledger``); every entry then moves the mark.
    """

    def __init__(self, policy: SitePolicy) -> None:
        self.policy = policy
        ensure_writable(policy.ledger)
        self._key = load_or_create_signing_key(policy.signing_key, policy.public_key)
        self._check_public_key()
        self.mark = mark_path(policy.signing_key)
        ensure_writable(self.mark)
        lines = open_ledger(policy.ledger, self.mark, self._key, policy.site)
        self.entries = parse_entries(policy.ledger, lines)

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

    def spent(self, split: str = TRAIN) -> list[DPSteps]:
        """Every mechanism run recorded so far on ``split``'s records, in ledger order."""
        return [e.dp_steps for e in self.entries if e.split_name == split]

    def epsilon(self, planned: DPSteps | None = None, split: str = TRAIN) -> float:
        """Lifetime epsilon of ``split`` at the site's delta, after ``planned`` if given."""
        records = self.spent(split) + ([planned] if planned is not None else [])
        return cumulative_epsilon(records, self.policy.delta, self.policy.accountant)

    def split_epsilons(self) -> dict[str, float]:
        """Each split's lifetime epsilon (splits with no release yet left out)."""
        return {split: self.epsilon(split=split) for split in SPLITS if self.spent(split)}

    def decide(
        self, planned: DPSteps, run_id: str | None = None, split: str = TRAIN
    ) -> RoundDecision:
        """Release only if ``split``'s epsilon after it stays within the lifetime budget (and
        run ``run_id``'s own epsilon of the split within the kit's cap for one run)."""
        run_spent = [
            e.dp_steps
            for e in self.entries
            if run_id is not None and e.run_id == run_id and e.split_name == split
        ]
        return decide(self.spent(split), planned, self.policy, run_spent, split)

    def record(
        self,
        planned: DPSteps,
        epsilon: float,
        *,
        run_id: str,
        server_round: int,
        dataset_size: int,
        sensitivity: float,
        config_hash: str,
        code_version: str,
        split: str = TRAIN,
        mechanism: str = DP_SGD,
        released: str | None = None,
    ) -> LedgerEntry:
        """Durably append this release's entry; call it before the release leaves the site.

        ``epsilon`` is the split's lifetime epsilon after it (the decision's);
        ``sensitivity`` the L2 bound on one record's contribution (DP-SGD: max_grad_norm).
        """
        entry = LedgerEntry(
            site=self.policy.site,
            run_id=run_id,
            round=server_round,
            timestamp=datetime.datetime.now(datetime.UTC).isoformat(),
            mechanism=mechanism,
            dataset_size=dataset_size,
            sample_rate=planned.sample_rate,
            noise_multiplier=planned.noise_multiplier,
            max_grad_norm=sensitivity if mechanism == DP_SGD else None,
            steps=planned.steps,
            delta=self.policy.delta,
            accountant=accountant_record(self.policy.accountant),
            epsilon=epsilon,
            budget_epsilon=self.policy.budget_epsilon,
            config_hash=config_hash,
            code_version=code_version,
            split=split,
            sensitivity=sensitivity,
            record_epsilon=record_epsilon({**self.split_epsilons(), split: epsilon}),
            released=released,
        )
        chain = [e.as_dict() for e in self.entries]
        line = append_marked(self.policy.ledger, self.mark, entry.as_dict(), self._key, chain)
        signed = LedgerEntry.from_dict(line)
        self.entries.append(signed)
        return signed

    def noise_multiplier_of_run(
        self, run_id: str, config_hash: str, split: str = TRAIN
    ) -> float | None:
        """The noise this site already calibrated for this run's ``split``, read back from
        its ledger."""
        for entry in reversed(self.entries):
            if (
                entry.run_id == run_id
                and entry.config_hash == config_hash
                and entry.split_name == split
            ):
                return float(entry.noise_multiplier)
        return None
