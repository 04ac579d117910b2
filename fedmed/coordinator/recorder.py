"""What the coordinator learns during a run, printed per round and written to the run directory.

Files: ``metrics.csv`` (one row per round and site), ``summary.json`` (keys other tools read)
and ``accuracy.png``; with DP also ``privacy_report.md`` and ``epsilon.png``. Under DP the
coordinator holds no per-site statistic of any record: each site's evaluation is noisy
counts (a Gaussian mechanism), only their sum over the sites becomes figures (rows of site
``ALL_SITES``), and the sites' rows carry public metadata and accounting only.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Error

from fedmed.config.schema import FedMedConfig, evaluates_personal_model
from fedmed.coordinator.privacy_log import PrivacyLog
from fedmed.coordinator.receipts import ReceiptBook
from fedmed.coordinator.releases import ReleaseLog
from fedmed.coordinator.secure_log import Dropout, SecureAggregationLog
from fedmed.errors import REFUSES
from fedmed.metrics import (
    CLINICAL_METRICS,
    EvalStats,
    clinical_metrics,
    clinical_text,
    split_held_out,
    stats_from_counts,
)
from fedmed.operating_point import (
    OPERATING_POINT_FILE,
    ThresholdRule,
    choose_threshold,
    parse_threshold,
)
from fedmed.plots import chart
from fedmed.privacy.budget import dp_config
from fedmed.protocol import EvaluateReport, FitReport

log = logging.getLogger(__name__)

# A run that ended because sites' privacy budgets ran out ended as designed.
CLEAN_STATUSES = ("completed", "budget_exhausted")

METRICS_COLUMNS = (
    "round",
    "site",
    "num_train",
    "train_loss",
    "num_test",
    "test_loss",
    "accuracy",
    *CLINICAL_METRICS,
    "auc",
    "epsilon",
)
ALL_SITES = "all sites"  # metrics.csv rows of the global figures (under DP, the only figures)
# SiteError text ("site 'NAME': problem") as it appears, possibly escaped, inside Flower's error
_SITE_ERROR = re.compile(r"site '([^']+)': ([^\n]*?)(?:'>'\)|'>|\\n|$)", re.MULTILINE)
# The simulation engine's wrapping of an exception: "<class 'pkg.Name'>:<'message"
_FLOWER_CLASS = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'?")


def site_error(text: str) -> tuple[str, str]:
    """(site, one-line message) from a failure Flower reports; the innermost SiteError wins.

    Errors that do not come from a site's own check (e.g. inside Flower) are reduced to
    their last line, at most 300 characters.
    """
    unescaped = text.replace("\\'", "'")
    matches = _SITE_ERROR.findall(unescaped)
    if matches:
        site, message = matches[-1]
        return site, f"site '{site}': {message.strip()}"
    lines = [ln.strip(" '\">)") for ln in unescaped.replace("\\n", "\n").splitlines()]
    last = next((ln for ln in reversed(lines) if ln), repr(text))
    return "unknown", _FLOWER_CLASS.sub(r"\1: ", last)[:300]


def failure_text(failure: BaseException | Any) -> str:
    """The text of a failure as Flower hands it over: an error reply's own reason (Flower
    wraps it as ``Exception(Error)``, whose str is the Error's repr), an exception's
    message, or a ``(proxy, result)`` pair whose result reports a non-OK status."""
    if isinstance(failure, BaseException):
        inner = failure.args[0] if len(failure.args) == 1 else None
        return inner.reason if isinstance(inner, Error) and inner.reason else str(failure)
    if isinstance(failure, tuple) and len(failure) == 2 and hasattr(failure[1], "status"):
        result = failure[1]
        site = getattr(result, "metrics", {}).get("site")
        message = str(result.status.message)
        return f"site '{site}': {message}" if site else message
    return repr(failure)


@dataclass
class RoundRecord:
    """Global metrics of one round (the union of the evaluating sites' test splits)."""

    round: int
    accuracy: float
    auc: float | None
    loss: float | None  # None under DP: no site releases a loss
    sites: int  # sites that evaluated the global model
    seconds: float
    trained: int = 0  # sites whose update went into this round's aggregate
    private: bool = False  # figures from the sum of the sites' noisy counts
    balanced_accuracy: float | None = None  # binary tasks only, as the next two
    sensitivity: float | None = None
    specificity: float | None = None
    threshold: float = 0.0  # the decision threshold (logit margin) the figures are read at

    def clinical(self) -> dict[str, float | None]:
        return clinical_metrics(self)


@dataclass
class Failure:
    """A site that failed in a round, with its own error message."""

    site: str
    round: int
    stage: str
    error: str


@dataclass
class RunRecorder:
    """Collects per-site and global metrics and failures; owns the run directory's outputs."""

    cfg: FedMedConfig
    output_dir: Path
    num_sites: int
    history: list[RoundRecord] = field(default_factory=list)  # the evaluated rounds
    rounds_ended: list[int] = field(default_factory=list)  # every round, evaluated or not
    failures: list[Failure] = field(default_factory=list)
    site_rows: list[dict[str, Any]] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "running"
    stop_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    receipt_key: Path | None = None  # the coordinator's receipt key (default: in output_dir)
    privacy: PrivacyLog = field(init=False)
    receipts: ReceiptBook = field(init=False)
    releases: ReleaseLog = field(init=False)
    secure: SecureAggregationLog = field(default_factory=SecureAggregationLog)
    # personalization=finetune|mrmtl: the sites' personal models at the final evaluation
    personal_models: dict[str, Any] | None = None
    _personal_sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # privacy=none
    _fit_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    _trained: dict[int, set[str]] = field(default_factory=dict)
    _started: float = field(default_factory=time.perf_counter)
    _round_started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.privacy = PrivacyLog(self.cfg)
        self.receipts = ReceiptBook(self.output_dir, self.receipt_key)
        self.releases = ReleaseLog(self.output_dir, self.privacy.enabled)

    def start_round(self) -> None:
        self._round_started = time.perf_counter()
        self._fit_rows = {}

    def record_fit(self, server_round: int, num_train: int, report: FitReport) -> None:
        """A site's fit answer: an update, or a decline with the site's reason."""
        site = report.site
        self.privacy.record(server_round, report)
        if report.declined is not None:
            log.info(f"round {server_round:>3} | {site} declined: {report.declined}")
            return
        if self.privacy.enabled and report.privacy is not None:
            self.receipts.record(server_round, site, report.privacy)  # signed, before aggregation
        self._trained.setdefault(server_round, set()).add(site)
        loss = report.train_loss  # None under DP: it stays at the site
        self._fit_rows[site] = {
            "num_train": num_train,
            "train_loss": float(loss) if loss is not None else None,
            "epsilon": report.privacy.epsilon if report.privacy is not None else None,
        }
        self.sites.setdefault(site, {})["num_train"] = num_train

    def record_failures(
        self, server_round: int, stage: str, failures: list[BaseException | Any]
    ) -> None:
        """Name the failed site from the error text (sites raise ``SiteError("site 'x': ...")``)."""
        for failure in failures:
            site, message = site_error(failure_text(failure))
            self.failures.append(Failure(site, server_round, stage, message))
            log.info(f"round {server_round:>3} | {stage} failed at {site}: {message}")

    def record_reply(self, server_round: int, site: str, stage: str, content: Any) -> None:
        """Every value of a site's reply, against the protocol's inventory (releases.jsonl);
        a value outside it is the site's failure."""
        found = self.releases.record(server_round, site, stage, content)
        if found:
            message = f"site '{site}': sent values outside the inventory: {'; '.join(found)}"
            self.failures.append(Failure(site, server_round, stage, message))
            log.info(f"round {server_round:>3} | {stage} failed at {site}: {message}")

    def record_rejected(self, server_round: int, site: str, problem: str) -> None:
        """An update the coordinator refused (a site that skipped or lacks its own checks)."""
        message = f"update rejected by the coordinator: {problem}"
        self._trained.get(server_round, set()).discard(site)  # not in the aggregate
        self.failures.append(Failure(site, server_round, "fit", message))
        log.info(f"round {server_round:>3} | fit failed at {site}: {message}")

    def record_no_reply(
        self, server_round: int, site: str, stage: str, timeout: float | None
    ) -> None:
        """A site that took its message but never answered within the round's timeout."""
        message = f"site '{site}': no reply within federation.round_timeout ({timeout} s)"
        self.failures.append(Failure(site, server_round, stage, message))
        log.info(f"round {server_round:>3} | {stage} failed at {site}: {message}")

    def record_dropout(self, server_round: int, site: str, stage: str) -> None:
        self.secure.dropped.append(Dropout(server_round, site, stage))
        log.info(f"round {server_round:>3} | {site} dropped out at SecAgg+ stage {stage}")

    def record_secure_round_failure(self, server_round: int, reason: str) -> None:
        self.secure.failed_rounds.append({"round": server_round, "reason": reason})
        log.info(f"round {server_round:>3} | {reason}")

    def record_evaluation(
        self,
        server_round: int,
        reports: list[EvaluateReport],
        masked_sum: np.ndarray | None = None,
    ) -> RoundRecord | None:
        """The sites' evaluations of the global model: exact per-site rows without DP; under DP
        each site's release is accounted (and receipted) and only the sum of the noisy counts
        becomes figures (``masked_sum``: that sum as SecAgg+ unmasked it, the reports then
        carrying no counts). Prints the round's progress line; None when no site evaluated."""
        exact = {r.site: r.stats for r in reports if r.stats is not None}
        released = [r for r in reports if r.privacy is not None and r.declined is None]
        private = [r for r in released if r.noisy_counts is not None or masked_sum is not None]
        for report in reports:
            if report.privacy is not None:
                self._record_evaluation_privacy(server_round, report)
        rule = parse_threshold(self.cfg.evaluation.threshold)
        personal: EvalStats | None = None  # the sites' personal models, merged
        if exact:
            validations = [r.validation for r in reports if r.validation is not None]
            threshold = _threshold(rule, EvalStats.merge(validations) if validations else None)
            if threshold != 0.0:
                exact = {site: stats.at_threshold(threshold) for site, stats in exact.items()}
            merged = EvalStats.merge(list(exact.values()))
            merged.threshold = threshold
            self._site_rows(server_round, exact)
            own = {r.site: r.personal_stats for r in reports if r.personal_stats is not None}
            if own:
                own = {site: stats.at_threshold(threshold) for site, stats in own.items()}
                personal = EvalStats.merge(list(own.values()))
                self._personal_sites = {s: _figures(stats) for s, stats in own.items()}
        elif private:
            counts = masked_sum
            if counts is None:
                counts = np.sum([r.noisy_counts for r in private if r.noisy_counts is not None], 0)
            dp = dp_config(self.cfg)
            assert dp is not None, "only DP sites release noisy counts"
            edges = dp.evaluation_margin_edges
            with_personal = evaluates_personal_model(self.cfg, server_round)
            test_counts, validation_counts, personal_counts = split_held_out(
                counts, rule.needs_validation, with_personal
            )
            validation = None
            if validation_counts is not None:
                n_validation = sum(r.validation_examples for r in private)
                validation = stats_from_counts(validation_counts, n_validation, edges)
            threshold = _threshold(rule, validation)
            n = sum(r.num_examples for r in private)
            merged = stats_from_counts(test_counts, n, edges, threshold)
            if personal_counts is not None:
                personal = stats_from_counts(personal_counts, n, edges, threshold)
            self._private_rows(server_round, private, merged)
        else:
            self.record_unevaluated(server_round, "no site evaluated")
            return None
        record = RoundRecord(
            server_round,
            merged.accuracy,
            merged.auc,
            merged.loss,
            len(exact) or len(private),
            time.perf_counter() - self._round_started,
            len(self._trained.get(server_round, ())),
            private=not exact,
            **clinical_metrics(merged),
            threshold=merged.threshold,
        )
        self.history.append(record)
        self.rounds_ended.append(server_round)
        if personal is not None:
            self._record_personal(server_round, personal, private=not exact)
        auc = f"{record.auc:.4f}" if record.auc is not None else "  n/a "
        loss = f"loss {record.loss:.4f}" if record.loss is not None else "private evaluation"
        log.info(
            f"round {server_round:>3}/{self.cfg.federation.rounds} | {loss} | "
            f"accuracy {record.accuracy:.4f}{clinical_text(record.clinical())}"
            f"{self._threshold_text(record)} | auc {auc} | "
            f"sites trained {record.trained}, "
            f"evaluated {record.sites}{self._epsilon_text(server_round)} | "
            f"{record.seconds:.1f}s",
        )
        return record

    def _record_personal(self, server_round: int, personal: EvalStats, private: bool) -> None:
        """The sites' personal models on their test splits, merged (their models never left
        the sites: only these counts did, in the final evaluation's release)."""
        self.personal_models = {
            **_figures(personal),
            "round": server_round,
            "evaluation": "private" if private else "exact",
            "method": self.cfg.personalization.name.value,
        }
        auc = personal.auc
        log.info(
            f"round {server_round:>3}/{self.cfg.federation.rounds} | personal models: "
            f"accuracy {personal.accuracy:.4f}{clinical_text(clinical_metrics(personal))} | "
            f"auc {'n/a' if auc is None else f'{auc:.4f}'} (each site's own, on its test split)"
        )

    def _threshold_text(self, record: RoundRecord) -> str:
        """The operating point in the progress line, when a rule or a margin other than 0
        sets it."""
        rule = parse_threshold(self.cfg.evaluation.threshold)
        if not rule.needs_validation and rule.value == 0.0:
            return ""
        return f" at threshold {record.threshold:+.2f}"

    def record_unevaluated(self, server_round: int, why: str = "not evaluated") -> None:
        """A round that ends without an evaluation (federation.evaluate_every): its line."""
        self.rounds_ended.append(server_round)
        seconds = time.perf_counter() - self._round_started
        trained = len(self._trained.get(server_round, ()))
        log.info(
            f"round {server_round:>3}/{self.cfg.federation.rounds} | {why} | sites trained "
            f"{trained}{self._epsilon_text(server_round)} | {seconds:.1f}s"
        )

    def _epsilon_text(self, server_round: int) -> str:
        eps = self.privacy.max_epsilon(server_round)
        return f" | max site epsilon {eps:.3f}" if eps is not None else ""

    def _record_evaluation_privacy(self, server_round: int, report: EvaluateReport) -> None:
        assert report.privacy is not None
        self.privacy.record_evaluation(server_round, report.site, report.privacy)
        if report.declined is not None:
            log.info(f"round {server_round:>3} | {report.site} declined to evaluate: "
                     f"{report.declined}")  # fmt: skip
        elif report.privacy.ledger_entry is not None:
            self.receipts.record(server_round, report.site, report.privacy)
        personal = report.personal
        if personal is not None and personal.declined is not None:  # its epsilon is as it was
            log.info(f"round {server_round:>3} | {report.site} declined fine-tuning: "
                     f"{personal.declined}")  # fmt: skip
        elif personal is not None:  # the site's DP fine-tuning for its personal model
            self.privacy.record(server_round, FitReport(report.site, 0, privacy=personal))
            if personal.ledger_entry is not None:
                self.receipts.record(server_round, report.site, personal)

    def _site_rows(self, server_round: int, per_site: dict[str, EvalStats]) -> None:
        """privacy=none: each site's exact figures."""
        for site, stats in sorted(per_site.items()):
            fit = self._fit_rows.get(site, {})
            row = {
                "round": server_round,
                "site": site,
                "num_train": fit.get("num_train", self.sites.get(site, {}).get("num_train")),
                "train_loss": fit.get("train_loss"),
                "num_test": stats.num_examples,
                "test_loss": stats.loss,
                "accuracy": stats.accuracy,
                **clinical_metrics(stats),
                "auc": stats.auc,
                "epsilon": fit.get("epsilon"),
            }
            self.site_rows.append(row)
            self.sites.setdefault(site, {}).update(
                {"num_test": stats.num_examples, "accuracy": stats.accuracy,
                 **clinical_metrics(stats), "auc": stats.auc}
            )  # fmt: skip

    def _private_rows(
        self, server_round: int, reports: list[EvaluateReport], merged: EvalStats
    ) -> None:
        """Under DP: one row per site with its public sizes and accounting, one row of the
        figures of the summed noisy counts."""
        for report in sorted(reports, key=lambda r: r.site):
            fit = self._fit_rows.get(report.site, {})
            num_train = fit.get("num_train", self.sites.get(report.site, {}).get("num_train"))
            self.site_rows.append(
                {"round": server_round, "site": report.site, "num_train": num_train,
                 "num_test": report.num_examples, "epsilon": fit.get("epsilon")}
            )  # fmt: skip
            self.sites.setdefault(report.site, {})["num_test"] = report.num_examples
        self.site_rows.append(
            {"round": server_round, "site": ALL_SITES, "num_test": merged.num_examples,
             "accuracy": merged.accuracy, **clinical_metrics(merged), "auc": merged.auc}
        )  # fmt: skip

    def stop(self, reason: str, status: str = "stopped") -> None:
        refused = sorted({f.site for f in self.failures if REFUSES in f.error})
        if status == "stopped" and len(refused) == self.num_sites:
            # Every site's own kit forbids what this run asks: say so, not just "too few".
            status = "refused"
            reason = (
                f"every site refused the run ({', '.join(refused)}): it asks for something "
                f"their kits do not allow; each site's reason is in failures ({reason})"
            )
        self.status = status
        self.stop_reason = reason
        log.info(f"federation {status.replace('_', ' ')}: {reason}")

    # ------------------------------------------------------------------ outputs
    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else None
        return {
            "dataset": self.cfg.dataset.name,
            "model": self.cfg.model.name.value,
            "strategy": self.cfg.strategy.name.value,
            "rounds": self.cfg.federation.rounds,
            "rounds_completed": len(self.rounds_ended),
            "num_sites": self.num_sites,
            "seed": self.cfg.seed,
            "status": self.status if self.status != "running" else "completed",
            "stop_reason": self.stop_reason,
            "global": {
                "accuracy": last.accuracy if last else None,
                **(last.clinical() if last else dict.fromkeys(CLINICAL_METRICS)),
                "auc": last.auc if last else None,
                "loss": last.loss if last else None,
                "round": last.round if last else None,  # the last evaluated round
                "threshold": last.threshold if last else None,
                "threshold_rule": parse_threshold(self.cfg.evaluation.threshold).describe(),
                # private: from the sum of the sites' noisy counts; exact: privacy=none
                "evaluation": None if last is None else "private" if last.private else "exact",
            },
            "history": [
                {
                    "round": r.round,
                    "accuracy": r.accuracy,
                    **r.clinical(),
                    "auc": r.auc,
                    "loss": r.loss,
                    "seconds": r.seconds,
                    "private": r.private,
                    "threshold": r.threshold,
                }
                for r in self.history
            ],
            "personal_models": None
            if self.personal_models is None
            else {**self.personal_models, "sites": self._personal_sites or None},
            "privacy": self.privacy.run_summary(),
            "secure_aggregation": self.secure.summary(),
            "sites": {
                name: {**self.sites.get(name, {}), "privacy": self.privacy.site_summary(name)}
                for name in sorted(set(self.sites) | set(self.privacy.sites))
            },
            "failures": [asdict(f) for f in self.failures],
            "wall_seconds": time.perf_counter() - self._started,
            **self.extra,
        }

    def write(self) -> dict[str, Any]:
        """Write metrics.csv, summary.json and accuracy.png; returns the summary."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / "metrics.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(self.site_rows)
        summary = self.summary()
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.history:
            plot_history(self.history, self.output_dir / "accuracy.png", title=_title(self.cfg))
            point = {
                "threshold": self.history[-1].threshold,
                "rule": summary["global"]["threshold_rule"],
                "round": self.history[-1].round,
                "meaning": "call a record positive when logit[1] - logit[0] >= threshold",
            }
            (self.output_dir / OPERATING_POINT_FILE).write_text(json.dumps(point, indent=2))
        self.privacy.write(self.output_dir)
        return summary


def _figures(stats: EvalStats) -> dict[str, float | None]:
    """Accuracy, the clinical metrics and AUC of merged (or one site's) test counts."""
    return {"accuracy": stats.accuracy, **clinical_metrics(stats), "auc": stats.auc}


def _threshold(rule: ThresholdRule, validation: EvalStats | None) -> float:
    """The operating point: ``rule`` on the summed validation figures (a fixed margin needs
    none; a rule without validation figures keeps 0)."""
    if validation is None or validation.hist_pos is None:
        return 0.0 if rule.needs_validation else rule.value
    return choose_threshold(validation, rule)


def _title(cfg: FedMedConfig) -> str:
    return f"{cfg.dataset.name} / {cfg.model.name.value} / {cfg.strategy.name.value}"


def plot_history(history: list[RoundRecord], path: Path, title: str) -> None:
    """Accuracy, AUC and (binary tasks) balanced accuracy, sensitivity and specificity of the
    global model per round: a constant classifier shows as one rate at 1 and the other at 0."""
    rounds = [r.round for r in history]
    axes = chart(path, xlabel="round", ylabel="global test metric", title=title, integer_x=True)
    with axes as ax:
        ax.plot(rounds, [r.accuracy for r in history], marker="o", label="accuracy")
        aucs = [r.auc for r in history if r.auc is not None]
        if len(aucs) == len(history):
            ax.plot(rounds, aucs, marker="s", label="AUC")
        styles = {"balanced_accuracy": "-", "sensitivity": ":", "specificity": "--"}
        for name, style in styles.items():
            values = [v for r in history if (v := r.clinical()[name]) is not None]
            if len(values) == len(history):
                ax.plot(rounds, values, linestyle=style, marker=".", label=name.replace("_", " "))
        ax.set_ylim(0.0, 1.0)
