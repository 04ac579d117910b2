"""Personal models (issue 18): they stay at the site, their steps are DP-SGD in the site's
ledger and budget, and MR-MTL's update is the hand-checked proximal step.

Real heart-disease simulations (4 hospitals, Ray), one shared per setting: DP fine-tuning
with every reply captured; MR-MTL without DP; DP fine-tuning under a budget that only
covers the shared rounds.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.compat.common.recorddict_compat import recorddict_to_fitres

from fedmed.config.schema import ModelName
from fedmed.coordinator.app import GLOBAL_MODEL_FILE
from fedmed.coordinator.releases import reply_values
from fedmed.data import load_site
from fedmed.data.types import DataSchema
from fedmed.errors import ConfigError
from fedmed.models import build_loss, build_model
from fedmed.privacy.accounting import cumulative_epsilon
from fedmed.privacy.dp_sgd import poisson_plan
from fedmed.protocol import PERSONAL_PREFIX, declared
from fedmed.runs.compose import compose_config
from fedmed.runs.simulation import simulate
from fedmed.site.client import PERSONAL_RELEASE
from fedmed.site.personal import MODEL_FILE, REPORT_FILE, REPORT_JSON
from fedmed.train import TrainSettings, evaluate, get_weights, make_loader, train_local
from tests.privacy.test_no_data_leaves import Reply, _spy

pytestmark = [pytest.mark.slow, pytest.mark.cost(45)]

SITES = ("cleveland", "hungary", "switzerland", "va")
HEART = ["dataset=heart", "model=svm", "federation.rounds=2"]
FINETUNE = ["personalization=finetune", "personalization.epochs=2"]
DP = ["privacy=dp", "privacy.noise_seed=0"]
FEDPER = ["dataset=pneumonia", "model=scatter", "federation.num_sites=4",
          "federation.rounds=2", "personalization=fedper"]  # fmt: skip
SIGMA = 1.0  # the budget run's fixed noise
OVER_BUDGET_EPOCHS = 10  # fine-tuning epochs no site's budget in that run covers


def _budget_overrides() -> list[str]:
    """A lifetime budget just above what the 2 shared rounds cost at every site, below what
    the fine-tuning's epochs would: the sites must decline the personal steps."""
    cfg = compose_config([*HEART, *DP])
    shared, with_personal = [], []
    for index in range(4):
        n = len(load_site(cfg, index).y_train)
        plan = poisson_plan(n, cfg.model.batch_size, 1, SIGMA)
        shared.append(cumulative_epsilon([plan] * 2, 1e-3, "prv"))
        with_personal.append(cumulative_epsilon([plan] * (2 + OVER_BUDGET_EPOCHS), 1e-3, "prv"))
    budget = max(shared) * 1.01
    assert budget < min(with_personal)  # the premise of the test
    return [f"personalization.epochs={OVER_BUDGET_EPOCHS}",
            f"privacy.noise_multiplier={SIGMA}", "privacy.target_epsilon=null",
            f"privacy.budget_epsilon={budget:.6f}"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Reply]]]:
    settings = {
        "finetune-dp": [*HEART, *DP, *FINETUNE],
        "mrmtl": [*HEART, "federation.rounds=3", "personalization=mrmtl",
                  "personalization.lam=0.5"],
        "finetune-over-budget": [*HEART, *DP, *FINETUNE, *_budget_overrides()],
        "fedper": FEDPER,
    }  # fmt: skip
    out = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, overrides in settings.items():
            captured = _spy(monkeypatch)
            run_dir = tmp_path_factory.mktemp(name)
            summary = simulate(compose_config(overrides), run_dir)
            assert summary["status"] == "completed" and summary["failures"] == [], summary
            out[name] = (run_dir, captured)
            monkeypatch.undo()
    return out


def _entries(run_dir: Path, site: str) -> list[dict[str, Any]]:
    ledger = run_dir / "ledgers" / f"{site}.ledger.jsonl"
    return [json.loads(line) for line in ledger.read_text().splitlines()]


def _personal(run_dir: Path, site: str) -> Path:
    return run_dir / "ledgers" / f"{site}.personal"


def _global_weights(run_dir: Path) -> list[np.ndarray]:
    return [t.numpy() for t in torch.load(run_dir / GLOBAL_MODEL_FILE).values()]


