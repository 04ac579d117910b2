"""Every name that crosses the wire between a site and the coordinator, in one place.

Both sides import these, so no key is typed twice: the site builds its replies with them and
the coordinator reads the replies with them. ``RELEASES`` is the inventory of every value a
site sends, each declared a model update, a private statistic (a DP mechanism recorded in
the site's ledger before it leaves), public metadata, a protocol field, or an exact
statistic that only ``privacy=none`` sends. Besides model arrays a site sends only typed
reports: ``FitReport`` (with a ``PrivacyReport`` under DP) and ``EvaluateReport``;
``to_metrics`` gives the metrics record the site sends and ``from_metrics`` reads one back,
raising ``RecordError`` (naming the key) for a reply that is not such a report. SecAgg+'s
stages and configuration keys are Flower's own (``secaggplus_constants``), named here so the
site's gate and the coordinator's workflow take them from one place.

The wire is kept as it is: these reports send the same keys with the same values as the
dictionaries they replaced, so sites and coordinators of this version interoperate. New keys
are optional, like ledger fields; a reader ignores keys it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.common import Scalar
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedmed.metrics import EvalStats
from fedmed.privacy.mechanisms import DP_SGD, EVALUATION_COUNTS
from fedmed.records import RecordError, field_names, read_fields

__all__ = [
    "FIT_METRIC_KEYS",
    "PRIVACY_METRIC_KEYS",
    "RECORD_KEY_CONFIGS",
    "RELEASES",
    "SITE_KEY",
    "SITE_RECORD",
    "EvaluateReport",
    "FitReport",
    "Key",
    "PrivacyReport",
    "RecordError",
    "Release",
    "Stage",
]

# The record the site's gate adds to each SecAgg+ reply, so a dropout can be named by site.
SITE_RECORD = "fedmed.site"
SITE_KEY = "site"  # the site's name: in SITE_RECORD and in every metrics record a site sends
NUM_EXAMPLES_KEY = "num_examples"
# Under DP with SecAgg+ the sites' evaluation travels as a SecAgg+ "fit" whose config names
# this task (Flower's SecAgg+ workflow only aggregates fits): the masked vector is the
# site's noisy counts, and the global model is left as it is.
TASK_KEY = "fedmed.task"
EVALUATE_TASK = "evaluate"
NOISY_COUNTS_KEY = "noisy_counts"  # a DP evaluation's released counts (float64 bytes)
# An operating-point rule (evaluation.threshold) gives each site a validation split: without
# DP its exact counts travel under these prefixed keys; with DP they follow the test split's
# in the one noisy vector, beside the validation split's public size.
VALIDATION_PREFIX = "validation_"
VALIDATION_EXAMPLES_KEY = "validation_examples"
# personalization=finetune under DP: the accounting of the DP-SGD steps a site took on its
# records for its personal model (which stays at the site), beside its final evaluation.
PERSONAL_PREFIX = "personal_"
# privacy=none, personalization=finetune|mrmtl: the exact test counts of a site's personal
# model at the final evaluation (with DP they follow in the one noisy vector).
PERSONAL_MODEL_PREFIX = "personal_model_"


@dataclass(frozen=True)
class PrivacyReport:
    """A DP site's accounting after a round (never data): what the coordinator mirrors in its
    privacy report and puts in its receipt. The site's ledger stays the record of truth."""

    epsilon: float  # the site's lifetime epsilon after the round (unchanged when it declined)
    budget_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int  # 0 when the site declined
    ledger: str
    accountant: str | None = None  # the accountant of the site's budget check (its kit's)
    ledger_entry: str | None = None  # hash of the round's ledger entry (a round it trained)
    declined: str | None = None  # why the site declined the round

    def to_metrics(self) -> dict[str, Scalar]:
        return _present(self, PRIVACY_METRIC_KEYS)


@dataclass(frozen=True)
class FitReport:
    """What a site sends with its update (or instead of one, when it declines)."""

    site: str
    num_examples: int
    train_loss: float | None = None  # absent when the site declined
    privacy: PrivacyReport | None = None  # with privacy=dp

    @property
    def declined(self) -> str | None:
        """The site's reason when it declined the round (its budget); None when it trained."""
        return self.privacy.declined if self.privacy is not None else None

    def to_metrics(self) -> dict[str, Scalar]:
        """The fit metrics record: the site's name, counts and, with DP, its accounting."""
        privacy = self.privacy.to_metrics() if self.privacy is not None else {}
        return {**_present(self, FIT_METRIC_KEYS), **privacy}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> FitReport:
        """A fit reply's report; a DP report is one that carries an ``epsilon``."""
        privacy = None
        if "epsilon" in metrics:
            privacy = PrivacyReport(**read_fields(PrivacyReport, metrics, "fit report"))
        return cls(**read_fields(cls, metrics, "fit report"), privacy=privacy)


