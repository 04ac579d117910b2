"""``fedmed dry-run``: which sites would decline which rounds, before anyone trains.

For each site: its policy from its kit exactly as the site derives it (``fedmed.site.policy``:
a simulated site without a kit gets the generated one), whether it would refuse the run, its
training-record count (the only thing read from its data), the noise the site would use
(explicit, or calibrated exactly as the site calibrates it), the steps per round of its
Poisson loader, and what its own ledger has already spent, per split. The site's budget rule
(``fedmed.privacy.budget.decide``, with the kit's cap on one run) is then applied round by
round, with the same accountant, without writing anything: to each round's training, and to
each evaluation (``federation.evaluate_every``) on the test split, with the evaluation noise
the site would calibrate. Every site is assumed to be sampled every round (the worst case
for budgets).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmed.config.schema import (
    FedMedConfig,
    evaluation_rounds,
    personal_epochs,
    sites_per_round,
)
from fedmed.data import load_site, num_sites, site_kit
from fedmed.errors import FedMedError, SiteError
from fedmed.privacy.accounting import DPSteps, cumulative_epsilon
from fedmed.privacy.budget import SitePolicy, check_delta, decide, dp_config, site_policy
from fedmed.privacy.dp_sgd import poisson_plan, run_noise_multiplier
from fedmed.privacy.evaluation import evaluation_noise_multiplier, evaluation_steps
from fedmed.privacy.ledger import (
    LedgerEntry,
    load_public_key,
    mark_path,
    mark_problem,
    parse_entries,
    read_mark,
    read_verified,
)
from fedmed.privacy.mechanisms import EVALUATION, TRAIN
from fedmed.site.policy import SiteRuntime, SiteSetup, check_noise, check_run, site_setup
from fedmed.train import TrainSettings

log = logging.getLogger(__name__)


@dataclass
class SiteProjection:
    """One site's planned spend against its remaining lifetime budget."""

    site: str
    records: int
    ledger: str
    delta: float
    budget_epsilon: float
    spent_epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    accountant: str = "prv"
    epsilon_by_round: list[float] = field(default_factory=list)
    declines_from_round: int | None = None
    reason: str = ""
    refuses: str = ""  # the site would refuse the run (its kit owns what the run changes)
    # The held-out records (test, and validation under a threshold rule): each evaluation is
    # one Gaussian release of their counts.
    test_records: int = 0
    evaluation_noise_multiplier: float = 0.0
    evaluation_spent_epsilon: float = 0.0
    evaluation_epsilon_by_round: dict[int, float] = field(default_factory=dict)
    evaluation_declines_from_round: int | None = None
    evaluation_reason: str = ""
    # personalization=finetune: the fine-tuning's DP-SGD after the last round
    personal_epsilon: float | None = None
    personal_reason: str = ""


def _spent(ledger: Path, public_key: Path, mark_file: Path) -> list[LedgerEntry]:
    """What the site's ledger already holds (verified, read only); nothing for a new ledger.

    A ledger that is missing, cut short or replaced against the site's high-water mark is
    refused exactly as the site refuses it (SiteError), so the projection never starts from a
    shorter history than the site has spent.
    """
    if not ledger.exists() and not public_key.exists():
        return []  # a site that never trained
    key = load_public_key(public_key)
    entries = read_verified(ledger, key) if ledger.exists() else []
    mark = read_mark(mark_file, key)
    problem = mark_problem(ledger, mark, entries, mark_file) if mark is not None else None
    if mark is not None and problem is not None:
        raise SiteError(mark.site, f"ledger {ledger} {problem}")
    return parse_entries(ledger, entries)


def _setup(cfg: FedMedConfig, index: int, run_dir: Path, deployed: bool) -> SiteSetup:
    """The site's kit as the site itself would apply it; ``deployed``: the kits' own ledgers."""
    if not deployed:
        return site_setup(cfg, index, SiteRuntime("dry-run", run_dir / "ledgers", False))
    kit = site_kit(cfg, index)
    if kit is None:
        raise FedMedError(
            "dry-run --deployed reads each site's kit: list them in dataset.site_kits "
            "(e.g. dataset=heart_kits)"
        )
    return SiteSetup(kit, deployed=True)


def _refused(name: str, reason: str) -> SiteProjection:
    return SiteProjection(
        site=name, records=0, ledger="", delta=0.0, budget_epsilon=0.0, spent_epsilon=0.0,
        noise_multiplier=0.0, sample_rate=0.0, steps_per_round=0, declines_from_round=1,
        refuses=reason,
    )  # fmt: skip


