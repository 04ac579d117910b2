"""The evaluation release: what a DP site's test records give away, how it is accounted, and
that its ledger entries compose in their own split and verify independently."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedmed.audit.verify import verify_ledger
from fedmed.config.schema import evaluation_rounds
from fedmed.coordinator.privacy_log import PrivacyLog
from fedmed.data import load_site
from fedmed.errors import ConfigError, FedMedError
from fedmed.metrics import (
    RELEASED_MARGIN_EDGES,
    EvalStats,
    auc_from_histograms,
    binormal_auc,
    released_counts,
    split_held_out,
    stats_from_counts,
)
from fedmed.models import build_loss, build_model
from fedmed.privacy.accounting import DPSteps, cumulative_epsilon
from fedmed.privacy.budget import PrivacyAccount, SitePolicy
from fedmed.privacy.evaluation import (
    PERSONAL_SENSITIVITY,
    add_noise,
    evaluation_noise_multiplier,
    evaluation_steps,
)
from fedmed.privacy.ledger import append_entry, load_or_create_signing_key
from fedmed.privacy.mechanisms import DP_SGD, EVALUATION, EVALUATION_COUNTS, TRAIN
from fedmed.protocol import EvaluateReport, PrivacyReport, RecordError
from fedmed.runs.compose import compose_config
from fedmed.runs.exact_evaluation import exact_evaluation
from fedmed.train import evaluate

EDGES = list(RELEASED_MARGIN_EDGES)


@pytest.fixture(scope="module")
def heart_stats() -> list[EvalStats]:
    """Each heart hospital's exact evaluation of a (seeded, untrained) svm."""
    cfg = compose_config(["dataset=heart", "model=svm"])
    model = build_model(cfg.model.name, load_site(cfg, 0).schema, 3)
    loss_fn = build_loss(cfg.model.name)
    sites = [load_site(cfg, i) for i in range(4)]
    return [evaluate(model, loss_fn, s.x_test, s.y_test, s.num_classes) for s in sites]


def test_each_test_record_is_counted_exactly_once(heart_stats: list[EvalStats]) -> None:
    for stats in heart_stats:
        counts = released_counts(stats, EDGES)
        bins = len(EDGES) + 1
        assert counts.sum() == stats.num_examples
        assert stats.hist_pos is not None and counts[:bins].sum() == stats.hist_pos.sum()


def test_one_record_more_changes_the_counts_by_one_in_l2(heart_stats: list[EvalStats]) -> None:
    """The Gaussian mechanism's sensitivity: add any one patient, in any bin."""
    stats = heart_stats[0]
    assert stats.hist_pos is not None and stats.hist_neg is not None
    before = released_counts(stats, EDGES)
    for index in (0, 1500, 1600, 1700, 3199):  # margins -16, -1, 0, 1, 16
        hist = stats.hist_neg.copy()
        hist[index] += 1
        after = released_counts(dataclasses.replace(stats, hist_neg=hist), EDGES)
        assert np.linalg.norm(after - before) == 1.0


def test_noiseless_counts_give_the_exact_accuracy_and_the_binormal_auc(
    heart_stats: list[EvalStats],
) -> None:
    summed = np.sum([released_counts(s, EDGES) for s in heart_stats], axis=0)
    exact = EvalStats.merge(heart_stats)
    figures = stats_from_counts(summed, exact.num_examples, EDGES)
    assert figures.accuracy == pytest.approx(exact.accuracy, abs=1e-12)
    for rate in ("sensitivity", "specificity", "balanced_accuracy"):  # whole bins at 0
        assert getattr(figures, rate) == pytest.approx(getattr(exact, rate), abs=1e-12), rate
    assert figures.loss is None  # no loss is released
    bins = len(EDGES) + 1
    assert figures.auc is not None  # an untrained model: margins all near 0 (fit below)
    assert figures.auc == binormal_auc(summed[:bins], summed[bins:], EDGES)


