"""DP-SGD at a site on real data: clipping, noise scale, accounting and the site's own budget.

Everything runs the real site code (``HospitalSite.fit``) or the real Opacus wrapping that the
site uses, on the bundled heart-disease and PneumoniaMNIST data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmed.config.schema import FedMedConfig
from fedmed.data import load_site
from fedmed.errors import SiteError
from fedmed.kits.site import load_site_kit
from fedmed.models import build_loss, build_model
from fedmed.privacy.accounting import DPSteps, cumulative_epsilon
from fedmed.privacy.budget import check_delta, site_policy
from fedmed.privacy.dp_sgd import DpSgdSettings, make_private_training, poisson_plan
from fedmed.site.client import HospitalSite, SiteRuntime
from fedmed.site.policy import site_setup
from fedmed.train import TrainSettings, get_weights
from tests.e2e import REPO, run_fedmed

pytestmark = pytest.mark.cost(100)  # seconds, the file alone on 2 cores

SWITZERLAND = 2  # the smallest heart-disease hospital: 92 training records
MODES = ["ghost", "hooks"]


def _settings(batch_size: int) -> TrainSettings:
    return TrainSettings(epochs=1, batch_size=batch_size, lr=0.1, momentum=0.0, weight_decay=0.0)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", MODES)
def test_every_per_sample_gradient_is_clipped_to_max_grad_norm(
    compose: Callable[..., FedMedConfig], mode: str
) -> None:
    """Batch size 1, no noise: the update of one record is exactly its clipped gradient."""
    cfg = compose("dataset=heart", "model=svm")
    site = load_site(cfg, 0)
    x = site.x_train * 50.0  # large inputs: most raw per-sample gradient norms exceed C
    max_norm = 0.5
    model = build_model(cfg.model.name, site.schema, 0)
    private = make_private_training(
        model,
        build_loss(cfg.model.name),
        x,
        site.y_train,
        _settings(batch_size=1),
        DpSgdSettings(0.0, max_norm, mode, "prv"),
        rng=torch.Generator().manual_seed(0),
    )
    assert private.optimizer.expected_batch_size == 1
    norms = []
    for i in range(40):
        private.optimizer.zero_grad()
        loss = private.loss_fn(
            private.model(torch.from_numpy(x[i : i + 1])), torch.from_numpy(site.y_train[i : i + 1])
        )
        loss.backward()
        private.optimizer.pre_step()  # clip, add (zero) noise, scale
        norms.append(float(_flat_grad(private.model).norm()))
    assert max(norms) <= max_norm * (1 + 1e-4)
    clipped = [n for n in norms if n > 0.99 * max_norm]
    assert len(clipped) >= 20, norms  # the bound was actually active


@pytest.mark.parametrize("mode", MODES)
def test_noise_of_one_step_has_std_noise_multiplier_times_max_grad_norm(
    compose: Callable[..., FedMedConfig], mode: str
) -> None:
    """An empty Poisson batch releases pure noise; its std must be sigma * C (CNN, 420k values).

    Fixed seed; the sample std must fall inside the two-sided 99.9% chi-square interval.
    """
    cfg = compose("dataset=pneumonia", "model=cnn")
    site = load_site(cfg, 0)
    sigma, max_norm = 1.3, 0.7
    model = build_model(cfg.model.name, site.schema, 0)
    private = make_private_training(
        model,
        build_loss(cfg.model.name),
        site.x_train,
        site.y_train,
        _settings(batch_size=1),  # expected batch size 1: no rescaling of the noise
        DpSgdSettings(sigma, max_norm, mode, "prv"),
        rng=torch.Generator().manual_seed(1234),
    )
    private.optimizer.zero_grad()
    empty_x = torch.from_numpy(site.x_train[:0])
    loss = private.loss_fn(private.model(empty_x), torch.from_numpy(site.y_train[:0]))
    loss.backward()
    private.optimizer.pre_step()
    noise = _flat_grad(private.model).double().numpy()
    n = noise.size
    assert n > 400_000
    expected = sigma * max_norm
    low, high = stats.chi2.ppf([0.0005, 0.9995], df=n)
    sample_var = float((noise**2).mean())  # the mean is known to be 0
    assert low / n * expected**2 <= sample_var <= high / n * expected**2, (
        np.sqrt(sample_var),
        expected,
    )
    assert abs(noise.mean()) < 5 * expected / np.sqrt(n)


def _site(cfg: FedMedConfig, index: int, tmp_path: Path, run_id: str = "run-1") -> HospitalSite:
    return HospitalSite(cfg, index, SiteRuntime(run_id, tmp_path / "ledgers", False))


def _fit(site: HospitalSite, server_round: int) -> tuple[list[np.ndarray], int, dict]:
    global_weights = get_weights(build_model(site.cfg.model.name, site.data.schema, 0))
    return site.fit(global_weights, {"server_round": server_round})


def _ledger(site: HospitalSite) -> list[dict]:
    path = site.runtime.ledger_dir / f"{site.name}.ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("dataset", "model", "index"),
    [("heart", "svm", SWITZERLAND), ("heart", "logreg", 0), ("pneumonia", "cnn", 1)],
)
def test_each_model_trains_privately_and_the_ledger_epsilon_recomputes(
    compose: Callable[..., FedMedConfig], tmp_path: Path, dataset: str, model: str, index: int
) -> None:
    cfg = compose(
        f"dataset={dataset}", f"model={model}", "privacy=dp", "federation.rounds=3",
        "privacy.target_epsilon=2", "privacy.delta=1e-4",
    )  # fmt: skip
    site = _site(cfg, index, tmp_path)
    epsilons = []
    for server_round in (1, 2, 3):
        delta, n, metrics = _fit(site, server_round)
        assert n == len(site.data.y_train) and "declined" not in metrics
        assert all(np.isfinite(d).all() for d in delta)
        assert any(np.abs(d).max() > 0 for d in delta)
        epsilons.append(metrics["epsilon"])
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 2.0
    entries = _ledger(site)
    assert [e["round"] for e in entries] == [1, 2, 3]
    for i, entry in enumerate(entries):
        plan = poisson_plan(n, cfg.model.batch_size, 1, entry["noise_multiplier"])
        assert (entry["sample_rate"], entry["steps"]) == (plan.sample_rate, plan.steps)
        assert entry["dataset_size"] == n and entry["mechanism"] == "dp_sgd_poisson_gaussian"
        records = [DPSteps(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        recomputed = cumulative_epsilon(
            records[: i + 1],
            entry["delta"],
            entry["accountant"]["name"],
        )
        assert entry["epsilon"] == pytest.approx(recomputed, rel=1e-9)
        assert entry["epsilon"] == pytest.approx(epsilons[i], rel=1e-12)
    # The noise was calibrated once for the run: every round used the same multiplier.
    assert len({e["noise_multiplier"] for e in entries}) == 1


def test_delta_above_one_over_n_is_refused(
    compose: Callable[..., FedMedConfig], tmp_path: Path
) -> None:
    with pytest.raises(SiteError, match=r"site 'switzerland': delta=0.02 is larger than 1/92"):
        check_delta("switzerland", 0.02, 92)
    cfg = compose("dataset=heart", "privacy=dp", "privacy.delta=0.02")
    with pytest.raises(SiteError, match=r"site 'switzerland': delta=0.02"):
        _fit(_site(cfg, SWITZERLAND, tmp_path), 1)


class CrashAfterLedger(RuntimeError):
    """Stands for the site process dying after its ledger entry, before the update is sent."""


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    budget=st.floats(0.2, 3.0),
    sigma=st.floats(0.8, 3.0),
    rounds=st.integers(1, 7),
    crashes=st.sets(st.integers(1, 7), max_size=3),
)
def test_budget_is_never_overrun_and_no_update_leaves_unrecorded(
    compose: Callable[..., FedMedConfig],
    tmp_path_factory: pytest.TempPathFactory,
    budget: float,
    sigma: float,
    rounds: int,
    crashes: set[int],
) -> None:
    cfg = compose(
        "dataset=heart", "model=svm", "privacy=dp", "privacy.target_epsilon=null",
        f"privacy.noise_multiplier={sigma}", f"privacy.budget_epsilon={budget}",
    )  # fmt: skip
    tmp = tmp_path_factory.mktemp("budget")
    site = _site(cfg, SWITZERLAND, tmp)
    original_release = site._release

    sent_rounds = []
    for server_round in range(1, rounds + 1):

        def update(*args: object, _round: int = server_round) -> object:
            if _round in crashes:
                raise CrashAfterLedger(f"killed in round {_round}")
            return original_release(*args)  # type: ignore[arg-type]

        site._release = update  # type: ignore[method-assign]
        try:
            _, n, metrics = _fit(site, server_round)
        except SiteError as err:
            assert "killed in round" in str(err)
            continue
        if "declined" not in metrics:
            sent_rounds.append(server_round)
        else:
            assert n == 0 and metrics["epsilon"] <= budget
    path = site.runtime.ledger_dir / "switzerland.ledger.jsonl"
    entries = _ledger(site) if path.exists() else []
    recorded_rounds = [e["round"] for e in entries]
    assert set(sent_rounds) <= set(recorded_rounds)  # never an unrecorded update
    final = cumulative_epsilon(
        [DPSteps(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries],
        site.setup.kit.privacy.delta,  # the generated kit's: privacy.delta null -> 1e-3
        "prv",
    )
    assert final <= budget  # never an overrun, crashed rounds included
    one_round = poisson_plan(92, cfg.model.batch_size, 1, sigma)
    if cumulative_epsilon([one_round], 1e-3, "prv") > budget:
        assert entries == []  # not even the first round fits: the site never trained


@pytest.mark.parametrize(
    "tamper",
    ["edit", "delete", "reorder", "truncate"],
)
def test_a_tampered_ledger_makes_the_site_refuse_naming_the_line(
    compose: Callable[..., FedMedConfig], tmp_path: Path, tamper: str
) -> None:
    cfg = compose("dataset=heart", "model=svm", "privacy=dp", "federation.rounds=4")
    site = _site(cfg, SWITZERLAND, tmp_path)
    for server_round in (1, 2, 3):
        _fit(site, server_round)
    path = site.runtime.ledger_dir / "switzerland.ledger.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if tamper == "edit":
        entry = json.loads(lines[1])
        entry["epsilon"] = entry["epsilon"] / 2
        lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        bad_line = 2
    elif tamper == "delete":
        del lines[1]
        bad_line = 2
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
        bad_line = 2
    else:
        lines[2] = lines[2][: len(lines[2]) // 2]
        bad_line = 3
    path.write_text("".join(lines))
    with pytest.raises(SiteError, match=rf"site 'switzerland': .*line {bad_line}\b"):
        _fit(site, 4)
    assert path.read_text() == "".join(lines)  # the site wrote nothing after refusing


def test_site_kits_set_each_hospitals_budget_and_ledger(
    compose: Callable[..., FedMedConfig], tmp_path: Path
) -> None:
    cfg = compose("dataset=heart_kits", "privacy=dp")
    simulated = SiteRuntime("run", tmp_path, False)
    sim = site_policy(site_setup(cfg, SWITZERLAND, simulated).kit)
    assert (sim.site, sim.budget_epsilon, sim.delta, sim.accountant) == (
        "switzerland", 2.0, 1e-3, "prv",
    )  # fmt: skip
    assert sim.ledger == tmp_path / "switzerland.ledger.jsonl"
    kit = load_site_kit(REPO / "sites" / "switzerland.yaml")
    deployed = site_policy(site_setup(cfg, 0, SiteRuntime("run", tmp_path, True, kit)).kit)
    assert deployed.ledger == REPO / "sites" / "ledgers" / "switzerland.ledger.jsonl"
    assert deployed.signing_key == REPO / "pki" / "sites" / "switzerland" / "ledger.key"
    assert deployed.public_key == deployed.ledger.with_suffix(".pub")
    persistent = compose("dataset=heart_kits", "privacy=dp", f"privacy.ledger_dir={tmp_path}/p")
    assert site_policy(site_setup(persistent, 0, simulated).kit).ledger == (
        tmp_path / "p" / "cleveland.ledger.jsonl"
    )
    plain = compose("dataset=heart", "privacy=dp", "privacy.target_epsilon=0.7")
    assert site_policy(site_setup(plain, 0, simulated).kit).budget_epsilon == 0.7


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["privacy.delta=0.008"],
            # (?m): switzerland's warning about its empty 'chol' column may come first
            r"(?m)^fedmed: site 'cleveland': delta=0.008 is larger than 1/227 .*; "
            r"site 'hungary': delta=0.008 is larger than 1/221 .*; "
            r"site 'va': delta=0.008 is larger than 1/150 .*at most 0.00667\n$",
        ),
        (["privacy.noise_multiplier=1.0"], r"privacy\.noise_multiplier=1\.0.*null when"),
        (["privacy.target_epsilon=0"], r"privacy\.target_epsilon=0\.0.*> 0"),
        (["privacy.delta=1"], r"privacy\.delta=1\.0.*\(0, 1\)"),
        (["privacy.accountant=moments"], r"privacy\.accountant.*moments"),
        (
            ["privacy.target_epsilon=null", "privacy.noise_multiplier=1.1"],
            r"privacy\.budget_epsilon=None.*lifetime budget",
        ),
    ],
)
def test_bad_privacy_settings_are_refused_before_training(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    proc = run_fedmed("simulate", "privacy=dp", *overrides, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_reproducible_noise_is_for_simulations_only(
    compose: Callable[..., FedMedConfig], tmp_path: Path, kit_copy: Callable[..., Path]
) -> None:
    cfg = compose("dataset=heart", "model=svm", "privacy=dp", "privacy.noise_seed=7")
    simulated = [_fit(_site(cfg, SWITZERLAND, tmp_path / f"s{i}"), 1)[0] for i in range(2)]
    for a, b in zip(*simulated, strict=True):
        np.testing.assert_array_equal(a, b)  # same seed, same sampling and noise
    kit = load_site_kit(kit_copy("switzerland"))
    with pytest.raises(SiteError, match=r"refuses the run: privacy\.noise_seed=7"):
        HospitalSite(cfg, 0, SiteRuntime("run", tmp_path / "d", True, kit))
    assert not (tmp_path / "ledgers").exists()