def project_site(cfg: FedMedConfig, index: int, run_dir: Path, deployed: bool) -> SiteProjection:
    """Apply the site's budget rule to every planned round, without training or writing."""
    setup = _setup(cfg, index, run_dir, deployed)
    try:
        check_run(cfg, setup)
        policy = site_policy(setup.kit)
    except SiteError as err:
        return _refused(setup.name, str(err))
    data = load_site(cfg, index)
    records, test_records = len(data.y_train), data.held_out_records  # test (+ validation)
    check_delta(policy.site, policy.delta, records)
    check_delta(policy.site, policy.delta, test_records, records="held-out (test and validation)")
    sigma = run_noise_multiplier(cfg, policy, records)
    try:
        check_noise(setup, cfg, sigma)
    except SiteError as err:
        return _refused(setup.name, str(err))
    settings = TrainSettings.from_config(cfg)
    plan = poisson_plan(records, settings.batch_size, settings.epochs, sigma)
    try:
        entries = _spent(policy.ledger, policy.public_key, mark_path(policy.signing_key))
    except SiteError as err:
        return _refused(setup.name, str(err))
    spent = [e.dp_steps for e in entries if e.split_name == TRAIN]
    evaluated = [e.dp_steps for e in entries if e.split_name == EVALUATION]
    evaluation_sigma = evaluation_noise_multiplier(cfg, policy)
    projection = SiteProjection(
        site=policy.site,
        records=records,
        ledger=str(policy.ledger),
        delta=policy.delta,
        budget_epsilon=policy.budget_epsilon,
        spent_epsilon=cumulative_epsilon(spent, policy.delta, policy.accountant),
        noise_multiplier=sigma,
        sample_rate=plan.sample_rate,
        steps_per_round=plan.steps,
        accountant=policy.accountant,
        test_records=test_records,
        evaluation_noise_multiplier=evaluation_sigma,
        evaluation_spent_epsilon=cumulative_epsilon(evaluated, policy.delta, policy.accountant),
    )
    this_run: list[DPSteps] = []
    for server_round in range(1, cfg.federation.rounds + 1):
        decision = decide(spent, plan, policy, this_run)
        if decision.train:
            spent, this_run = [*spent, plan], [*this_run, plan]
        elif projection.declines_from_round is None:
            projection.declines_from_round = server_round
            projection.reason = decision.reason
        projection.epsilon_by_round.append(decision.epsilon)
    if personal_epochs(cfg):
        personal = poisson_plan(records, settings.batch_size, personal_epochs(cfg), sigma)
        decision = decide(spent, personal, policy, this_run)
        projection.personal_epsilon = decision.epsilon
        projection.personal_reason = "" if decision.train else decision.reason
    _project_evaluations(projection, cfg, policy, evaluated)
    return projection


def _project_evaluations(
    projection: SiteProjection, cfg: FedMedConfig, policy: SitePolicy, spent: list[DPSteps]
) -> None:
    """The site's budget rule on each planned evaluation of its test split."""
    release = evaluation_steps(projection.evaluation_noise_multiplier)
    this_run: list[DPSteps] = []
    for server_round in evaluation_rounds(cfg):
        decision = decide(spent, release, policy, this_run, EVALUATION)
        if decision.train:
            spent, this_run = [*spent, release], [*this_run, release]
        elif projection.evaluation_declines_from_round is None:
            projection.evaluation_declines_from_round = server_round
            projection.evaluation_reason = decision.reason
        projection.evaluation_epsilon_by_round[server_round] = decision.epsilon


def run_ends_at(projections: list[SiteProjection], cfg: FedMedConfig) -> int | None:
    """The first round in which fewer than ``federation.min_sites`` sites would train."""
    needed = cfg.federation.min_sites
    for server_round in range(1, cfg.federation.rounds + 1):
        training = sum(
            p.declines_from_round is None or p.declines_from_round > server_round
            for p in projections
        )
        if training < needed:
            return server_round
    return None