def test_the_binormal_fit_recovers_an_auc_that_ties_inside_bins_understate() -> None:
    """Normal margins with a known AUC, Phi(1.5 / sqrt(1 + 1.5^2)) = 0.798: counted in 4
    bins per class, ties-as-halves says 0.780; the binormal fit gives it back."""
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1.0, 1.5, 200_000), rng.normal(-0.5, 1.0, 200_000)
    bins = [-np.inf, *EDGES, np.inf]
    hist_pos, hist_neg = np.histogram(pos, bins)[0], np.histogram(neg, bins)[0]
    truth = NormalDist().cdf(1.5 / math.hypot(1.5, 1.0))
    assert auc_from_histograms(hist_pos, hist_neg) < truth - 0.015  # type: ignore[operator]
    assert binormal_auc(hist_pos, hist_neg, EDGES) == pytest.approx(truth, abs=0.005)
    assert binormal_auc(hist_pos, hist_neg, [0.0]) is None  # one edge fits no normal
    assert binormal_auc(np.zeros(4), hist_neg, EDGES) is None


def test_the_known_number_of_records_takes_half_the_noise_off_the_accuracy(
    heart_stats: list[EvalStats],
) -> None:
    """4 sites, sigma 2.58 (one evaluation at epsilon 1): the accuracy sums 4 of the 8
    counts; its noise sd is 2 x 2.58 x 2 / 230 = 0.045 as summed, 0.032 once the counts are
    made to add up to the public 230 (their least-squares estimate)."""
    exact = EvalStats.merge(heart_stats)
    counts = [released_counts(s, EDGES) for s in heart_stats]
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(4000):
        noisy = np.sum([add_noise(c, 2.58, rng) for c in counts], axis=0)
        errors.append(stats_from_counts(noisy, exact.num_examples, EDGES).accuracy - exact.accuracy)
    assert np.mean(errors) == pytest.approx(0.0, abs=0.003)
    assert np.std(errors) == pytest.approx(2**0.5 * 2.58 * 2 / 230, rel=0.08)


def test_the_noise_has_the_stated_deviation_and_seeds_reproduce_it() -> None:
    counts = np.full(200_000, 5.0)
    noisy = add_noise(counts, 2.5, np.random.default_rng(7))
    assert np.std(noisy - counts) == pytest.approx(2.5, rel=0.01)
    assert np.array_equal(noisy, add_noise(counts, 2.5, np.random.default_rng(7)))
    assert not np.array_equal(add_noise(counts, 2.5), add_noise(counts, 2.5))  # OS randomness
    # a release counting each record twice (global and personal model): the noise scales
    scaled = add_noise(counts, 2.5, np.random.default_rng(7), PERSONAL_SENSITIVITY)
    assert np.std(scaled - counts) == pytest.approx(2.5 * 2**0.5, rel=0.01)


def test_a_held_out_vector_splits_back_into_its_parts() -> None:
    test, validation, own = (np.full(8, float(v)) for v in (1, 2, 3))
    counts = np.concatenate([test, validation, own])
    back = split_held_out(counts, with_validation=True, with_personal=True)
    assert [p.tolist() for p in back if p is not None] == [test.tolist(), validation.tolist(),
                                                            own.tolist()]  # fmt: skip
    test_only, none, personal = split_held_out(np.concatenate([test, own]), False, True)
    assert none is None and test_only.tolist() == test.tolist()
    assert personal is not None and personal.tolist() == own.tolist()


def test_one_evaluation_is_opacus_gaussian_mechanism_exactly() -> None:
    """Sample rate 1, one step: RDP of the plain Gaussian mechanism, alpha / (2 sigma^2)."""
    sigma, delta = 2.58, 1e-3
    eps = cumulative_epsilon([evaluation_steps(sigma)], delta, "rdp")
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=orders)
    assert np.allclose(rdp, np.array(orders) / (2 * sigma**2))
    assert eps == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