def test_the_personal_model_never_leaves_the_site(runs: dict[str, tuple[Path, list[Reply]]]):
    run_dir, replies = runs["finetune-dp"]
    final = _global_weights(run_dir)
    sent = []
    for _, content in replies:
        assert all(declared(r, k) is not None for r, k in reply_values(content))
        if "fitres.parameters" in content.array_records:
            fit = recorddict_to_fitres(content, keep_input=True)
            sent += [np.load(io.BytesIO(t)) for t in fit.parameters.tensors]
    assert sent  # the rounds' updates were captured
    for site in SITES:
        personal = [t.numpy() for t in torch.load(_personal(run_dir, site) / MODEL_FILE).values()]
        assert not all(np.allclose(p, g) for p, g in zip(personal, final, strict=True))
        for secret in (personal, [p - g for p, g in zip(personal, final, strict=True)]):
            assert not any(
                a.shape == s.shape and np.allclose(a, s, atol=1e-6) for a in sent for s in secret
            )
    # only the fine-tuning's accounting travelled, beside the final evaluation
    keys = {k for _, c in replies for r, k in reply_values(c) if k.startswith(PERSONAL_PREFIX)}
    assert {"personal_epsilon", "personal_steps", "personal_ledger_entry"} <= keys


def test_the_ledger_counts_the_personal_steps(runs: dict[str, tuple[Path, list[Reply]]]):
    run_dir, _ = runs["finetune-dp"]
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = compose_config([*HEART, *DP, *FINETUNE])
    for index, site in enumerate(SITES):
        train = [e for e in _entries(run_dir, site) if e.get("split", "train") == "train"]
        assert [e["round"] for e in train] == [1, 2, 2]
        personal = train[-1]
        assert personal["released"] == PERSONAL_RELEASE
        n = len(load_site(cfg, index).y_train)
        plan = poisson_plan(n, cfg.model.batch_size, 2, personal["noise_multiplier"])
        assert personal["steps"] == plan.steps == 2 * train[0]["steps"]
        # the calibration planned the shared and the personal steps together: the whole run
        # reaches the target, not more (recomputed from the entries with Opacus' PRV)
        steps = [poisson_plan(n, cfg.model.batch_size, 1, e["noise_multiplier"]) for e in train]
        recomputed = cumulative_epsilon([*steps[:2], plan], 1e-3, "prv")
        assert personal["epsilon"] == pytest.approx(recomputed, rel=1e-6)
        assert 0.95 <= personal["epsilon"] <= 1.0
        # the coordinator's privacy report includes them
        assert summary["sites"][site]["privacy"]["epsilon"] == pytest.approx(personal["epsilon"])
        report = json.loads((_personal(run_dir, site) / REPORT_JSON).read_text())
        assert personal["hash"] in " ".join(report["notes"])


def test_the_site_report_is_exact_on_its_own_test_split(
    runs: dict[str, tuple[Path, list[Reply]]],
):
    run_dir, _ = runs["mrmtl"]
    cfg = compose_config([*HEART, "federation.rounds=3", "personalization=mrmtl"])
    for index, site in enumerate(SITES):
        data = load_site(cfg, index)
        model = build_model(cfg.model.name, data.schema, cfg.seed)
        model.load_state_dict(torch.load(_personal(run_dir, site) / MODEL_FILE))
        stats = evaluate(model, build_loss(cfg.model.name), data.x_test, data.y_test, 2)
        report = json.loads((_personal(run_dir, site) / REPORT_JSON).read_text())
        assert report["personalization"] == "mrmtl" and report["round"] == 3
        assert report["test_records"] == len(data.y_test)
        assert report["models"]["personal"]["accuracy"] == pytest.approx(stats.accuracy)
        assert report["models"]["personal"]["auc"] == pytest.approx(stats.auc)
        assert report["models"]["personal"] != report["models"]["global"]
        text = (_personal(run_dir, site) / REPORT_FILE).read_text()
        assert f"{site}: global and personal model" in text and "Nothing in" in text


