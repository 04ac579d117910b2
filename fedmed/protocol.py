"""Every name that crosses the wire between a site and the coordinator, in one place.

Both sides import these, so no key is typed twice: the site builds its replies with them and
the coordinator reads the replies with them. Besides model arrays a site sends only typed
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
from typing import Any

from flwr.common import Scalar
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedmed.metrics import EvalStats
from fedmed.records import RecordError, field_names, read_fields

__all__ = [
    "FIT_METRIC_KEYS",
    "PRIVACY_METRIC_KEYS",
    "RECORD_KEY_CONFIGS",
    "SITE_KEY",
    "SITE_RECORD",
    "EvaluateReport",
    "FitReport",
    "Key",
    "PrivacyReport",
    "RecordError",
    "Stage",
]

# The record the site's gate adds to each SecAgg+ reply, so a dropout can be named by site.
SITE_RECORD = "fedmed.site"
SITE_KEY = "site"  # the site's name: in SITE_RECORD and in every metrics record a site sends


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
    """What a site sends after evaluating the global model: its name and aggregate counts."""

    site: str
    stats: EvalStats

    def to_metrics(self) -> dict[str, Scalar]:
        return {SITE_KEY: self.site, **self.stats.to_metrics()}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> EvaluateReport:
        site = read_fields(cls, metrics, "evaluate report")[SITE_KEY]
        try:
            stats = EvalStats.from_metrics(dict(metrics))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"evaluate report: unreadable counts ({exc!r:.80})") from None
        return cls(site, stats)


FIT_METRIC_KEYS = field_names(FitReport)  # site, num_examples, train_loss
PRIVACY_METRIC_KEYS = field_names(PrivacyReport)


def _present(report: object, keys: tuple[str, ...]) -> dict[str, Scalar]:
    """The report's values under ``keys``, leaving out those it does not have (None)."""
    values = {key: getattr(report, key) for key in keys}
    return {key: value for key, value in values.items() if value is not None}