@pytest.mark.parametrize(
    ("overrides", "rounds"),
    [
        (["privacy=none"], list(range(1, 11))),
        (["privacy=dp"], [10]),
        (["privacy=dp", "federation.evaluate_every=3"], [3, 6, 9, 10]),
        (["privacy=none", "federation.evaluate_every=0"], [10]),
    ],
)
def test_evaluation_rounds_follow_evaluate_every(overrides: list[str], rounds: list[int]) -> None:
    assert evaluation_rounds(compose_config(["dataset=heart", *overrides])) == rounds


def test_the_evaluation_noise_is_calibrated_for_the_planned_evaluations(tmp_path: Path) -> None:
    policy = SitePolicy("va", 1.0, 1e-3, "prv", tmp_path / "va.ledger.jsonl", tmp_path / "va.key")
    for every, evaluations in ((None, 1), (2, 5), (1, 10)):
        extra = [] if every is None else [f"federation.evaluate_every={every}"]
        cfg = compose_config(["dataset=heart", "privacy=dp", *extra])
        sigma = evaluation_noise_multiplier(cfg, policy)
        eps = cumulative_epsilon([evaluation_steps(sigma)] * evaluations, 1e-3, "prv")
        assert 0.999 <= eps <= 1.0, (every, sigma, eps)
    cfg = compose_config(["dataset=heart", "privacy=dp", "privacy.evaluation_epsilon=4"])
    assert evaluation_noise_multiplier(cfg, policy) < 1.0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("privacy.evaluation_margin_edges=[-1,1]", r"privacy\.evaluation_margin_edges.*0 \(the"),
        ("privacy.evaluation_margin_edges=[1,0]", r"privacy\.evaluation_margin_edges.*increase"),
        ("privacy.evaluation_margin_edges=[0,0.005]", r"privacy\.evaluation_margin_edges.*0\.01"),
        ("privacy.evaluation_epsilon=50", r"privacy\.evaluation_epsilon=50"),
        ("federation.evaluate_every=-1", r"federation\.evaluate_every=-1"),
    ],
)
def test_bad_evaluation_settings_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        compose_config(["dataset=heart", "privacy=dp", override])


def _account(tmp_path: Path, budget: float = 1.0) -> PrivacyAccount:
    policy = SitePolicy(
        "va", budget, 1e-3, "prv", tmp_path / "va.ledger.jsonl", tmp_path / "k" / "va.key"
    )
    return PrivacyAccount(policy)


def _record(account: PrivacyAccount, planned: DPSteps, split: str, server_round: int) -> None:
    decision = account.decide(planned, run_id="r", split=split)
    assert decision.train, decision.reason
    account.record(
        planned, decision.epsilon, run_id="r", server_round=server_round, dataset_size=150,
        sensitivity=1.0, config_hash="c", code_version="test", split=split,
        mechanism=DP_SGD if split == TRAIN else EVALUATION_COUNTS,
    )  # fmt: skip


def test_each_split_composes_its_own_releases_and_the_record_takes_the_worse(
    tmp_path: Path,
) -> None:
    account = _account(tmp_path)
    training, release = DPSteps(2.0, 0.1, 10), evaluation_steps(4.0)
    for server_round in (1, 2):
        _record(account, training, TRAIN, server_round)
    _record(account, release, EVALUATION, 2)
    train_eps = cumulative_epsilon([training, training], 1e-3, "prv")
    eval_eps = cumulative_epsilon([release], 1e-3, "prv")
    assert account.split_epsilons() == {TRAIN: train_eps, EVALUATION: eval_eps}
    [*_, last] = PrivacyAccount(account.policy).entries
    assert last.split == EVALUATION and last.epsilon == eval_eps
    assert last.record_epsilon == max(train_eps, eval_eps) and last.sensitivity == 1.0
    assert verify_ledger(account.policy.ledger).ok


def test_an_evaluation_beyond_the_budget_is_declined_whatever_training_spent(
    tmp_path: Path,
) -> None:
    account = _account(tmp_path, budget=1.0)
    release = evaluation_steps(2.6)  # about epsilon 0.99 at delta 1e-3
    _record(account, release, EVALUATION, 1)
    assert account.decide(DPSteps(2.0, 0.1, 10), run_id="r", split=TRAIN).train
    second = account.decide(release, run_id="r", split=EVALUATION)
    assert not second.train
    assert "this evaluation would take the evaluation records' epsilon" in second.reason
    assert second.epsilon == account.epsilon(split=EVALUATION)