def test_the_coordinator_sees_the_personal_models_only_through_the_evaluation(
    runs: dict[str, tuple[Path, list[Reply]]],
):
    """Without DP the coordinator merges the sites' exact counts (its per-site figures are
    the sites' own reports'); with DP the final evaluation's one noisy release also counts
    the test records under each personal model: sensitivity sqrt 2, the noise scaled by it,
    the same epsilon as any evaluation, and figures close to the exact ones."""
    exact_run, _ = runs["mrmtl"]
    seen = json.loads((exact_run / "summary.json").read_text())["personal_models"]
    assert seen["evaluation"] == "exact" and seen["method"] == "mrmtl" and seen["round"] == 3
    for site in SITES:
        own = json.loads((_personal(exact_run, site) / REPORT_JSON).read_text())
        assert seen["sites"][site] == pytest.approx(own["models"]["personal"])
    private_run, _ = runs["finetune-dp"]
    summary = json.loads((private_run / "summary.json").read_text())
    seen = summary["personal_models"]
    assert seen["evaluation"] == "private" and seen["sites"] is None and seen["round"] == 2
    reports = [json.loads((_personal(private_run, s) / REPORT_JSON).read_text()) for s in SITES]
    sizes = [r["test_records"] for r in reports]
    accuracies = [r["models"]["personal"]["accuracy"] for r in reports]
    exact = float(np.average(accuracies, weights=sizes))
    assert seen["accuracy"] == pytest.approx(exact, abs=0.1)
    for site in SITES:
        [final] = [e for e in _entries(private_run, site) if e.get("split") == "evaluation"]
        assert final["round"] == 2 and final["sensitivity"] == pytest.approx(math.sqrt(2))
        assert "test records under the site's personal model" in final["released"]
        # one Gaussian step at the calibrated multiplier: the planned evaluation epsilon
        assert 0.95 <= final["epsilon"] <= 1.0 and final["record_epsilon"] <= 1.0


def test_a_site_whose_budget_covers_only_the_shared_rounds_declines_the_personal_steps(
    runs: dict[str, tuple[Path, list[Reply]]],
):
    run_dir, _ = runs["finetune-over-budget"]
    summary = json.loads((run_dir / "summary.json").read_text())
    for site in SITES:
        entries = _entries(run_dir, site)
        assert not any(e.get("released") == PERSONAL_RELEASE for e in entries)
        train = [e for e in entries if e.get("split", "train") == "train"]
        assert [e["round"] for e in train] == [1, 2]
        assert train[-1]["epsilon"] <= train[-1]["budget_epsilon"]
        report = json.loads((_personal(run_dir, site) / REPORT_JSON).read_text())
        assert any("fine-tuning declined" in note for note in report["notes"])
        assert report["models"]["personal"] == report["models"]["global"]
        privacy = summary["sites"][site]["privacy"]
        assert privacy["epsilon"] == pytest.approx(train[-1]["epsilon"])
        assert privacy["declined_rounds"] == []  # it trained every shared round


def test_fedper_keeps_each_sites_head_and_shares_only_the_body(
    runs: dict[str, tuple[Path, list[Reply]]],
):
    run_dir, replies = runs["fedper"]
    cfg = compose_config(FEDPER)
    schema = load_site(cfg, 0).schema
    initial = build_model(cfg.model.name, schema, cfg.seed).state_dict()
    keys = list(initial)
    assert keys[-2:] == ["classifier.weight", "classifier.bias"]  # the head local_keys picks
    updates = 0
    for _, content in replies:
        if "fitres.parameters" in content.array_records and len(content["fitres.parameters"]):
            fit = recorddict_to_fitres(content, keep_input=True)
            delta = [np.load(io.BytesIO(t)) for t in fit.parameters.tensors]
            assert not delta[-1].any() and not delta[-2].any()  # nothing of the head
            assert delta[0].any()  # the body trained and travelled
            updates += 1
    assert updates == 4 * 2
    final = torch.load(run_dir / GLOBAL_MODEL_FILE)
    assert torch.equal(final["classifier.weight"], initial["classifier.weight"])
    heads = []
    for index in range(4):
        site = load_site(cfg, index).name
        personal = torch.load(_personal(run_dir, site) / MODEL_FILE)
        heads.append(personal["classifier.weight"])
        report = json.loads((_personal(run_dir, site) / REPORT_JSON).read_text())
        assert list(report["models"]) == ["personal"]
    assert not any(torch.equal(h, initial["classifier.weight"]) for h in heads)
    assert not torch.equal(heads[0], heads[1])  # each site's own


