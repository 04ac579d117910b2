"""The coordinator's view of each site's privacy spend, as the sites report it, per round.

The sites' ledgers are the record of truth; this log only mirrors what the sites reported
so the run directory gets ``privacy_report.md`` and ``epsilon.png`` and ``summary.json`` its
``privacy`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.config.schema import FedMedConfig
from fedmed.plots import panels
from fedmed.privacy.accounting import accountant_record
from fedmed.privacy.budget import dp_config
from fedmed.privacy.evaluation import SENSITIVITY, STATISTICS
from fedmed.privacy.mechanisms import DP_SGD, EVALUATION, EVALUATION_COUNTS, TRAIN, record_epsilon
from fedmed.protocol import FitReport, PrivacyReport
from fedmed.provenance import code_version, config_hash

UNIT_OF_PRIVACY = (
    "one record (patient row or image) of one site, in its training or its test split"
)


@dataclass
class SiteSpend:
    """One site's reported epsilon after one round (``declined`` holds the reason, if any)."""

    round: int
    site: str
    epsilon: float  # the split's lifetime epsilon after the round
    budget_epsilon: float
    declined: str | None
    split: str = TRAIN


@dataclass
class PrivacyLog:
    """Per-round epsilon of every site, and each site's latest privacy parameters."""

    cfg: FedMedConfig
    spends: list[SiteSpend] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return dp_config(self.cfg) is not None

    def record(self, server_round: int, report: FitReport) -> None:
        """A site's reported accounting after a round (nothing without privacy=dp)."""
        p = report.privacy
        if p is None:
            return
        self.spends.append(
            SiteSpend(
                server_round, report.site, float(p.epsilon), float(p.budget_epsilon), p.declined
            )
        )
        state = self.sites.setdefault(report.site, {"declined_rounds": []})
        if p.declined is not None:
            state["declined_rounds"].append(server_round)
        state.update(
            epsilon=float(p.epsilon),
            delta=float(p.delta),
            budget_epsilon=float(p.budget_epsilon),
            noise_multiplier=float(p.noise_multiplier),
            sample_rate=float(p.sample_rate),
            ledger=p.ledger,
        )
        if p.accountant is not None:
            state["accountant"] = p.accountant

    def record_evaluation(self, server_round: int, site: str, p: PrivacyReport) -> None:
        """A site's reported accounting of its evaluation release (or of its decline)."""
        self.spends.append(
            SiteSpend(server_round, site, float(p.epsilon), float(p.budget_epsilon),
                      p.declined, EVALUATION)
        )  # fmt: skip
        state = self.sites.setdefault(site, {"declined_rounds": []})
        state.setdefault("evaluation_declined_rounds", [])
        if p.declined is not None:
            state["evaluation_declined_rounds"].append(server_round)
        state.update(
            evaluation_epsilon=float(p.epsilon),
            evaluation_noise_multiplier=float(p.noise_multiplier),
            delta=float(p.delta),
            budget_epsilon=float(p.budget_epsilon),
            ledger=p.ledger,
        )

    def record_epsilon(self, site: str, server_round: int) -> float:
        """Epsilon for one record of ``site`` after ``server_round``: the worse split's."""
        latest: dict[str, float] = {}
        for s in self.spends:
            if s.site == site and s.round <= server_round:
                latest[s.split] = s.epsilon
        return record_epsilon(latest)

    def max_epsilon(self, server_round: int) -> float | None:
        """The largest record epsilon among the sites that reported in ``server_round``."""
        sites = {s.site for s in self.spends if s.round == server_round}
        return max((self.record_epsilon(site, server_round) for site in sites), default=None)

    def _reported(self, key: str) -> list[Any]:
        return sorted({state[key] for state in self.sites.values() if key in state})

    def _accountant(self) -> dict[str, str]:
        """The accountant of the sites' budget checks: each site's kit decides it (the run
        may only name the same one)."""
        dp = dp_config(self.cfg)
        assert dp is not None
        names = [dp.accountant.value] if dp.accountant is not None else self._reported("accountant")
        if len(names) == 1:
            return accountant_record(names[0])
        per_site = ", ".join(
            f"{site} {state['accountant']}"
            for site, state in sorted(self.sites.items())
            if "accountant" in state
        )
        return {
            **accountant_record("rdp"),
            "name": f"per site ({per_site})" if per_site else "each site's kit (none reported)",
        }

    def run_summary(self) -> dict[str, Any]:
        """The run-level ``privacy`` block of summary.json."""
        dp = dp_config(self.cfg)
        if dp is None:
            return {"mechanism": "none", "unit": None}
        deltas = [dp.delta] if dp.delta is not None else self._reported("delta")
        return {
            "mechanism": DP_SGD,
            "evaluation_mechanism": {
                "name": EVALUATION_COUNTS,
                "statistics": STATISTICS,
                "sensitivity": SENSITIVITY,
                "evaluation_epsilon": dp.evaluation_epsilon or dp.target_epsilon,
            },
            "unit": UNIT_OF_PRIVACY,
            "accountant": self._accountant(),
            "target_epsilon": dp.target_epsilon,
            "noise_multiplier": {  # of DP-SGD: a site sampled only to evaluate has none
                site: state["noise_multiplier"]
                for site, state in sorted(self.sites.items())
                if "noise_multiplier" in state
            },
            "noise": "explicit" if dp.noise_multiplier is not None else "calibrated per site",
            "max_grad_norm": dp.max_grad_norm,
            "delta": deltas[0] if len(deltas) == 1 else None,  # else: per site
            "clipping": dp.clipping.value,
            "config_hash": config_hash(self.cfg),
            "code_version": code_version(),
        }

    def site_summary(self, site: str) -> dict[str, Any] | None:
        """The per-site ``privacy`` block of summary.json."""
        state = self.sites.get(site)
        if state is None:
            return None
        keys = ("epsilon", "delta", "budget_epsilon", "declined_rounds", "ledger")
        summary = {key: state[key] for key in keys if key in state}
        evaluation = ("evaluation_epsilon", "evaluation_noise_multiplier",
                      "evaluation_declined_rounds")  # fmt: skip
        summary.update({key: state[key] for key in evaluation if key in state})
        last = max((s.round for s in self.spends if s.site == site), default=0)
        summary["record_epsilon"] = self.record_epsilon(site, last)
        return summary

    def write(self, output_dir: Path) -> None:
        """``privacy_report.md`` and ``epsilon.png`` in the run directory."""
        if not self.enabled:
            return
        (output_dir / "privacy_report.md").write_text(self.report())
        if self.spends:
            self.plot(output_dir / "epsilon.png")

    def report(self) -> str:
        run = self.run_summary()
        sites = sorted(self.sites)
        training = [s for s in self.spends if s.split == TRAIN]
        rounds = sorted({s.round for s in training})
        by_key = {(s.round, s.site): s for s in training}
        accountant = run["accountant"]
        lines = [
            "# Privacy report",
            "",
            "## What is protected",
            "",
            f"- **Unit of privacy:** {UNIT_OF_PRIVACY}. Each site gives an (epsilon, delta)-DP "
            "guarantee for its own records; the epsilons in the tables below are lifetime "
            "totals, counting earlier runs recorded in its ledger. Training and test records "
            "are disjoint, each split composes its own releases, and a record's guarantee is "
            "its split's epsilon: the site's guarantee is the larger of the two.",
            f"- **Mechanism:** DP-SGD with Poisson sampling, per-sample gradient clipping "
            f"(max_grad_norm = {run['max_grad_norm']}) and Gaussian noise "
            f"({run['noise']}), run by Opacus at each site.",
            f"- **Accountant:** {accountant['library']} {accountant['version']} "
            f"`{accountant['name']}`.",
            f"- **Evaluation:** each site releases only its test split's counts "
            f"({STATISTICS}) plus Gaussian noise (`{EVALUATION_COUNTS}`, L2 sensitivity "
            f"{SENSITIVITY:g}: one record is one count); the coordinator's figures come from "
            "the sum over the sites. No loss, no per-record value and no training statistic "
            "leaves a site; the split sizes are public metadata.",
            "- Each site checks its own lifetime budget before every release (a round's "
            "training, an evaluation) and declines one that would exceed it; the coordinator "
            "cannot override this.",
            "- Every release is recorded in the site's signed, hash-chained ledger before it "
            "leaves the site.",
            f"- Config hash `{run['config_hash']}`, code version `{run['code_version']}`.",
            "",
            "## Sites",
            "",
            "| site | epsilon | training epsilon | evaluation epsilon | budget | delta | "
            "noise multiplier (training, evaluation) | sample rate | declined | ledger |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for site in sites:
            st = self.sites[site]
            declined = [f"round {r}" for r in st["declined_rounds"]] + [
                f"evaluation {r}" for r in st.get("evaluation_declined_rounds", [])
            ]
            last = max(s.round for s in self.spends if s.site == site)
            lines.append(
                f"| {site} | {self.record_epsilon(site, last):.4f} | "
                f"{_number(st.get('epsilon'))} | {_number(st.get('evaluation_epsilon'))} | "
                f"{st['budget_epsilon']:g} | {st['delta']:g} | "
                f"{_number(st.get('noise_multiplier'))}, "
                f"{_number(st.get('evaluation_noise_multiplier'))} | "
                f"{_number(st.get('sample_rate'))} | {', '.join(declined) or 'none'} | "
                f"`{st['ledger']}` |"
            )
        lines += [
            "",
            "## Training epsilon per site and round (lifetime, after the round)",
            "",
            "| round | " + " | ".join(sites) + " |",
            "|---" * (len(sites) + 1) + "|",
        ]
        for r in rounds:
            cells = []
            for site in sites:
                spend = by_key.get((r, site))
                if spend is None:
                    cells.append("-")
                else:
                    cells.append(f"{spend.epsilon:.4f}" + (" (declined)" if spend.declined else ""))
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        evaluations = [s for s in self.spends if s.split == EVALUATION]
        if evaluations:
            lines += [
                "",
                "## Evaluation epsilon per site (the test split's lifetime, after each release)",
                "",
                "| round | site | evaluation epsilon |",
                "|---|---|---|",
            ]
            lines += [
                f"| {s.round} | {s.site} | {s.epsilon:.4f}"
                + (" (declined) |" if s.declined else " |")
                for s in evaluations
            ]
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        """Epsilon over rounds, one panel per site (sites on the same target draw the same
        curve), each against its budget (dashed); x: a round the site declined."""
        sites = sorted(self.sites)
        with panels(path, sites, xlabel="round", ylabel="lifetime epsilon", integer_x=True) as axes:
            for ax, site in zip(axes, sites, strict=True):
                spends = [s for s in self.spends if s.site == site and s.split == TRAIN]
                evaluations = [s for s in self.spends if s.site == site and s.split == EVALUATION]
                if evaluations:
                    ax.plot([s.round for s in evaluations], [s.epsilon for s in evaluations],
                            "D", color="C2", label="evaluation epsilon")  # fmt: skip
                ax.plot([s.round for s in spends], [s.epsilon for s in spends], "o-",
                        color="C0", label="training epsilon")  # fmt: skip
                ax.axhline(self.sites[site]["budget_epsilon"], color="C3", ls="--", lw=1,
                           label="budget")  # fmt: skip
                declined = [s for s in spends if s.declined]
                ax.scatter([s.round for s in declined], [s.epsilon for s in declined],
                           marker="x", s=80, color="C3", label="declined")  # fmt: skip
                ax.set_ylim(bottom=0.0)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