def _signed_ledger(tmp_path: Path, entries: list[dict[str, object]]) -> Path:
    path = tmp_path / "va.ledger.jsonl"
    key = load_or_create_signing_key(tmp_path / "va.key", path.with_suffix(".pub"))
    previous = "0" * 64
    for fields in entries:
        previous = append_entry(path, fields, key, previous)["hash"]
    return path


def test_verify_names_an_entry_whose_split_or_record_epsilon_is_wrong(tmp_path: Path) -> None:
    account = _account(tmp_path / "site")
    _record(account, DPSteps(2.0, 0.1, 10), TRAIN, 1)
    _record(account, evaluation_steps(4.0), EVALUATION, 1)
    honest = [e.as_dict() for e in account.entries]
    chain = ("hash", "signature", "prev_hash")
    bodies = [{k: v for k, v in e.items() if k not in chain} for e in honest]
    wrong_split = [bodies[0], {**bodies[1], "split": "train"}]
    audit = verify_ledger(_signed_ledger(tmp_path / "a", wrong_split))
    assert [f.check for f in audit.findings] == ["mechanism"]
    assert "touches the evaluation records" in audit.findings[0].message
    understated = [bodies[0], {**bodies[1], "record_epsilon": 0.01}]
    audit = verify_ledger(_signed_ledger(tmp_path / "b", understated))
    assert [(f.line, f.check) for f in audit.findings] == [(2, "recomputation")]
    assert "record_epsilon 0.0100 is not the larger" in audit.findings[0].message


def test_a_private_evaluate_report_round_trips_and_a_bad_one_names_the_key() -> None:
    privacy = PrivacyReport(0.9, 1.0, 1e-3, 2.58, 1.0, 1, "va.ledger.jsonl", "prv", "ab" * 32)
    counts = np.arange(8, dtype=np.float64) - 0.5
    report = EvaluateReport("va", num_examples=50, noisy_counts=counts, privacy=privacy)
    back = EvaluateReport.from_metrics(report.to_metrics())
    assert back.site == "va" and back.num_examples == 50 and back.privacy == privacy
    assert back.noisy_counts is not None and np.array_equal(back.noisy_counts, counts)
    masked = EvaluateReport("va", num_examples=50, privacy=privacy).to_metrics()
    assert EvaluateReport.from_metrics(masked, masked=True).noisy_counts is None
    with pytest.raises(RecordError, match="lacks noisy_counts"):
        EvaluateReport.from_metrics(masked)
    with pytest.raises(RecordError, match="sent beside SecAgg"):
        EvaluateReport.from_metrics(report.to_metrics(), masked=True)
    with pytest.raises(RecordError, match="not float64 bytes"):
        EvaluateReport.from_metrics({**report.to_metrics(), "noisy_counts": b"abc"})


def test_exact_evaluation_refuses_a_folder_that_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(FedMedError, match=r"no global_model\.pt"):
        exact_evaluation(tmp_path)


def test_a_site_sampled_only_to_evaluate_is_summarised(tmp_path: Path) -> None:
    """benchmarks/scale.py: with fraction < 1 a site may evaluate in a run it never trained in
    (its summary then lacks DP-SGD's noise; it crashed writing summary.json)."""
    log = PrivacyLog(compose_config(["dataset=heart", "privacy=dp"]))
    report = PrivacyReport(0.9, 1.0, 1e-3, 2.58, 1.0, 1, "va.ledger.jsonl", "prv", "ab" * 32)
    log.record_evaluation(10, "va", report)
    assert log.run_summary()["noise_multiplier"] == {}
    summary = log.site_summary("va")
    assert summary is not None and summary["record_epsilon"] == 0.9
    assert "evaluation 10" not in log.report() and "| va | 0.9000 |" in log.report()
