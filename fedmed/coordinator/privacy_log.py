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
from fedmed.privacy.budget import MECHANISM, dp_config
from fedmed.protocol import FitReport
from fedmed.provenance import code_version, config_hash

UNIT_OF_PRIVACY = "one record (patient row or image) of one site's training data"


@dataclass
class SiteSpend:
    """One site's reported epsilon after one round (``declined`` holds the reason, if any)."""

    round: int
    site: str
    epsilon: float
    budget_epsilon: float
    declined: str | None


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

    def max_epsilon(self, server_round: int) -> float | None:
        values = [s.epsilon for s in self.spends if s.round == server_round]
        return max(values) if values else None

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
            "mechanism": MECHANISM,
            "unit": UNIT_OF_PRIVACY,
            "accountant": self._accountant(),
            "target_epsilon": dp.target_epsilon,
            "noise_multiplier": {
                site: state["noise_multiplier"] for site, state in sorted(self.sites.items())
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
        return {key: state[key] for key in keys}

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
        rounds = sorted({s.round for s in self.spends})
        by_key = {(s.round, s.site): s for s in self.spends}
        accountant = run["accountant"]
        lines = [
            "# Privacy report",
            "",
            "## What is protected",
            "",
            f"- **Unit of privacy:** {UNIT_OF_PRIVACY}. Each site gives an (epsilon, delta)-DP "
            "guarantee for its own records; epsilon below is each site's lifetime total, "
            "counting earlier runs recorded in its ledger.",
            f"- **Mechanism:** DP-SGD with Poisson sampling, per-sample gradient clipping "
            f"(max_grad_norm = {run['max_grad_norm']}) and Gaussian noise "
            f"({run['noise']}), run by Opacus at each site.",
            f"- **Accountant:** {accountant['library']} {accountant['version']} "
            f"`{accountant['name']}`.",
            "- Each site checks its own lifetime budget before every round and declines a "
            "round that would exceed it; the coordinator cannot override this.",
            "- Every round a site trains is recorded in its signed, hash-chained ledger before "
            "its update leaves the site.",
            f"- Config hash `{run['config_hash']}`, code version `{run['code_version']}`.",
            "",
            "## Sites",
            "",
            "| site | epsilon | budget | delta | noise multiplier | sample rate | "
            "declined rounds | ledger |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for site in sites:
            st = self.sites[site]
            declined = ", ".join(str(r) for r in st["declined_rounds"]) or "none"
            lines.append(
                f"| {site} | {st['epsilon']:.4f} | {st['budget_epsilon']:g} | "
                f"{st['delta']:g} | {st['noise_multiplier']:.4f} | {st['sample_rate']:.4f} | "
                f"{declined} | `{st['ledger']}` |"
            )
        lines += [
            "",
            "## Epsilon per site and round (lifetime, after the round)",
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
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        """Epsilon over rounds, one panel per site (sites on the same target draw the same
        curve), each against its budget (dashed); x: a round the site declined."""
        sites = sorted(self.sites)
        with panels(path, sites, xlabel="round", ylabel="lifetime epsilon", integer_x=True) as axes:
            for ax, site in zip(axes, sites, strict=True):
                spends = [s for s in self.spends if s.site == site]
                ax.plot([s.round for s in spends], [s.epsilon for s in spends], "o-",
                        color="C0", label="lifetime epsilon")  # fmt: skip
                ax.axhline(self.sites[site]["budget_epsilon"], color="C3", ls="--", lw=1,
                           label="budget")  # fmt: skip
                declined = [s for s in spends if s.declined]
                ax.scatter([s.round for s in declined], [s.epsilon for s in declined],
                           marker="x", s=80, color="C3", label="declined")  # fmt: skip
                ax.set_ylim(bottom=0.0)