def format_projection(projections: list[SiteProjection], cfg: FedMedConfig) -> str:
    """The table for people, and what it means for the run."""
    dp = dp_config(cfg)
    assert dp is not None
    settings = TrainSettings.from_config(cfg)
    noise = (
        f"privacy.noise_multiplier={dp.noise_multiplier}"
        if dp.noise_multiplier
        else f"noise calibrated for privacy.target_epsilon={dp.target_epsilon}"
    )
    rounds = cfg.federation.rounds
    accountants = sorted({p.accountant for p in projections if not p.refuses}) or ["-"]
    lines = [
        f"dry run: {rounds} rounds x {settings.epochs} local epoch(s), "
        f"batch {settings.batch_size}, {noise}, accountant {'/'.join(accountants)} (the "
        "sites' kits); no training, nothing written to any ledger",
        f"{'site':<14}{'records':>8}{'q':>8}{'noise':>8}{'steps/rd':>9}{'spent':>8}"
        f"{'budget':>8}{f'after {rounds} rds':>13}  declines",
    ]
    for p in projections:
        if p.refuses:
            lines.append(f"{p.site:<14}{'refuses the run':>62}")
            continue
        declines = f"from round {p.declines_from_round}" if p.declines_from_round else "none"
        lines.append(
            f"{p.site:<14}{p.records:>8}{p.sample_rate:>8.4f}{p.noise_multiplier:>8.4f}"
            f"{p.steps_per_round:>9}{p.spent_epsilon:>8.4f}{p.budget_epsilon:>8g}"
            f"{p.epsilon_by_round[-1]:>13.4f}  {declines}"
        )
    evaluations = evaluation_rounds(cfg)
    lines.append(
        f"evaluations after round(s) {', '.join(map(str, evaluations))} "
        "(federation.evaluate_every), each a Gaussian release of the test split's counts:"
    )
    lines.append(
        f"{'site':<14}{'records':>8}{'noise':>8}{'spent':>8}{'budget':>8}"
        f"{f'after {len(evaluations)} evals':>15}  declines"
    )
    for p in projections:
        if p.refuses:
            continue
        first = p.evaluation_declines_from_round
        lines.append(
            f"{p.site:<14}{p.test_records:>8}{p.evaluation_noise_multiplier:>8.4f}"
            f"{p.evaluation_spent_epsilon:>8.4f}{p.budget_epsilon:>8g}"
            f"{p.evaluation_epsilon_by_round[evaluations[-1]]:>15.4f}  "
            + (f"from round {first}" if first else "none")
        )
    for p in projections:
        if p.refuses:
            lines.append(f"  {p.refuses}")
            continue
        if p.reason:
            lines.append(f"  {p.site}, round {p.declines_from_round}: {p.reason}")
        if p.evaluation_reason:
            lines.append(
                f"  {p.site}, evaluation {p.evaluation_declines_from_round}: "
                f"{p.evaluation_reason}"
            )
        if p.personal_epsilon is not None:
            outcome = f"declined: {p.personal_reason}" if p.personal_reason else (
                f"training epsilon {p.personal_epsilon:.4f} after it")
            lines.append(f"  {p.site}, fine-tuning its personal model "
                         f"({personal_epochs(cfg)} epoch(s)): {outcome}")  # fmt: skip
    sampled = sites_per_round(cfg.federation, len(projections))
    end = run_ends_at(projections, cfg)
    if end is None:
        lines.append(
            f"federation: all {rounds} rounds can run (>= {cfg.federation.min_sites} "
            f"sites train in each; {sampled} sampled per round, assumed all)"
        )
    else:
        refusing = sum(bool(p.refuses) for p in projections)
        lines.append(
            f"federation: the run would stop in round {end}: fewer than "
            f"federation.min_sites={cfg.federation.min_sites} sites could train "
            + (f"({refusing} refuse the run)" if refusing else "(status budget_exhausted)")
        )
    return "\n".join(lines)


def dry_run(cfg: FedMedConfig, output_dir: Path, deployed: bool) -> int:
    """Print the projection and write ``dry_run.json``; exit 0 when the run would complete
    with every site taking part (1 when it would stop early or a site would refuse it)."""
    if dp_config(cfg) is None:
        raise FedMedError("dry-run projects privacy budgets: set privacy=dp")
    projections = [project_site(cfg, i, output_dir, deployed) for i in range(num_sites(cfg))]
    log.info(format_projection(projections, cfg))
    end = run_ends_at(projections, cfg)
    (output_dir / "dry_run.json").write_text(
        json.dumps({"stops_at_round": end, "sites": [asdict(p) for p in projections]}, indent=2)
        + "\n"
    )
    return 0 if end is None and not any(p.refuses for p in projections) else 1