@dataclass(frozen=True)
class EvaluateReport:
    """What a site sends after evaluating the global model: its name and aggregate counts.

    Without DP: the exact ``stats`` (and ``validation``'s). With DP: the test split's size
    (public; the validation split's too) and ``noisy_counts``, the Gaussian mechanism's
    output, with the ``privacy`` report of the release (its ledger entry), or only the report
    when the site declined to evaluate.
    """

    site: str
    stats: EvalStats | None = None
    num_examples: int = 0
    noisy_counts: np.ndarray | None = None
    privacy: PrivacyReport | None = None
    validation: EvalStats | None = None
    validation_examples: int = 0
    personal: PrivacyReport | None = None  # DP fine-tuning's accounting (never the model)
    personal_stats: EvalStats | None = None  # privacy=none: the personal model's exact counts

    def to_metrics(self) -> dict[str, Scalar]:
        if self.stats is not None:
            out = {SITE_KEY: self.site, **self.stats.to_metrics()}
            for prefix, extra in (
                (VALIDATION_PREFIX, self.validation),
                (PERSONAL_MODEL_PREFIX, self.personal_stats),
            ):
                if extra is not None:
                    out.update({prefix + key: value for key, value in extra.to_metrics().items()})
            return out
        out = {SITE_KEY: self.site, NUM_EXAMPLES_KEY: self.num_examples}
        if self.validation_examples:
            out[VALIDATION_EXAMPLES_KEY] = self.validation_examples
        if self.noisy_counts is not None:
            out[NOISY_COUNTS_KEY] = self.noisy_counts.astype(np.float64).tobytes()
        if self.privacy is not None:
            out.update(self.privacy.to_metrics())
        if self.personal is not None:
            out.update({PERSONAL_PREFIX + k: v for k, v in self.personal.to_metrics().items()})
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], masked: bool = False) -> EvaluateReport:
        """The report of an evaluation reply; ``masked``: a SecAgg+ evaluation, whose counts
        travelled in the masked vector (only their sum is known)."""
        site = read_fields(cls, metrics, "evaluate report")[SITE_KEY]
        if "epsilon" in metrics:
            return cls._private(site, metrics, masked)
        try:
            stats = EvalStats.from_metrics(dict(metrics))
            validation = _prefixed_stats(metrics, VALIDATION_PREFIX)
            personal = _prefixed_stats(metrics, PERSONAL_MODEL_PREFIX)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"evaluate report: unreadable counts ({exc!r:.80})") from None
        return cls(site, stats, validation=validation, personal_stats=personal)

    @classmethod
    def _private(cls, site: str, metrics: Mapping[str, Any], masked: bool) -> EvaluateReport:
        privacy = PrivacyReport(**read_fields(PrivacyReport, metrics, "evaluate report"))
        fields = read_fields(cls, metrics, "evaluate report")
        raw = metrics.get(NOISY_COUNTS_KEY)
        counts = None
        if raw is not None:
            if not isinstance(raw, bytes) or len(raw) % 8:
                raise RecordError(f"evaluate report: '{NOISY_COUNTS_KEY}' is not float64 bytes")
            counts = np.frombuffer(raw, dtype=np.float64)
            if not np.isfinite(counts).all():
                raise RecordError(f"evaluate report: '{NOISY_COUNTS_KEY}' is not finite")
        if counts is not None and masked:
            raise RecordError(f"evaluate report: '{NOISY_COUNTS_KEY}' sent beside SecAgg+")
        if counts is None and privacy.declined is None and not masked:
            raise RecordError(f"evaluate report lacks {NOISY_COUNTS_KEY}")
        validation_examples = int(fields.get(VALIDATION_EXAMPLES_KEY, 0))
        personal = {
            key[len(PERSONAL_PREFIX) :]: value
            for key, value in metrics.items()
            if key.startswith(PERSONAL_PREFIX) and not key.startswith(PERSONAL_MODEL_PREFIX)
        }
        return cls(
            site,
            None,
            int(fields.get(NUM_EXAMPLES_KEY, 0)),
            counts,
            privacy,
            validation_examples=validation_examples,
            personal=PrivacyReport(**read_fields(PrivacyReport, personal, "evaluate report"))
            if personal
            else None,
        )

    @property
    def declined(self) -> str | None:
        """The site's reason when it declined to evaluate (its budget); None otherwise."""
        return self.privacy.declined if self.privacy is not None else None


FIT_METRIC_KEYS = field_names(FitReport)  # site, num_examples, train_loss
PRIVACY_METRIC_KEYS = field_names(PrivacyReport)