def test_fedper_local_layers_name_some_but_not_all_weights() -> None:
    from fedmed.site.personal import local_keys

    cnn = build_model(ModelName.cnn, DataSchema((1, 28, 28), 2), 0)
    assert local_keys(cnn, None) == {"classifier.3.weight", "classifier.3.bias"}
    assert local_keys(cnn, ["classifier"]) == {f"classifier.{i}.{w}" for i in (1, 3)
                                               for w in ("weight", "bias")}  # fmt: skip
    for bad in (["features", "classifier"], ["head"]):
        with pytest.raises(ConfigError, match=r"personalization\.local_layers"):
            local_keys(cnn, bad)
    with pytest.raises(ConfigError, match="fedper"):
        compose_config([*HEART, "personalization=fedper"])


class _NoDataLoss(torch.nn.Module):
    """A loss with zero gradient: only the proximal term moves the weights."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.0 * logits.sum()


@pytest.mark.parametrize("private", [False, True])
def test_mrmtl_pulls_each_site_to_the_global_mean_by_hand(private: bool) -> None:
    """Two sites with personal weights 1 and 3, global model 2 (their mean), lr 0.1, lam 0.5,
    one step, no data gradient: w <- w - lr * lam * (w - global) = 1.05 and 2.95; FedAvg of
    the two updates (equal sizes) keeps the global model at 2. DP-SGD applies the same step
    after the noisy one (``private``)."""
    schema = DataSchema((3,), 2)
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0,
                             proximal_mu=0.5)  # fmt: skip
    x, y = np.zeros((4, 3), dtype=np.float32), np.array([0, 1, 0, 1])
    global_model = build_model(ModelName.logreg, schema, 0)
    with torch.no_grad():
        for p in global_model.parameters():
            p.fill_(2.0)
    anchor = [p.detach().clone() for p in global_model.parameters()]
    updates = []
    for start, expected in ((1.0, 1.05), (3.0, 2.95)):
        model = build_model(ModelName.logreg, schema, 0)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(start)
        loader = make_loader(x, y, 4, seed=0, shuffle=False)
        train_local(model, _NoDataLoss(), loader, settings, private=private, anchor=anchor)
        for p in model.parameters():
            assert torch.allclose(p, torch.full_like(p, expected))
        updates.append([w - 2.0 for w in get_weights(model)])
    mean_update = [(a + b) / 2 for a, b in zip(*updates, strict=True)]
    assert all(np.allclose(u, 0.0, atol=1e-6) for u in mean_update)


def test_a_personal_model_never_crosses_runs(tmp_path: Path) -> None:
    from fedmed.site.personal import PersonalStore

    schema = DataSchema((3,), 2)
    trained = build_model(ModelName.logreg, schema, 1)
    PersonalStore(tmp_path, "run-1").save(trained)
    fresh = build_model(ModelName.logreg, schema, 0)
    assert not PersonalStore(tmp_path, "run-2").load_into(fresh)  # another run: the global
    assert not torch.equal(fresh.linear.weight, trained.linear.weight)
    assert PersonalStore(tmp_path, "run-1").load_into(fresh)
    assert torch.equal(fresh.linear.weight, trained.linear.weight)


def test_personalization_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"personalization\.epochs"):
        compose_config([*HEART, "personalization=finetune", "personalization.epochs=0"])
    with pytest.raises(ConfigError, match=r"personalization\.lam"):
        compose_config([*HEART, "personalization=mrmtl", "personalization.lam=-1"])
    with pytest.raises(ConfigError, match=r"strategy\.proximal_mu"):
        compose_config([*HEART, "personalization=mrmtl", "strategy=fedprox",
                        "strategy.proximal_mu=0.1"])  # fmt: skip


def test_the_dry_run_projects_the_personal_steps(tmp_path: Path) -> None:
    from fedmed.audit.dry_run import project_site

    planned = compose_config([*HEART, *DP, *FINETUNE])
    over = compose_config([*HEART, *DP, *FINETUNE, *_budget_overrides()])
    for index in range(4):
        fits = project_site(planned, index, tmp_path / "planned", deployed=False)
        assert fits.personal_reason == "" and 0.95 <= (fits.personal_epsilon or 0) <= 1.0
        assert fits.epsilon_by_round[-1] < fits.personal_epsilon  # the rounds leave room
        declines = project_site(over, index, tmp_path / "over", deployed=False)
        assert declines.declines_from_round is None and declines.personal_reason