class Release(StrEnum):
    """What a value a site sends is, for its privacy."""

    MODEL_UPDATE = "model update: DP-SGD under privacy=dp, in the ledger before it leaves"
    PRIVATE_STATISTIC = "private statistic: a Gaussian mechanism, in the ledger before it leaves"
    PUBLIC = "public metadata: no function of a record beyond the split sizes"
    PROTOCOL = "protocol field: Flower's or SecAgg+'s own, or a constant"
    MASKED = "masked vector (SecAgg+): a model update or noisy evaluation counts, in the ledger"
    EXACT = "exact statistic: sent only with privacy=none (no guarantee is claimed)"


_ACCOUNTING = {key: Release.PUBLIC for key in PRIVACY_METRIC_KEYS}  # of public parameters
_PERSONAL_ACCOUNTING = {PERSONAL_PREFIX + key: Release.PUBLIC for key in PRIVACY_METRIC_KEYS}
# Every value any reply of a site holds: {record name in the reply: {key: what it is}}, and
# per private release its mechanism. A value not listed here must never leave a site.
RELEASES: dict[str, dict[str, Release]] = {
    "fitres.parameters": {"*": Release.MODEL_UPDATE},  # the delta's arrays (mechanism DP_SGD)
    "fitres.metrics": {
        SITE_KEY: Release.PUBLIC,
        NUM_EXAMPLES_KEY: Release.PUBLIC,  # training split size (also FedAvg's weight)
        VALIDATION_EXAMPLES_KEY: Release.PUBLIC,  # a SecAgg+ evaluation's validation split size
        "train_loss": Release.EXACT,
        **_ACCOUNTING,
        **_PERSONAL_ACCOUNTING,  # beside a SecAgg+ evaluation
    },
    "fitres.num_examples": {NUM_EXAMPLES_KEY: Release.PUBLIC},
    "fitres.status": {"code": Release.PROTOCOL, "message": Release.PROTOCOL},
    "evaluateres.metrics": {
        SITE_KEY: Release.PUBLIC,
        NUM_EXAMPLES_KEY: Release.PUBLIC,  # test split size
        VALIDATION_EXAMPLES_KEY: Release.PUBLIC,  # validation split size
        NOISY_COUNTS_KEY: Release.PRIVATE_STATISTIC,  # test, validation, personal-model counts
        **_ACCOUNTING,
        **_PERSONAL_ACCOUNTING,
        **{
            prefix + key: Release.EXACT
            for prefix in ("", VALIDATION_PREFIX, PERSONAL_MODEL_PREFIX)
            for key in ("num_examples", "loss_sum", "correct", "hist_pos", "hist_neg")
            if prefix + key != NUM_EXAMPLES_KEY
        },
    },
    # Flower's required loss field: the exact loss with privacy=none, the constant 0.0 with DP.
    "evaluateres.loss": {"loss": Release.PROTOCOL},
    "evaluateres.num_examples": {NUM_EXAMPLES_KEY: Release.PUBLIC},
    "evaluateres.status": {"code": Release.PROTOCOL, "message": Release.PROTOCOL},
    # SecAgg+: public keys, encrypted key shares, the masked update vector, unmask shares.
    "secaggplus_configs": {
        **{key: Release.PROTOCOL for key in ("pk1", "pk2", "ctxts", "dsts", "nids", "shares")},
        "masked_params": Release.MASKED,
    },
    SITE_RECORD: {SITE_KEY: Release.PUBLIC},
}
# The mechanisms a value of each private kind may come from (its ledger entry's ``mechanism``).
MECHANISMS_OF = {
    Release.MODEL_UPDATE: (DP_SGD,),
    Release.PRIVATE_STATISTIC: (EVALUATION_COUNTS,),
    Release.MASKED: (DP_SGD, EVALUATION_COUNTS),  # by the request's task
}
LEDGERED = tuple(MECHANISMS_OF)  # the kinds whose reply must name its ledger entry under DP


def _prefixed_stats(metrics: Mapping[str, Any], prefix: str) -> EvalStats | None:
    """The counts sent under ``prefix`` (the validation split's, the personal model's)."""
    values = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    return EvalStats.from_metrics(values) if values else None


def declared(record: str, key: str) -> Release | None:
    """What the inventory declares the value ``key`` of reply record ``record``; None: not
    declared (it must not leave a site)."""
    keys = RELEASES.get(record)
    if keys is None:
        return None
    return keys.get(key, keys.get("*"))


def _present(report: object, keys: tuple[str, ...]) -> dict[str, Scalar]:
    """The report's values under ``keys``, leaving out those it does not have (None)."""
    values = {key: getattr(report, key) for key in keys}
    return {key: value for key, value in values.items() if value is not None}
